"""Reading a store's activations back as float32 torch rows: in order, as a mean, as a sample, and
as shuffled training batches decoded by several threads and read ahead of the step.

The shuffle reads blocks of whole chunks (storage.shuffle.ChunkOrder): each block's chunks are
decoded into one 16-bit buffer by `readers` threads, permuted there, and cut into batches."""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import zarr

from storage.activations import meta_of
from storage.chunk_reads import chunk_reader
from storage.shuffle import SHUFFLE_BUFFER_MB, Block, ChunkOrder

DEFAULT_READERS = min(4, os.cpu_count() or 1)  # threads decoding a shuffle buffer's chunks at once


def _rows(array: zarr.Array, start: int, stop: int) -> torch.Tensor:
    return stored_rows(array, start, stop).float()


def iter_rows(array: zarr.Array, batch_rows: int, stop: int | None = None) -> Iterator[torch.Tensor]:
    """Sequential float32 batches over the first `stop` rows (default all) of an array."""
    end = array.shape[0] if stop is None else min(stop, array.shape[0])
    for start in range(0, end, batch_rows):
        yield _rows(array, start, min(start + batch_rows, end))


def column_mean(array: zarr.Array, stop: int | None = None, batch_rows: int = 65536) -> torch.Tensor:
    """Mean row (float32) over the first `stop` rows, accumulated in float64."""
    total, count = torch.zeros(array.shape[1], dtype=torch.float64), 0
    for rows in iter_rows(array, batch_rows, stop):
        total += rows.double().sum(0)
        count += rows.shape[0]
    return (total / count).float()


def chunks_in(array: zarr.Array, megabytes: int) -> int:
    """Whole chunks of `array` in a shuffle buffer of about `megabytes` MiB."""
    chunk_bytes = array.chunks[0] * array.shape[1] * array.dtype.itemsize
    return max(1, round(megabytes * 2**20 / chunk_bytes))


def chunk_order(
    array: zarr.Array,
    batch_rows: int,
    seed: int,
    buffer_chunks: int | None = None,
    part: tuple[int, int] = (0, 1),
    group_chunks: int | None = None,
) -> ChunkOrder:
    """The order in which `array`'s chunks are read and its rows drawn (storage.shuffle.ChunkOrder);
    `buffer_chunks` defaults to SHUFFLE_BUFFER_MB's worth."""
    buffer_chunks = buffer_chunks or chunks_in(array, SHUFFLE_BUFFER_MB)
    return ChunkOrder(array.shape[0], array.chunks[0], batch_rows, buffer_chunks, seed, part, group_chunks)


def shuffled_batches(
    array: zarr.Array,
    batch_rows: int,
    seed: int,
    buffer_chunks: int | None = None,
    start_batch: int = 0,
    part: tuple[int, int] = (0, 1),
    readers: int = DEFAULT_READERS,
    device: str | torch.device = "cpu",
    group_chunks: int | None = None,
    wait: Callable[[Block], None] | None = None,
) -> Iterator[torch.Tensor]:
    """Endless shuffled float32 batches on `device`, deterministic for a seed, never holding the whole
    array: batches_in_order of chunk_order(array, ...). `start_batch` resumes at a training
    checkpoint's data cursor, `part` is a data-parallel reader's share; with `group_chunks` (a bounded
    window) the batches end after one pass."""
    order = chunk_order(array, batch_rows, seed, buffer_chunks, part, group_chunks)
    return batches_in_order(array, order, start_batch, readers, device, wait)


def batches_in_order(
    array: zarr.Array,
    order: ChunkOrder,
    start_batch: int = 0,
    readers: int = DEFAULT_READERS,
    device: str | torch.device = "cpu",
    wait: Callable[[Block], None] | None = None,
) -> Iterator[torch.Tensor]:
    """The batches of `order` (blocks of whole chunks, rows shuffled inside a block) from `array`,
    float32 on `device`, from `start_batch` on. `readers` threads read and decode a block's chunks at
    once; the batches do not depend on it. `wait(block)` returns once the block's chunks are on disk.

    Rows stay in the stored 16-bit dtype through the shuffle (half the bytes moved) and only a batch
    becomes float32. On CUDA a block goes to the device once, from pinned memory without blocking, and
    is shuffled there."""
    device = torch.device(device)
    stored = _stored_dtype(array)
    read_into = chunk_reader(array)
    pool = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="saeflow-reader", initializer=_yield_to_the_step)
    # on the CPU two block buffers take turns (a fresh one would cost its page faults every block);
    # CUDA's pinned buffers come from torch's caching host allocator, which also waits for their copies
    spare: list[torch.Tensor] = []

    def read(block):
        """Submits the reads of a block's chunks, each into its own rows of one buffer (None: the
        one pass has ended)."""
        if block is None:
            return None
        if wait is not None:
            wait(block)
        sizes = [order.rows_of(int(c)) for c in block.chunks]
        buf = spare.pop() if spare else None
        if buf is None or len(buf) < block.rows:
            buf = torch.empty(block.rows, array.shape[1], dtype=_torch_dtype(array), pin_memory=device.type == "cuda")
        out = buf.numpy()
        starts = np.cumsum([0, *sizes[:-1]])
        reads = [pool.submit(read_into, int(c), out[i : i + size]) for c, i, size in zip(block.chunks, starts, sizes)]
        return block, buf, reads

    try:
        blocks = order.blocks(start_batch)
        upcoming = read(next(blocks, None))
        while upcoming is not None:
            block, whole, reads = upcoming
            for r in reads:
                r.result()
            upcoming = read(next(blocks, None))  # the next block is read while this one's batches are drawn
            buf = _as_stored(whole[: block.rows], stored)
            permutation = torch.from_numpy(block.permutation)
            if device.type != "cpu":
                buf, permutation = buf.to(device, non_blocking=True), permutation.to(device, non_blocking=True)
            B = order.part_batch
            for b in range(block.skip, block.batches):  # index_select: 5x advanced indexing's rate here
                yield torch.index_select(buf, 0, permutation[b * B : (b + 1) * B]).float()
            if device.type == "cpu":
                spare.append(whole)
    finally:  # a closed or abandoned reader stops reading ahead
        pool.shutdown(cancel_futures=True)


def _torch_dtype(array: zarr.Array) -> torch.dtype:
    """The tensor dtype holding the array's values bit for bit (bfloat16 is stored as uint16)."""
    return {"float16": torch.float16, "uint16": torch.uint16, "float32": torch.float32}[array.dtype.name]


def _stored_dtype(array: zarr.Array) -> torch.dtype:
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(
        meta_of(array).get("logical_dtype", "float16"), torch.float32
    )


def stored_rows(array: zarr.Array, start: int, stop: int) -> torch.Tensor:
    """Rows in the store's own dtype (bfloat16 from its raw 16 bits), not yet float32."""
    return _as_stored(torch.from_numpy(np.asarray(array[start:stop])), _stored_dtype(array))


def _as_stored(rows: torch.Tensor, stored: torch.dtype) -> torch.Tensor:
    """The stored values as their logical dtype: bfloat16's raw 16 bits viewed as bfloat16."""
    return rows.view(torch.bfloat16) if stored == torch.bfloat16 else rows


def _yield_to_the_step() -> None:
    """A reading thread yields a busy core to the training step: the reader runs far ahead of the
    step. (Not torch.set_num_threads, which is process-wide: it would change the step's threads, and
    with them the bits of its matmuls.)"""
    if hasattr(os, "setpriority"):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + 5)


def prefetch(batches: Iterator[torch.Tensor], depth: int = 4) -> Iterator[torch.Tensor]:
    """Reads ahead in a background thread so reading overlaps with training. Closing the returned
    iterator (or dropping it) stops the thread and closes `batches` there."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def worker():
        _yield_to_the_step()
        try:
            for b in batches:
                if not put(b):
                    break
        except BaseException as e:  # handed to the consumer
            put(e)
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        put(done)

    threading.Thread(target=worker, daemon=True, name="saeflow-prefetch").start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def sample_rows(array: zarr.Array, n: int, seed: int, chunks: int | None = None) -> torch.Tensor:
    """About n rows from randomly chosen whole chunks (for initialisation statistics), of the first
    `chunks` chunks (default all)."""
    rng = np.random.default_rng(seed)
    rows = array.chunks[0]
    picked, total = [], 0
    for c in rng.permutation(chunks or math.ceil(array.shape[0] / rows)):
        picked.append(_rows(array, c * rows, (c + 1) * rows))
        total += len(picked[-1])
        if total >= n:
            break
    return torch.cat(picked)[:n]
