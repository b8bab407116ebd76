"""Direct chunk reads from shard files give exactly zarr's values, and refuse a damaged index."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from storage import activations as store
from storage.chunk_reads import _DirectChunks, chunk_reader


def sharded(tmp_path, compression="none", dtype="float16", rows=1000):
    values = np.random.default_rng(0).standard_normal((rows, 6)).astype(dtype)
    arr = zarr.create_array(
        str(tmp_path / "a"),
        shape=values.shape,
        dtype=dtype,
        chunks=(64, 6),
        shards=(256, 6),
        compressors=store.compressors(compression),
    )
    return arr, values


@pytest.mark.parametrize("dtype", ["float16", "uint16", "float32"])
def test_direct_reads_equal_zarrs_including_a_short_last_chunk_and_an_unwritten_one(tmp_path, dtype):
    arr, values = sharded(tmp_path, dtype=dtype)
    arr[: 64 * 5] = values[: 64 * 5]
    arr[64 * 6 :] = values[64 * 6 :]  # chunk 5 is never written: zarr reads it as the fill value
    assert _DirectChunks.of(arr) is not None
    read = chunk_reader(arr)
    out = np.full((64 * 16, 6), 7, dtype=arr.dtype)
    for c in range(16):  # 1000 rows: the 16th chunk holds 40
        assert read(c, out[c * 64 :]) == min(64, 1000 - c * 64)
    assert np.array_equal(out[:1000], np.asarray(arr[:]))
    assert not out[5 * 64 : 6 * 64].any() and (out[1000:] == 7).all()  # nothing past the last row


@pytest.mark.parametrize("compression", ["lz4", "zstd"])
def test_a_compressed_array_reads_through_zarr(tmp_path, compression):
    arr, values = sharded(tmp_path, compression)
    arr[:] = values
    assert _DirectChunks.of(arr) is None
    out = np.zeros((100, 6), dtype=arr.dtype)
    assert chunk_reader(arr)(15, out) == 40 and np.array_equal(out[:40], values[960:])


def test_a_damaged_shard_index_is_refused(tmp_path):
    arr, values = sharded(tmp_path)
    arr[:] = values
    shard = tmp_path / "a" / "c" / "1" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the index, before its checksum
    shard.write_bytes(bytes(data))
    out = np.zeros((64, 6), dtype=arr.dtype)
    with pytest.raises(OSError, match=r"the chunk index of .*/c/1/0 is damaged"):
        chunk_reader(arr)(5, out)
    chunk_reader(arr)(2, out)
    assert np.array_equal(out, values[128:192])  # the other shards still read
