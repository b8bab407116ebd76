"""Zarr v3 activation store: write LM activations at hookpoints, read them back in shuffled batches.

Layout of one store (a Zarr group at any fsspec URL):
    {split}/tokens            (n_contexts, context_length) int32   token ids
    {split}/acts/{hookpoint}  (n_contexts * positions, d) float16  one row per kept position
with split in {"train", "eval"}. The group attribute `complete` is set last: a store without it is
unfinished and is rejected for reading.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from sae.lm import capture

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")
TARGET_CHUNK_BYTES = 2 * 2**20  # >= 1 MB chunks: efficient reads from object stores as well


def array_name(hookpoint: str) -> str:
    return hookpoint.replace("/", "_")


def chunk_rows(d: int, itemsize: int = 2) -> int:
    return max(1024, TARGET_CHUNK_BYTES // (d * itemsize))


class IncompleteStoreError(RuntimeError):
    pass


@dataclass(frozen=True)
class StoreInfo:
    url: str
    hookpoints: list[str]
    d_model: int
    context_length: int
    first_position: int  # 1 when the first position of each context is dropped


def open_store(url: str, storage_options: dict | None = None) -> zarr.Group:
    """Opens a finished store for reading; an unfinished one raises IncompleteStoreError."""
    try:
        group = zarr.open_group(url, mode="r", storage_options=storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
        raise IncompleteStoreError(f"no activation store at {url}: run `saeflow cache SPEC` first") from e
    if not group.attrs.get("complete", False):
        raise IncompleteStoreError(f"the activation store at {url} is unfinished: run `saeflow cache SPEC` again")
    return group


def is_complete(url: str, storage_options: dict | None = None) -> bool:
    try:
        open_store(url, storage_options)
    except IncompleteStoreError:
        return False
    return True


def store_info(group: zarr.Group) -> StoreInfo:
    a = group.attrs
    return StoreInfo(str(group.store), list(a["hookpoints"]), a["d_model"], a["context_length"], a["first_position"])


@torch.no_grad()
def write_store(
    url: str,
    model: torch.nn.Module,
    contexts: dict[str, torch.Tensor],
    hookpoints: list[str],
    *,
    drop_first_position: bool,
    batch_contexts: int,
    attrs: dict,
    storage_options: dict | None = None,
    progress: bool = True,
) -> str:
    """Runs the LM over each split's contexts (one forward serves all hookpoints), writes the store."""
    d_model = model.config.hidden_size
    first = 1 if drop_first_position else 0
    group = zarr.open_group(url, mode="w", storage_options=storage_options)
    group.attrs.update({**attrs, "complete": False})
    device = next(model.parameters()).device
    rows = chunk_rows(d_model)
    codec = zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
    for split, ids in contexts.items():
        n_ctx, length = ids.shape
        positions = length - first
        sub = group.create_group(split)
        sub.create_array("tokens", data=ids.numpy().astype(np.int32), chunks=(max(1, 2**20 // (4 * length)), length))
        acts = {
            h: sub.create_array(
                f"acts/{array_name(h)}",
                shape=(n_ctx * positions, d_model),
                dtype="float16",
                chunks=(rows, d_model),
                compressors=codec,
            )
            for h in hookpoints
        }
        # whole-chunk writes only: each chunk is written once, never read-modify-written
        buffers = {h: [] for h in hookpoints}
        written = 0
        bar = tqdm(total=n_ctx * positions, unit="tok", unit_scale=True, desc=f"cache {split}", disable=not progress)
        for start in range(0, n_ctx, batch_contexts):
            batch = ids[start : start + batch_contexts].to(device, torch.long)
            out = capture(model, batch, hookpoints)
            for h in hookpoints:
                a = out[h][:, first:].reshape(-1, d_model).float()
                if not torch.isfinite(a).all():
                    raise ValueError(f"non-finite activations at {h} in {split} contexts {start}..{start + len(batch)}")
                buffers[h].append(a.cpu().numpy().astype(np.float16))
            pending = sum(len(b) for b in buffers[hookpoints[0]])
            last = start + batch_contexts >= n_ctx
            if pending >= rows or last:
                n_rows = pending if last else (pending // rows) * rows
                for h in hookpoints:
                    block = np.concatenate(buffers[h])
                    acts[h][written : written + n_rows] = block[:n_rows]
                    buffers[h] = [block[n_rows:]]
                written += n_rows
            bar.update(len(batch) * positions)
        bar.close()
    group.attrs.update({"complete": True})
    log.info("activations written to %s", url)
    return url


def activations(group: zarr.Group, split: str, hookpoint: str) -> zarr.Array:
    return group[f"{split}/acts/{array_name(hookpoint)}"]


def iter_rows(array: zarr.Array, batch_rows: int, stop: int | None = None) -> Iterator[torch.Tensor]:
    """Sequential float32 batches over the first `stop` rows (default all) of an array."""
    end = array.shape[0] if stop is None else min(stop, array.shape[0])
    for start in range(0, end, batch_rows):
        yield torch.from_numpy(array[start : min(start + batch_rows, end)].astype(np.float32))


def column_mean(array: zarr.Array, stop: int | None = None, batch_rows: int = 65536) -> torch.Tensor:
    """Mean row (float32) over the first `stop` rows, accumulated in float64."""
    total, count = torch.zeros(array.shape[1], dtype=torch.float64), 0
    for rows in iter_rows(array, batch_rows, stop):
        total += rows.double().sum(0)
        count += rows.shape[0]
    return (total / count).float()


def shuffled_batches(
    array: zarr.Array, batch_rows: int, seed: int, buffer_chunks: int = 8, start_batch: int = 0
) -> Iterator[torch.Tensor]:
    """Endless shuffled float32 batches, deterministic for a seed, never holding the whole array.

    Whole chunks are read in a random order, `buffer_chunks` at a time, and rows are shuffled inside
    that buffer (random single-row reads would touch nearly every chunk). `start_batch` resumes the
    sequence at that batch (a training checkpoint's data cursor).
    """
    batch_index = 0
    rng = np.random.default_rng(seed)
    rows = array.chunks[0]
    n_chunks = -(-array.shape[0] // rows)
    carry = np.empty((0, array.shape[1]), dtype=np.float16)
    while True:
        order = rng.permutation(n_chunks)
        for i in range(0, n_chunks, buffer_chunks):
            parts = [carry] + [array[c * rows : (c + 1) * rows] for c in order[i : i + buffer_chunks]]
            buf = np.concatenate(parts)
            buf = buf[rng.permutation(len(buf))]
            n_full = len(buf) // batch_rows
            for b in range(n_full):
                if batch_index >= start_batch:
                    yield torch.from_numpy(buf[b * batch_rows : (b + 1) * batch_rows].astype(np.float32))
                batch_index += 1
            carry = buf[n_full * batch_rows :]


def sample_rows(array: zarr.Array, n: int, seed: int) -> torch.Tensor:
    """About n rows from randomly chosen whole chunks (for initialisation statistics)."""
    rng = np.random.default_rng(seed)
    rows = array.chunks[0]
    n_chunks = -(-array.shape[0] // rows)
    picked, total = [], 0
    for c in rng.permutation(n_chunks):
        block = array[c * rows : (c + 1) * rows]
        picked.append(block)
        total += len(block)
        if total >= n:
            break
    return torch.from_numpy(np.concatenate(picked)[:n].astype(np.float32))
