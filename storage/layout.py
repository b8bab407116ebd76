"""Where a split's activations go: contexts in chunks, chunks in shards, and what that costs on disk.
Plain arithmetic (no zarr, no torch), so that planning and validating a spec stay fast."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

TARGET_CHUNK_BYTES = 2 * 2**20  # >= 1 MB chunks: efficient reads from object stores as well
CHUNKS_PER_SHARD = 8
# stored dtype and the logical dtype it holds: zarr 3.1 has no bfloat16, so its raw bits go in uint16
STORE_DTYPES = {"float16": "float16", "float32": "float32", "bfloat16": "uint16"}


@dataclass(frozen=True)
class Layout:
    """How one split's contexts map onto chunks and shards."""

    n_contexts: int
    context_length: int
    first_position: int
    chunk_contexts: int
    shard_contexts: int

    @property
    def positions(self) -> int:
        return self.context_length - self.first_position

    @property
    def rows(self) -> int:
        return self.n_contexts * self.positions

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_contexts / self.shard_contexts)

    def shard_contexts_range(self, i: int) -> tuple[int, int]:
        return i * self.shard_contexts, min((i + 1) * self.shard_contexts, self.n_contexts)

    @classmethod
    def plan(
        cls,
        n_contexts: int,
        context_length: int,
        first_position: int,
        d: int,
        itemsize: int,
        shard_contexts: int | None,
    ):
        positions = context_length - first_position
        chunk = max(1, math.ceil(TARGET_CHUNK_BYTES / (positions * d * itemsize)))
        if shard_contexts is None:
            return cls(n_contexts, context_length, first_position, chunk, chunk * CHUNKS_PER_SHARD)
        # the shard the spec asks for, in chunks of at most the target size that divide it
        divisor = next(c for c in range(min(chunk, shard_contexts), 0, -1) if shard_contexts % c == 0)
        if divisor < min(chunk, shard_contexts) / 2:
            log.warning(
                "data.shard_contexts=%d splits only into chunks of %d contexts (%d kB), which read slowly: "
                "a multiple of %d gives chunks of about %d MB",
                shard_contexts,
                divisor,
                divisor * positions * d * itemsize // 1000,
                chunk,
                TARGET_CHUNK_BYTES // 2**20,
            )
        return cls(n_contexts, context_length, first_position, divisor, shard_contexts)


def decode(block: np.ndarray, logical_dtype: str) -> np.ndarray:
    """Stored rows as float32: bfloat16's raw bits (kept in uint16) are the upper half of a float32's."""
    if logical_dtype == "bfloat16":
        return (block.astype(np.uint32) << 16).view(np.float32)
    return block.astype(np.float32)


def planned_rows(tokens: int, context_length: int, first_position: int) -> int:
    """Rows cached for `tokens` tokens: whole contexts of context_length - first_position rows."""
    positions = context_length - first_position
    return math.ceil(tokens / positions) * positions


def planned_bytes(tokens: int, context_length: int, first_position: int, d_model: int, dtype: str) -> int:
    """Bytes of one hookpoint's activations for `tokens` tokens cut into whole contexts, as stored
    uncompressed (activations do not compress: docs/benchmarks.md)."""
    rows = planned_rows(tokens, context_length, first_position)
    return rows * d_model * np.dtype(STORE_DTYPES[dtype]).itemsize


def shard_bytes(context_length: int, first_position: int, d_model: int, dtype: str, shard_contexts: int | None) -> int:
    """Bytes of one train shard of one hookpoint, as planned by Layout.plan (uncompressed)."""
    itemsize = np.dtype(STORE_DTYPES[dtype]).itemsize
    layout = Layout.plan(1, context_length, first_position, d_model, itemsize, shard_contexts)
    return layout.shard_contexts * layout.positions * d_model * itemsize
