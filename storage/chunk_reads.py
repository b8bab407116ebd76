"""Whole-chunk reads of an activation array, the train stage's unit of reading.

An uncompressed sharded array on a local disk is read straight from its shard files: zarr v3's
sharding codec keeps each inner chunk's raw little-endian bytes at the (offset, length) that the
index at the end of its shard names, and the index carries its own crc32c, checked on first use.
Through zarr, a chunk read spends most of its time in per-call machinery (about 1M rows/s at d 576
on one thread, against about 6M for the bytes themselves: docs/benchmarks.md); any other array
(compressed, on an object store, laid out otherwise) reads through zarr.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import numpy as np
import zarr
from numcodecs import CRC32C
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.metadata import ArrayV3Metadata
from zarr.storage import LocalStore

EMPTY = 2**64 - 1  # the index's (offset, length) of a chunk never written


def chunk_reader(array: zarr.Array) -> Callable[[int, np.ndarray], int]:
    """A function that reads chunk c (along rows) into the first rows of `out` (of the array's dtype,
    at least a chunk long unless it is the last) and returns how many rows it holds."""
    direct = _DirectChunks.of(array)
    if direct is not None:
        return direct.read_into
    rows = array.chunks[0]

    def through_zarr(c: int, out: np.ndarray) -> int:
        block = np.asarray(array[c * rows : (c + 1) * rows])
        out[: len(block)] = block
        return len(block)

    return through_zarr


class _DirectChunks:
    def __init__(self, array: zarr.Array, meta: ArrayV3Metadata, root: str):
        self.array = array
        self.keys = meta.chunk_key_encoding
        self.root = root
        self.rows = array.chunks[0]
        self.per_shard = (array.shards or array.chunks)[0] // self.rows
        self.dtype = array.dtype
        self.index_bytes = self.per_shard * 16 + 4  # (offset, length) uint64 pairs and a crc32c
        self.indexes: dict[int, np.ndarray] = {}
        self.lock = threading.Lock()

    @classmethod
    def of(cls, array: zarr.Array) -> _DirectChunks | None:
        store, meta, shards = array.store_path.store, array.metadata, array.shards
        if not (
            isinstance(store, LocalStore) and isinstance(meta, ArrayV3Metadata) and shards and len(meta.codecs) == 1
        ):
            return None
        codec = meta.codecs[0]
        plain = (
            isinstance(codec, ShardingCodec)
            and codec.index_location == ShardingCodecIndexLocation.end
            and _little(codec.codecs)
            and len(codec.index_codecs) == 2
            and _little(codec.index_codecs[:1])
            and isinstance(codec.index_codecs[1], Crc32cCodec)
            and array.chunks[1:] == array.shape[1:] == shards[1:]
            and array.dtype.byteorder in "<|="
        )
        return cls(array, meta, os.path.join(str(store.root), array.store_path.path)) if plain else None

    def shard_path(self, shard: int) -> str:
        key = self.keys.encode_chunk_key((shard, 0))
        return os.path.join(self.root, key)

    def index(self, shard: int, fd: int) -> np.ndarray:
        with self.lock:
            found = self.indexes.get(shard)
        if found is None:
            size = os.fstat(fd).st_size
            tail = os.pread(fd, self.index_bytes, size - self.index_bytes)
            try:
                found = np.asarray(CRC32C().decode(tail)).view("<u8").reshape(self.per_shard, 2)
            except RuntimeError as e:  # numcodecs: the checksum does not match
                raise OSError(f"the chunk index of {self.shard_path(shard)} is damaged ({e})") from None
            with self.lock:
                self.indexes[shard] = found
        return found

    def read_into(self, c: int, out: np.ndarray) -> int:
        shard, inner = divmod(c, self.per_shard)
        n = min(self.rows, self.array.shape[0] - c * self.rows)
        expected = self.rows * out[:1].nbytes  # a chunk is stored whole, the last one too
        fd = os.open(self.shard_path(shard), os.O_RDONLY)
        try:
            offset, length = (int(v) for v in self.index(shard, fd)[inner])
            if offset == EMPTY:
                out[:n] = self.array.fill_value
            elif length != expected:
                raise OSError(f"chunk {c} of {self.root}: {length} bytes in its shard, {expected} expected")
            elif n == self.rows and out[:n].flags.c_contiguous:  # straight into place
                if os.preadv(fd, [out[:n].data.cast("B")], offset) != length:
                    raise OSError(f"chunk {c} of {self.root}: its shard ends early")
            else:  # the last, short chunk: its padding stays out of `out`
                data = os.pread(fd, length, offset)
                out[:n] = np.frombuffer(data, dtype=self.dtype).reshape(self.rows, -1)[:n]
        finally:
            os.close(fd)
        return n


def _little(codecs) -> bool:
    return (
        len(codecs) == 1
        and isinstance(codecs[0], BytesCodec)
        and getattr(codecs[0].endian, "value", codecs[0].endian) in (None, "little")
    )
