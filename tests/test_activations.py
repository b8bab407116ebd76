import os

import numpy as np
import pytest
import torch
import zarr

from sae.lm import capture, load_lm
from storage import activations as store
from storage import layout, reading, shard_writer
from storage.corpus import Contexts
from storage.layout import decode
from storage.shuffle import ChunkOrder, mixing


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    return load_lm(str(tiny_model_dir), "float32", "cpu")


def contexts(n, length, vocab, seed) -> Contexts:
    tokens = np.random.default_rng(seed).integers(3, vocab, (n, length), dtype=np.int32)
    doc_index = (np.arange(n * length) // 37).reshape(n, length).astype(np.int32)
    return Contexts(
        tokens,
        doc_index,
        (np.arange(n * length) % 37).reshape(n, length).astype(np.int32),
        [f"doc{i}" for i in range(doc_index.max() + 1)],
    )


def build(url, model, data, hooks, dtype="float16", shard_contexts=16, first=1):
    store.plan_store(
        url,
        data,
        hooks,
        d_model=model.config.hidden_size,
        first_position=first,
        dtype=dtype,
        shard_contexts=shard_contexts,
        attrs={"m": 1},
    )
    for split, i in store.missing_shards(url):
        shard_writer.write_shard(url, split, i, model, batch_contexts=8)
    store.finalize_store(url)


@pytest.mark.parametrize("url_kind,dtype", [("local", "float16"), ("memory", "float16"), ("local", "bfloat16")])
def test_store_round_trip_equals_direct_capture(tiny_lm, tmp_path, url_kind, dtype, monkeypatch):
    model, _ = tiny_lm
    monkeypatch.setattr(layout, "TARGET_CHUNK_BYTES", 1)  # many small chunks inside each shard
    hooks = ["model.layers.0", "model.layers.2"]
    vocab = model.config.vocab_size
    data = {"train": contexts(70, 12, vocab, 0), "eval": contexts(9, 12, vocab, 1)}
    url = str(tmp_path / "acts") if url_kind == "local" else f"memory://acts-{tmp_path.name}"
    build(url, model, data, hooks, dtype)
    group = store.open_store(url, verify=True)
    assert group.attrs["m"] == 1 and group.attrs["complete"]
    assert store.layout_of(group, "train").n_shards == 5  # 70 contexts, 16 per shard
    for split, ctx in data.items():
        np.testing.assert_array_equal(group[f"{split}/tokens"][:], ctx.tokens)
        np.testing.assert_array_equal(group[f"{split}/doc_index"][:], ctx.doc_index)
        np.testing.assert_array_equal(group[f"{split}/doc_position"][:], ctx.doc_position)
        assert list(group[f"{split}/documents"][:]) == ctx.documents
        direct = capture(model, torch.from_numpy(ctx.tokens).long(), hooks)
        for h in hooks:
            expected = direct[h][:, 1:].reshape(-1, model.config.hidden_size).to(getattr(torch, dtype)).float()
            arr = store.activations(group, split, h)
            got = torch.cat(list(reading.iter_rows(arr, 50)))
            assert torch.equal(got, expected)
            stats = group.attrs["stats"][f"{split}/{h}"]
            np.testing.assert_allclose(stats["mean"], expected.double().mean(0).numpy(), rtol=1e-6, atol=1e-9)
            assert stats["mean_squared_norm"] == pytest.approx(expected.double().pow(2).sum(1).mean().item())


def test_unfinished_store_is_rejected(tmp_path):
    url = str(tmp_path / "half")
    group = zarr.open_group(url, mode="w")
    group.attrs["complete"] = False
    with pytest.raises(store.IncompleteStoreError, match="unfinished"):
        store.open_store(url)
    with pytest.raises(store.IncompleteStoreError, match="saeflow cache"):
        store.open_store(str(tmp_path / "nothing-here"))
    assert not store.is_complete(url)


def test_missing_and_corrupted_shards_are_named(tiny_lm, tmp_path):
    model, _ = tiny_lm
    url = str(tmp_path / "acts")
    build(url, model, {"train": contexts(40, 8, 50, 0)}, ["model.layers.1"], shard_contexts=10)
    store.open_store(url, verify=True)
    shard = tmp_path / "acts" / "train" / "acts" / "model.layers.1" / "c" / "2" / "0"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(
        store.IncompleteStoreError, match=r"train shard 2 \(contexts 20..29\) of model.layers.1 is corrupted"
    ):
        store.open_store(url, verify=True)
    os.remove(tmp_path / "acts" / "_shards" / "train-000003.json")
    with pytest.raises(store.IncompleteStoreError, match=r"train shard 3 \(contexts 30..39\) is missing"):
        store.open_store(url, verify=True)
    assert store.missing_shards(url) == [("train", 3)]


def test_non_finite_activations_are_rejected(tiny_lm, tmp_path):
    model, _ = tiny_lm
    url = str(tmp_path / "bad")
    store.plan_store(
        url,
        {"train": contexts(8, 8, 50, 0)},
        ["model.layers.0"],
        d_model=32,
        first_position=0,
        shard_contexts=4,
        attrs={},
    )

    def poison(module, inputs, output):
        output = output.clone()
        output[1, 3] = float("inf")  # context 1 of the batch
        return output

    handle = model.model.layers[0].register_forward_hook(poison)
    try:
        with pytest.raises(
            ValueError, match=r"non-finite activations at model.layers.0 in train context 5 .*tokens 40..47"
        ):
            shard_writer.write_shard(url, "train", 1, model, batch_contexts=4)
    finally:
        handle.remove()
    assert store.missing_shards(url) == [("train", 0), ("train", 1)]


def test_shuffled_batches_draw_each_row_at_most_once_an_epoch_and_resume_in_place(tmp_path):
    rows = np.arange(1000 * 4, dtype=np.float16).reshape(1000, 4) / 8
    arr = zarr.create_array(str(tmp_path / "a"), shape=rows.shape, dtype="float16", chunks=(64, 4))
    arr[:] = rows
    order = ChunkOrder(1000, 64, 50, 3, seed=3)
    blocks = order.epoch_blocks(0)  # 16 chunks, the last of 40 rows: 5 blocks of 3 or 4 chunks
    assert sorted(map(len, blocks)) == [3, 3, 3, 3, 4] and sorted(np.concatenate(blocks)) == list(range(16))
    batches = sum(sum(order.rows_of(int(c)) for c in b) // 50 for b in blocks)
    assert batches in (16, 17)  # each block leaves fewer than 50 of its rows out
    it = reading.prefetch(reading.shuffled_batches(arr, batch_rows=50, seed=3, buffer_chunks=3))
    epoch = torch.cat([next(it) for _ in range(batches)])[:, 0]
    assert len(set(epoch.tolist())) == batches * 50  # no row twice in an epoch
    assert set(epoch.tolist()) <= set(rows[:, 0].astype(np.float32).tolist())
    second = torch.cat([next(it) for _ in range(batches)])[:, 0]
    assert not torch.equal(torch.sort(epoch).values, torch.sort(second).values)  # other rows sit out
    again = reading.shuffled_batches(arr, batch_rows=50, seed=3, buffer_chunks=3)
    assert torch.equal(torch.cat([next(again) for _ in range(batches)])[:, 0], epoch)
    for start in (7, batches - 1, batches + 2):  # inside a block, at an epoch's end, in the next epoch
        resumed = reading.shuffled_batches(arr, batch_rows=50, seed=3, buffer_chunks=3, start_batch=start)
        whole = torch.cat([epoch, second])
        assert torch.equal(torch.cat([next(resumed) for _ in range(3)])[:, 0], whole[start * 50 : (start + 3) * 50])
    other = reading.shuffled_batches(arr, batch_rows=50, seed=4, buffer_chunks=3)
    assert not torch.equal(torch.cat([next(other) for _ in range(batches)])[:, 0], epoch)


def test_a_resumed_order_reads_nothing_before_its_block():
    order = ChunkOrder(10_000, 100, 100, 4, seed=0)
    blocks = order.blocks(start_batch=250)  # past two epochs of at most 100 batches each
    first = next(blocks)
    drawn = 0
    for epoch in range(3):
        for chunks in order.epoch_blocks(epoch):
            n = len(chunks)  # every chunk is whole: a block of n chunks is n batches
            if drawn + n > 250:
                assert np.array_equal(first.chunks, chunks) and first.skip == 250 - drawn
                return
            drawn += n
    raise AssertionError("batch 250 was not found in three epochs")


def test_a_store_smaller_than_a_batch_or_the_replicas_is_refused_in_one_line():
    with pytest.raises(ValueError, match="fewer than its 4 data-parallel readers"):
        ChunkOrder(300, 100, 64, 8, seed=0, part=(0, 4))
    with pytest.raises(ValueError, match="100 rows, is less than one batch of 128"):
        ChunkOrder(300, 100, 256, 8, seed=0, part=(1, 2))


def test_a_buffer_of_the_whole_store_mixes_documents_like_a_uniform_shuffle():
    """Contexts in order, documents of 20 contexts, 16 rows a context: a small buffer draws a batch
    from a few documents, a buffer of the whole store from as many as a uniform draw."""
    doc_of_row = np.repeat(np.arange(50), 20 * 16)
    small = mixing(ChunkOrder(len(doc_of_row), 64, 256, 2, seed=0), doc_of_row, batches=10)
    whole = mixing(ChunkOrder(len(doc_of_row), 64, 256, 1000, seed=0), doc_of_row, batches=10)
    assert small[0] < 0.3 * small[1]
    assert abs(whole[0] - whole[1]) < 0.05 * whole[1]


def plain_shuffled_batches(arr, batch_rows, seed, buffer_chunks, logical):
    """The reader written plainly: each chunk decoded to float32 on its own, concatenated, permuted."""
    rows = arr.chunks[0]
    for block in ChunkOrder(arr.shape[0], rows, batch_rows, buffer_chunks, seed).blocks():
        parts = [torch.from_numpy(decode(np.asarray(arr[c * rows : (c + 1) * rows]), logical)) for c in block.chunks]
        buf = torch.cat(parts)[torch.from_numpy(block.permutation)]
        for b in range(block.batches):
            yield buf[b * batch_rows : (b + 1) * batch_rows]


@pytest.mark.parametrize("logical", ["float16", "bfloat16"])
@pytest.mark.parametrize("readers", [1, 3])
def test_parallel_readers_give_the_plain_readers_batches(tmp_path, logical, readers):
    """Several threads decode a buffer's chunks and the shuffle runs on 16-bit rows; the batches are
    the plain float32 reader's, value for value, over two passes of a store with a short last chunk."""
    values = torch.randn(1000, 6, generator=torch.Generator().manual_seed(0))
    encoded = shard_writer.encode_rows(values, logical)
    arr = zarr.create_array(
        str(tmp_path / "a"),
        shape=encoded.shape,
        dtype=encoded.dtype,
        chunks=(64, 6),
        attributes={"logical_dtype": logical},
    )
    arr[:] = encoded
    ours = reading.shuffled_batches(arr, batch_rows=48, seed=5, buffer_chunks=3, readers=readers)
    plain = plain_shuffled_batches(arr, 48, 5, 3, logical)
    for _ in range(2 * 1000 // 48):
        a, b = next(ours), next(plain)
        assert a.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_shuffle_on_the_device_gives_the_hosts_batches(tmp_path):
    values = torch.randn(1000, 6, generator=torch.Generator().manual_seed(0))
    arr = zarr.create_array(str(tmp_path / "a"), shape=(1000, 6), dtype="uint16", chunks=(64, 6))
    arr.attrs["logical_dtype"] = "bfloat16"
    arr[:] = shard_writer.encode_rows(values, "bfloat16")
    host = reading.shuffled_batches(arr, batch_rows=48, seed=5, buffer_chunks=3)
    device = reading.shuffled_batches(arr, batch_rows=48, seed=5, buffer_chunks=3, device="cuda")
    for _ in range(2 * 1000 // 48):
        a, b = next(host), next(device)
        assert b.device.type == "cuda" and b.dtype == torch.float32 and torch.equal(a, b.cpu())


def test_closing_the_prefetcher_stops_its_thread_and_closes_the_reader():
    import threading
    import time

    closed = threading.Event()

    def endless():
        try:
            while True:
                yield torch.zeros(2)
        finally:
            closed.set()

    it = reading.prefetch(endless(), depth=2)
    next(it)
    it.close()
    assert closed.wait(5)  # the reader was closed on the prefetch thread
    deadline = time.monotonic() + 5
    while any(t.name == "saeflow-prefetch" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "saeflow-prefetch" for t in threading.enumerate())


def test_the_shard_size_a_spec_asks_for_is_kept(caplog):
    # d 576 in float16 at 63 positions: 2 MB chunks hold 29 contexts
    assert layout.Layout.plan(1000, 64, 1, 576, 2, None).shard_contexts == 29 * 8
    kept = layout.Layout.plan(1000, 64, 1, 576, 2, 32)
    assert (kept.shard_contexts, kept.chunk_contexts) == (32, 16)  # not rounded up to 58
    assert not caplog.records
    prime = layout.Layout.plan(1000, 64, 1, 576, 2, 59)
    assert (prime.shard_contexts, prime.chunk_contexts) == (59, 1)
    assert "data.shard_contexts=59 splits only into chunks of 1 contexts" in caplog.text
    assert "a multiple of 29" in caplog.text
