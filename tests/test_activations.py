import numpy as np
import pytest
import torch
import zarr

from sae.lm import capture, load_lm
from storage import activations as store


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    return load_lm(str(tiny_model_dir), "float32", "cpu")


def contexts(n, length, vocab, seed):
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)


@pytest.mark.parametrize("url_kind", ["local", "memory"])
def test_store_round_trip_equals_direct_capture(tiny_lm, tmp_path, url_kind, monkeypatch):
    model, _ = tiny_lm
    monkeypatch.setattr(store, "TARGET_CHUNK_BYTES", 1)  # many small chunks: exercises the chunk buffering
    hooks = ["model.layers.0", "model.layers.2"]
    data = {"train": contexts(70, 12, model.config.vocab_size, 0), "eval": contexts(9, 12, model.config.vocab_size, 1)}
    url = str(tmp_path / "acts") if url_kind == "local" else f"memory://acts-{id(tmp_path)}"
    store.write_store(url, model, data, hooks, drop_first_position=True, batch_contexts=8, attrs={"m": 1}, progress=False)
    group = store.open_store(url)
    assert group.attrs["m"] == 1 and group.attrs["complete"]
    for split, ids in data.items():
        np.testing.assert_array_equal(group[f"{split}/tokens"][:], ids.numpy())
        direct = capture(model, ids.long(), hooks)
        for h in hooks:
            expected = direct[h][:, 1:].reshape(-1, model.config.hidden_size).half().numpy()
            np.testing.assert_array_equal(store.activations(group, split, h)[:], expected)


def test_unfinished_store_is_rejected(tmp_path):
    url = str(tmp_path / "half")
    group = zarr.open_group(url, mode="w")
    group.attrs["complete"] = False
    with pytest.raises(store.IncompleteStoreError, match="unfinished"):
        store.open_store(url)
    with pytest.raises(store.IncompleteStoreError, match="saeflow cache"):
        store.open_store(str(tmp_path / "nothing-here"))
    assert not store.is_complete(url)


def test_non_finite_activations_are_rejected(tiny_lm, tmp_path):
    model, _ = tiny_lm
    handle = model.model.layers[0].register_forward_hook(lambda m, i, o: o * float("nan"))
    try:
        with pytest.raises(ValueError, match="non-finite activations at model.layers.0 in train contexts 0..4"):
            store.write_store(
                str(tmp_path / "bad"), model, {"train": contexts(4, 8, 50, 0)}, ["model.layers.0"],
                drop_first_position=False, batch_contexts=4, attrs={}, progress=False,
            )
    finally:
        handle.remove()
    assert not store.is_complete(str(tmp_path / "bad"))


def test_shuffled_batches_cover_each_row_once_per_epoch(tmp_path):
    rows = np.arange(1000 * 4, dtype=np.float16).reshape(1000, 4) / 8
    arr = zarr.create_array(str(tmp_path / "a"), shape=rows.shape, dtype="float16", chunks=(64, 4))
    arr[:] = rows
    it = store.shuffled_batches(arr, batch_rows=50, seed=3, buffer_chunks=3)
    epoch = torch.cat([next(it) for _ in range(20)])  # 20 x 50 = 1000 rows
    assert sorted(epoch[:, 0].tolist()) == sorted(rows[:, 0].astype(np.float32).tolist())
    again = store.shuffled_batches(arr, batch_rows=50, seed=3, buffer_chunks=3)
    assert torch.equal(torch.cat([next(again) for _ in range(20)]), epoch)
    other = store.shuffled_batches(arr, batch_rows=50, seed=4, buffer_chunks=3)
    assert not torch.equal(torch.cat([next(other) for _ in range(20)]), epoch)
