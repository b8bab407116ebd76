"""Sharded Zarr v3 activation store: planned once, filled shard by shard, verified, then read back.

Layout of one store (a Zarr group at any fsspec URL):
    {split}/tokens, doc_index, doc_position   (n_contexts, context_length) int32
    {split}/documents                          (n_documents,) str   document ids
    {split}/acts/{hookpoint}                   (n_contexts * positions, d)   one row per kept position
    _shards/{split}-{i}.json                   completion marker of shard i: crc32 of its files
with split in {"train", "eval"}. Activation arrays are chunked for reading (>= 1 MB chunks) inside
shards for writing; a shard is a whole number of contexts and exactly one writer ever writes it, so
workers never read-modify-write each other's data. A shard counts only once its marker exists; the
group attribute `complete` is set after every shard is marked and the statistics are computed.
Row r of split s comes from context r // positions at position first_position + r % positions.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast

import fsspec
import numpy as np
import torch
import zarr
from tqdm.auto import tqdm
from zarr.codecs import BloscCodec
from zarr.errors import GroupNotFoundError

from sae.lm import capture
from storage.chunk_reads import chunk_reader
from storage.corpus import Contexts
from storage.shuffle import SHUFFLE_BUFFER_MB, Block, ChunkOrder

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")
TARGET_CHUNK_BYTES = 2 * 2**20  # >= 1 MB chunks: efficient reads from object stores as well
CHUNKS_PER_SHARD = 8
MARKERS = "_shards"
# stored dtype and the logical dtype it holds: zarr 3.1 has no bfloat16, so its raw bits go in uint16
DEFAULT_READERS = min(4, os.cpu_count() or 1)  # threads decoding a shuffle buffer's chunks at once
STORE_DTYPES = {"float16": "float16", "float32": "float32", "bfloat16": "uint16"}
# data.compression: activations barely compress (docs/benchmarks.md, "Compression of the store");
# zstd is what every store written before the option holds, and such stores read as before
COMPRESSIONS = {
    "none": None,
    "lz4": BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
    "zstd": BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
}


def compressors(name: str):
    """The zarr compressors of a data.compression choice."""
    if name not in COMPRESSIONS:
        raise ValueError(f"unknown compression {name!r}: use one of {', '.join(COMPRESSIONS)}")
    return COMPRESSIONS[name]


def array_name(hookpoint: str) -> str:
    return hookpoint.replace("/", "_")


class IncompleteStoreError(RuntimeError):
    pass


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


def planned_bytes(tokens: int, context_length: int, first_position: int, d_model: int, dtype: str) -> int:
    """Bytes of one hookpoint's activations for `tokens` tokens cut into whole contexts, as stored
    uncompressed (activations do not compress: docs/benchmarks.md)."""
    positions = context_length - first_position
    return math.ceil(tokens / positions) * positions * d_model * np.dtype(STORE_DTYPES[dtype]).itemsize


def shard_bytes(context_length: int, first_position: int, d_model: int, dtype: str, shard_contexts: int | None) -> int:
    """Bytes of one train shard of one hookpoint, as planned by Layout.plan (uncompressed)."""
    itemsize = np.dtype(STORE_DTYPES[dtype]).itemsize
    layout = Layout.plan(1, context_length, first_position, d_model, itemsize, shard_contexts)
    return layout.shard_contexts * layout.positions * d_model * itemsize


# opening and verifying ---------------------------------------------------------------------------
def _group(url: str, mode: Literal["r", "r+", "w"], storage_options: dict | None) -> zarr.Group:
    # zarr refuses storage_options (even empty) for a local path
    return zarr.open_group(url, mode=mode, storage_options=storage_options or None)


def meta_of(node: zarr.Group | zarr.Array) -> dict[str, Any]:
    """A node's attributes, for reading: the store writes plain JSON (zarr types them as its JSON union)."""
    return cast(dict[str, Any], node.attrs)


def _array(group: zarr.Group, path: str) -> zarr.Array:
    node = group[path]
    if not isinstance(node, zarr.Array):
        raise IncompleteStoreError(f"{group.store_path}/{path} is not an array: the store is damaged")
    return node


def _subgroup(group: zarr.Group, path: str) -> zarr.Group:
    node = group[path]
    if not isinstance(node, zarr.Group):
        raise IncompleteStoreError(f"{group.store_path}/{path} is not a group: the store is damaged")
    return node


def filesystem(url: str, storage_options: dict | None):
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def marker_path(root: str, split: str, i: int) -> str:
    return f"{root}/{MARKERS}/{split}-{i:06d}.json"


def shard_file(root: str, split: str, hookpoint: str, i: int) -> str:
    return f"{root}/{split}/acts/{array_name(hookpoint)}/c/{i}/0"


TOKEN_ARRAYS = ("tokens", "doc_index", "doc_position", "documents")  # written at planning, one file a shard


def _token_file_crcs(url: str, split: str, storage_options: dict | None) -> dict[str, int]:
    """crc32 of every chunk file of a split's token arrays, by path under the split."""
    fs, root = filesystem(url, storage_options)
    base = f"{root.rstrip('/')}/{split}/"
    files = [f for name in TOKEN_ARRAYS for f in fs.find(f"{base}{name}/c")]
    return {f.removeprefix(base): zlib.crc32(fs.cat_file(f)) for f in files}


def token_problems(url: str, split: str, storage_options: dict | None = None, shard: int | None = None) -> list[str]:
    """The token-array files of a split (of one shard's contexts when `shard` is given, the document
    ids always) that do not match the crc32 recorded at planning. Stores planned before have none."""
    group = _group(url, "r", storage_options)
    recorded = meta_of(_subgroup(group, split)).get("crc32") or {}
    fs, root = filesystem(url, storage_options)
    problems = []
    for rel, crc in sorted(recorded.items()):
        if shard is not None and rel.split("/")[0] != "documents" and rel.split("/")[2] != str(shard):
            continue
        try:
            actual = zlib.crc32(fs.cat_file(f"{root}/{split}/{rel}"))
        except FileNotFoundError:
            actual = None
        if actual != crc:
            problems.append(f"the {rel.split('/')[0]} of {split} ({root}/{split}/{rel}) are corrupted or gone")
    return problems


def read_marker(fs, path: str) -> dict | None:
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # absent, or cut short by a kill: the shard is redone


def open_group_for_status(url: str, storage_options: dict | None = None) -> zarr.Group:
    """A planned store's group, finished or not (read-only; for reporting progress)."""
    return _group(url, "r", storage_options)


def layout_of(group: zarr.Group, split: str) -> Layout:
    return Layout(**meta_of(_subgroup(group, split))["layout"])


def window_of(group: zarr.Group) -> int | None:
    """data.window_shards of a store whose train split streams (storage/window.py), else None."""
    return meta_of(group).get("window_shards")


def cached_splits(group: zarr.Group) -> list[str]:
    """The splits cached whole before training: all but a streamed train split."""
    return [s for s in meta_of(group).get("splits", []) if not (s == "train" and window_of(group))]


def missing_shards(url: str, storage_options: dict | None = None) -> list[tuple[str, int]]:
    """(split, shard) pairs of a planned store's cached splits that have no completion marker."""
    group = _group(url, "r", storage_options)
    fs, root = filesystem(url, storage_options)
    return [
        (split, i)
        for split in cached_splits(group)
        for i in range(layout_of(group, split).n_shards)
        if read_marker(fs, marker_path(root, split, i)) is None
    ]


def bad_shards(
    url: str, storage_options: dict | None = None, splits=None, full: bool = True
) -> list[tuple[str, int, str]]:
    """(split, shard, what is wrong) for every shard of `splits` (default the cached ones) that has no
    marker or (full=True) whose files do not match the crc32 recorded when it was written; shard -1
    for the split's token arrays, written when the store was planned."""
    group = _group(url, "r", storage_options)
    fs, root = filesystem(url, storage_options)
    problems = []
    for split in splits or cached_splits(group):
        if full:
            problems += [(split, -1, what) for what in token_problems(url, split, storage_options)]
        layout = layout_of(group, split)
        for i in range(layout.n_shards):
            c0, c1 = layout.shard_contexts_range(i)
            where = f"{split} shard {i} (contexts {c0}..{c1 - 1})"
            marker = read_marker(fs, marker_path(root, split, i))
            if marker is None:
                problems.append((split, i, f"{where} is missing"))
                continue
            if not full:
                continue
            for h, crc in marker["crc32"].items():
                try:
                    actual = zlib.crc32(fs.cat_file(shard_file(root, split, h, i)))
                except FileNotFoundError:
                    actual = None
                if actual != crc:
                    problems.append(
                        (split, i, f"{where} of {h} is corrupted or gone ({shard_file(root, split, h, i)})")
                    )
    return problems


def verify_shards(url: str, storage_options: dict | None = None, full: bool = True, splits=None) -> None:
    """Raises IncompleteStoreError naming every bad shard (see bad_shards)."""
    problems = [what for _, _, what in bad_shards(url, storage_options, splits, full)]
    if problems:
        raise IncompleteStoreError(
            f"the activation store at {url} has bad shards; run `saeflow cache SPEC` to recompute them:\n  "
            + "\n  ".join(problems[:20])
            + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        )


def reopen_bad_shards(url: str, storage_options: dict | None = None) -> list[str]:
    """Checks every shard of a store; drops the markers of the bad ones and the `complete` flag, so
    that caching recomputes exactly those shards. Returns what was wrong (empty: nothing to redo)."""
    problems = bad_shards(url, storage_options)
    if problems:
        fs, root = filesystem(url, storage_options)
        group = _group(url, "r+", storage_options)
        meta_of(group)["complete"] = False  # first: a kill from here on leaves a store that is not complete
        if any(i < 0 for _, i, _ in problems):  # the tokens come from planning: plan (and compute) it all again
            del meta_of(group)["splits"]
            return [what for _, _, what in problems]
        for split, i in sorted({(split, i) for split, i, _ in problems}):
            if fs.exists(marker_path(root, split, i)):
                fs.rm_file(marker_path(root, split, i))
    return [what for _, _, what in problems]


def open_store(url: str, storage_options: dict | None = None, verify: bool | tuple[str, ...] = False) -> zarr.Group:
    """Opens a finished store for reading; unfinished or damaged ones raise. verify: True checks every
    shard's checksum, a tuple of splits (e.g. ("eval",)) only theirs."""
    try:
        group = _group(url, "r", storage_options)
    except (FileNotFoundError, GroupNotFoundError) as e:
        raise IncompleteStoreError(f"no activation store at {url}: run `saeflow cache SPEC` first") from e
    if not meta_of(group).get("complete", False):
        raise IncompleteStoreError(f"the activation store at {url} is unfinished: run `saeflow cache SPEC` again")
    if verify:
        verify_shards(url, storage_options, splits=None if verify is True else verify)
    return group


def planned_hash(url: str, storage_options: dict | None = None) -> str | None:
    """The spec hash of a fully planned store at url (shards may still be missing), else None."""
    try:
        attrs = meta_of(_group(url, "r", storage_options))
    except (FileNotFoundError, GroupNotFoundError):
        return None
    return attrs.get("spec_hash") if "splits" in attrs else None  # `splits` is written last by plan_store


def is_complete(url: str, storage_options: dict | None = None) -> bool:
    try:
        open_store(url, storage_options)
    except IncompleteStoreError:
        return False
    return True


# writing -----------------------------------------------------------------------------------------
def plan_store(
    url: str,
    splits: dict[str, Contexts],
    hookpoints: list[str],
    *,
    d_model: int,
    first_position: int,
    dtype: str = "float16",
    shard_contexts: int | None = None,
    compression: str = "none",
    window_shards: int | None = None,
    attrs: dict,
    storage_options: dict | None = None,
) -> None:
    """Creates the group, the token/document arrays (zstd: token ids do compress) and the empty
    sharded activation arrays (`compression`, one of COMPRESSIONS). `window_shards`: the train split
    streams through a bounded window (storage/window.py) instead of being cached whole."""
    acts_codec = compressors(compression)
    group = _group(url, "w", storage_options)
    stored = np.dtype(STORE_DTYPES[dtype])
    codec = COMPRESSIONS["zstd"]
    for split, ctx in splits.items():
        n, length = ctx.tokens.shape
        layout = Layout.plan(n, length, first_position, d_model, stored.itemsize, shard_contexts)
        sub = group.create_group(split, attributes={"layout": asdict(layout)})
        for name in ("tokens", "doc_index", "doc_position"):
            sub.create_array(name, data=getattr(ctx, name), chunks=(layout.shard_contexts, length), compressors=codec)
        docs = sub.create_array("documents", shape=(len(ctx.documents),), dtype="str")  # variable-length UTF-8
        docs[:] = np.asarray(ctx.documents, dtype=object)
        sub.attrs["crc32"] = _token_file_crcs(url, split, storage_options)
        for h in hookpoints:
            sub.create_array(
                f"acts/{array_name(h)}",
                shape=(layout.rows, d_model),
                dtype=stored,
                chunks=(layout.chunk_contexts * layout.positions, d_model),
                shards=(layout.shard_contexts * layout.positions, d_model),
                compressors=acts_codec,
                attributes={"logical_dtype": dtype, "hookpoint": h},
            )
    group.attrs.update(
        {
            **attrs,
            "hookpoints": hookpoints,
            "splits": list(splits),
            "d_model": d_model,
            "dtype": dtype,
            "context_length": next(iter(splits.values())).tokens.shape[1],
            "first_position": first_position,
            "window_shards": window_shards,
            "complete": False,
        }
    )
    log.info("planned activation store at %s", url)


def _encode(a: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return a.to(torch.bfloat16).view(torch.uint16).numpy()
    return a.to(getattr(torch, dtype)).numpy()


def _decode(block: np.ndarray, logical_dtype: str) -> torch.Tensor:
    if logical_dtype == "bfloat16":
        return torch.from_numpy(block.astype(np.uint16)).view(torch.bfloat16).float()
    return torch.from_numpy(block.astype(np.float32))


@torch.no_grad()
def write_shard(
    url: str,
    split: str,
    index: int,
    model: torch.nn.Module,
    batch_contexts: int,
    storage_options: dict | None = None,
    progress: bool = False,
    stop: Callable[[], bool] | None = None,
) -> None:
    """Runs the LM over one shard's contexts (one forward serves every hookpoint), writes, marks it.
    When `stop()` turns true it raises KeyboardInterrupt between two batches, writing nothing."""
    group = _group(url, "r+", storage_options)
    hookpoints, dtype, first = meta_of(group)["hookpoints"], meta_of(group)["dtype"], meta_of(group)["first_position"]
    sub = _subgroup(group, split)
    layout = layout_of(group, split)
    c0, c1 = layout.shard_contexts_range(index)
    damaged = token_problems(url, split, storage_options, shard=index)
    if damaged:
        raise IncompleteStoreError(f"{url}: {'; '.join(damaged)}: run `saeflow cache SPEC` to plan the store again")
    ids = torch.from_numpy(np.asarray(_array(sub, "tokens")[c0:c1]))
    device = next(model.parameters()).device
    blocks: dict[str, list[np.ndarray]] = {h: [] for h in hookpoints}
    bar = tqdm(
        total=len(ids) * layout.positions,
        unit="tok",
        unit_scale=True,
        desc=f"cache {split} shard {index}",
        disable=not progress,
    )
    for start in range(0, len(ids), batch_contexts):
        if stop is not None and stop():
            bar.close()
            raise KeyboardInterrupt(f"stopped while caching {split} shard {index} (it is computed again)")
        out = capture(model, ids[start : start + batch_contexts].to(device, torch.long), hookpoints)
        bar.update(len(out[hookpoints[0]]) * layout.positions)
        for h in hookpoints:
            a = out[h][:, first:].reshape(-1, out[h].shape[-1]).float().cpu()
            if not torch.isfinite(a).all():
                bad = int((~torch.isfinite(a)).any(-1).nonzero()[0]) // layout.positions + c0 + start
                raise ValueError(
                    f"non-finite activations at {h} in {split} context {bad} (shard {index}, contexts "
                    f"{c0 + start}..{c0 + start + len(out[h]) - 1}, tokens {bad * layout.context_length}.."
                    f"{(bad + 1) * layout.context_length - 1} of the split)"
                )
            blocks[h].append(_encode(a, dtype))
    bar.close()
    fs, root = filesystem(url, storage_options)
    crcs = {}
    for h in hookpoints:
        _array(sub, f"acts/{array_name(h)}")[c0 * layout.positions : c1 * layout.positions] = np.concatenate(blocks[h])
        crcs[h] = zlib.crc32(fs.cat_file(shard_file(root, split, h, index)))
    fs.makedirs(f"{root}/{MARKERS}", exist_ok=True)
    write_marker(fs, marker_path(root, split, index), json.dumps({"crc32": crcs}).encode())


def write_marker(fs, path: str, data: bytes) -> None:
    """A marker appears whole or not at all: on a local disk via a rename (an object store's put is
    already atomic), so a kill never leaves a torn marker behind."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        fs.pipe_file(path + ".tmp", data)
        fs.mv(path + ".tmp", path)
    else:
        fs.pipe_file(path, data)


def finalize_store(url: str, storage_options: dict | None = None) -> dict:
    """Checks every shard, computes statistics over each whole array with Dask, marks the store complete
    (with a window: the cached splits; the train split streams while training)."""
    import dask.array as da

    verify_shards(url, storage_options)
    group = _group(url, "r+", storage_options)
    stats = {}
    for split in cached_splits(group):
        for h in meta_of(group)["hookpoints"]:
            arr = _array(group, f"{split}/acts/{array_name(h)}")
            logical = meta_of(arr)["logical_dtype"]
            x = da.from_zarr(arr).map_blocks(
                lambda b, logical=logical: _decode(b, logical).numpy().astype(np.float64), dtype=np.float64
            )
            mean, sq_norm, nonfinite = da.compute(x.mean(axis=0), (x**2).sum(axis=1).mean(), (~da.isfinite(x)).sum())
            if nonfinite:
                raise ValueError(f"{split} activations at {h} hold {int(nonfinite)} non-finite values")
            stats[f"{split}/{h}"] = {"mean": mean.tolist(), "mean_squared_norm": float(sq_norm), "non_finite": 0}
    group.attrs.update({"stats": stats, "complete": True})
    log.info("activation store complete at %s", url)
    return stats


# reading -----------------------------------------------------------------------------------------
def activations(group: zarr.Group, split: str, hookpoint: str) -> zarr.Array:
    return _array(group, f"{split}/acts/{array_name(hookpoint)}")


def _rows(array: zarr.Array, start: int, stop: int) -> torch.Tensor:
    return _stored_rows(array, start, stop).float()


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


def _stored_rows(array: zarr.Array, start: int, stop: int) -> torch.Tensor:
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
