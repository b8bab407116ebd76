import os

import numpy as np
import pytest
import torch
import zarr

from sae.lm import capture, load_lm
from storage import activations as store
from storage.corpus import Contexts


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
        store.write_shard(url, split, i, model, batch_contexts=8)
    store.finalize_store(url)


@pytest.mark.parametrize("url_kind,dtype", [("local", "float16"), ("memory", "float16"), ("local", "bfloat16")])
def test_store_round_trip_equals_direct_capture(tiny_lm, tmp_path, url_kind, dtype, monkeypatch):
    model, _ = tiny_lm
    monkeypatch.setattr(store, "TARGET_CHUNK_BYTES", 1)  # many small chunks inside each shard
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
            got = torch.cat(list(store.iter_rows(arr, 50)))
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
            store.write_shard(url, "train", 1, model, batch_contexts=4)
    finally:
        handle.remove()
    assert store.missing_shards(url) == [("train", 0), ("train", 1)]


def test_shuffled_batches_cover_each_row_once_per_epoch(tmp_path):
    rows = np.arange(1000 * 4, dtype=np.float16).reshape(1000, 4) / 8
    arr = zarr.create_array(str(tmp_path / "a"), shape=rows.shape, dtype="float16", chunks=(64, 4))
    arr[:] = rows
    it = store.prefetch(store.shuffled_batches(arr, batch_rows=50, seed=3, buffer_chunks=3))
    epoch = torch.cat([next(it) for _ in range(20)])  # 20 x 50 = 1000 rows
    assert sorted(epoch[:, 0].tolist()) == sorted(rows[:, 0].astype(np.float32).tolist())
    again = store.shuffled_batches(arr, batch_rows=50, seed=3, buffer_chunks=3)
    assert torch.equal(torch.cat([next(again) for _ in range(20)]), epoch)
    resumed = store.shuffled_batches(arr, batch_rows=50, seed=3, buffer_chunks=3, start_batch=7)
    assert torch.equal(torch.cat([next(resumed) for _ in range(13)]), epoch[350:])
    other = store.shuffled_batches(arr, batch_rows=50, seed=4, buffer_chunks=3)
    assert not torch.equal(torch.cat([next(other) for _ in range(20)]), epoch)


def plain_shuffled_batches(arr, batch_rows, seed, buffer_chunks, logical):
    """The reader as first written: each chunk decoded to float32, concatenated, permuted, sliced."""
    rng = np.random.default_rng(seed)
    rows = arr.chunks[0]
    n_chunks = -(-arr.shape[0] // rows)
    carry = torch.empty(0, arr.shape[1])
    while True:
        order = rng.permutation(n_chunks)
        for i in range(0, len(order), buffer_chunks):
            parts = [
                store._decode(np.asarray(arr[c * rows : (c + 1) * rows]), logical) for c in order[i : i + buffer_chunks]
            ]
            buf = torch.cat([carry, *parts])
            buf = buf[torch.from_numpy(rng.permutation(len(buf)))]
            n_full = len(buf) // batch_rows
            for b in range(n_full):
                yield buf[b * batch_rows : (b + 1) * batch_rows]
            carry = buf[n_full * batch_rows :]


@pytest.mark.parametrize("logical", ["float16", "bfloat16"])
@pytest.mark.parametrize("readers", [1, 3])
def test_parallel_readers_give_the_plain_readers_batches(tmp_path, logical, readers):
    """Several threads decode a buffer's chunks and the shuffle runs on 16-bit rows; the batches are
    the plain float32 reader's, value for value, over two passes of a store with a short last chunk."""
    values = torch.randn(1000, 6, generator=torch.Generator().manual_seed(0))
    encoded = store._encode(values, logical)
    arr = zarr.create_array(
        str(tmp_path / "a"),
        shape=encoded.shape,
        dtype=encoded.dtype,
        chunks=(64, 6),
        attributes={"logical_dtype": logical},
    )
    arr[:] = encoded
    ours = store.shuffled_batches(arr, batch_rows=48, seed=5, buffer_chunks=3, readers=readers)
    plain = plain_shuffled_batches(arr, 48, 5, 3, logical)
    for _ in range(2 * 1000 // 48):
        a, b = next(ours), next(plain)
        assert a.dtype == torch.float32 and torch.equal(a, b)
