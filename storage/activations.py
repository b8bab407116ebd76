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

This module plans, opens, verifies and finalizes a store (no torch: `saeflow status` reads it);
storage.shard_writer fills a shard with the LM's activations, storage.rows reads rows back.
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import asdict
from typing import Any, Literal, cast

import fsspec
import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.errors import GroupNotFoundError

from sae.config import IO, modules_of
from storage.corpus import Contexts
from storage.layout import STORE_DTYPES, Layout, decode

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")
MARKERS = "_shards"
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
    """A hookpoint's (or an [input | output] site's) array in the store."""
    return hookpoint.replace("/", "_").replace(IO, "@io")


class IncompleteStoreError(RuntimeError):
    pass


# opening and verifying ---------------------------------------------------------------------------
def open_group(url: str, mode: Literal["r", "r+", "w"], storage_options: dict | None) -> zarr.Group:
    # zarr refuses storage_options (even empty) for a local path
    return zarr.open_group(url, mode=mode, storage_options=storage_options or None)


def meta_of(node: zarr.Group | zarr.Array) -> dict[str, Any]:
    """A node's attributes, for reading: the store writes plain JSON (zarr types them as its JSON union)."""
    return cast(dict[str, Any], node.attrs)


def array_at(group: zarr.Group, path: str) -> zarr.Array:
    node = group[path]
    if not isinstance(node, zarr.Array):
        raise IncompleteStoreError(f"{group.store_path}/{path} is not an array: the store is damaged")
    return node


def subgroup_at(group: zarr.Group, path: str) -> zarr.Group:
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
    group = open_group(url, "r", storage_options)
    recorded = meta_of(subgroup_at(group, split)).get("crc32") or {}
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
    return open_group(url, "r", storage_options)


def layout_of(group: zarr.Group, split: str) -> Layout:
    return Layout(**meta_of(subgroup_at(group, split))["layout"])


def window_of(group: zarr.Group) -> int | None:
    """data.window_shards of a store whose train split streams (storage/window.py), else None."""
    return meta_of(group).get("window_shards")


def cached_splits(group: zarr.Group) -> list[str]:
    """The splits cached whole before training: all but a streamed train split."""
    return [s for s in meta_of(group).get("splits", []) if not (s == "train" and window_of(group))]


def missing_shards(url: str, storage_options: dict | None = None) -> list[tuple[str, int]]:
    """(split, shard) pairs of a planned store's cached splits that have no completion marker."""
    group = open_group(url, "r", storage_options)
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
    group = open_group(url, "r", storage_options)
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
        group = open_group(url, "r+", storage_options)
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
        group = open_group(url, "r", storage_options)
    except (FileNotFoundError, GroupNotFoundError) as e:
        raise IncompleteStoreError(f"no activation store at {url}: run `saeflow cache SPEC` first") from e
    if not meta_of(group).get("complete", False):
        raise IncompleteStoreError(f"the activation store at {url} is unfinished: run `saeflow cache SPEC` again")
    if verify:
        verify_shards(url, storage_options, splits=None if verify is True else verify)
    return group


def planned_hash(url: str, storage_options: dict | None = None, key: str = "spec_hash") -> str | None:
    """The spec hash (or another key, e.g. eval_hash: the held-out split's) of a fully planned store at
    url (shards may still be missing), else None."""
    try:
        attrs = meta_of(open_group(url, "r", storage_options))
    except (FileNotFoundError, GroupNotFoundError):
        return None
    return attrs.get(key) if "splits" in attrs else None  # `splits` is written last by plan_store


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
    group = open_group(url, "w", storage_options)
    for split, ctx in splits.items():
        args = (hookpoints, d_model, first_position, dtype, shard_contexts, compression, storage_options)
        _plan_split(group, url, split, ctx, *args)
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


def _plan_split(
    group: zarr.Group,
    url: str,
    split: str,
    ctx: Contexts,
    hookpoints: list[str],
    d_model: int,
    first_position: int,
    dtype: str,
    shard_contexts: int | None,
    compression: str,
    storage_options: dict | None,
) -> None:
    stored = np.dtype(STORE_DTYPES[dtype])
    n, length = ctx.tokens.shape
    layout = Layout.plan(n, length, first_position, d_model, stored.itemsize, shard_contexts)
    sub = group.create_group(split, attributes={"layout": asdict(layout)})
    for name in ("tokens", "doc_index", "doc_position"):  # zstd: token ids do compress
        sub.create_array(
            name, data=getattr(ctx, name), chunks=(layout.shard_contexts, length), compressors=COMPRESSIONS["zstd"]
        )
    docs = sub.create_array("documents", shape=(len(ctx.documents),), dtype="str")  # variable-length UTF-8
    docs[:] = np.asarray(ctx.documents, dtype=object)
    sub.attrs["crc32"] = _token_file_crcs(url, split, storage_options)
    for h in hookpoints:
        # a transcoder's site: [input | output]; a cross-layer transcoder's: [inputs | outputs] of its MLPs
        width = 2 * d_model * len(modules_of(h)) if h.endswith(IO) else d_model
        sub.create_array(
            f"acts/{array_name(h)}",
            shape=(layout.rows, width),
            dtype=stored,
            chunks=(layout.chunk_contexts * layout.positions, width),
            shards=(layout.shard_contexts * layout.positions, width),
            compressors=compressors(compression),
            attributes={"logical_dtype": dtype, "hookpoint": h},
        )


def replan_split(
    url: str,
    split: str,
    ctx: Contexts,
    *,
    attrs: dict,
    shard_contexts: int | None = None,
    compression: str = "none",
    storage_options: dict | None = None,
) -> None:
    """Plans one split of a planned store again (new contexts, no shards computed), keeping the other:
    a change of the evaluation settings re-caches the held-out rows only. `splits`, the planned mark,
    is taken off first: a kill midway leaves a store that is planned again whole, never a torn one."""
    group = open_group(url, "r+", storage_options)
    meta = dict(meta_of(group))
    meta_of(group)["complete"] = False
    del meta_of(group)["splits"]
    fs, root = filesystem(url, storage_options)
    for marker in fs.glob(f"{root}/{MARKERS}/{split}-*.json"):
        fs.rm_file(marker)
    if split in group:
        del group[split]
    hooks, d_model, first, dtype = (meta[k] for k in ("hookpoints", "d_model", "first_position", "dtype"))
    _plan_split(group, url, split, ctx, hooks, d_model, first, dtype, shard_contexts, compression, storage_options)
    group.attrs.update({**attrs, "splits": meta["splits"]})
    log.info("planned the %s split of the activation store at %s again", split, url)


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
    group = open_group(url, "r+", storage_options)
    stats = {}
    for split in cached_splits(group):
        for h in meta_of(group)["hookpoints"]:
            arr = array_at(group, f"{split}/acts/{array_name(h)}")
            logical = meta_of(arr)["logical_dtype"]
            x = da.from_zarr(arr).map_blocks(
                lambda b, logical=logical: decode(b, logical).astype(np.float64), dtype=np.float64
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
    return array_at(group, f"{split}/acts/{array_name(hookpoint)}")
