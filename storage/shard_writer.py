"""Filling one shard of the store: the LM runs over the shard's contexts (one forward serves every
hookpoint), the rows are encoded in the store's dtype, written, and the shard is marked complete."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from sae.lm import capture
from storage.activations import (
    MARKERS,
    IncompleteStoreError,
    array_at,
    array_name,
    filesystem,
    layout_of,
    marker_path,
    meta_of,
    open_group,
    shard_file,
    subgroup_at,
    token_problems,
    write_marker,
)


def encode_rows(a: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return a.to(torch.bfloat16).view(torch.uint16).numpy()
    return a.to(getattr(torch, dtype)).numpy()


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
    group = open_group(url, "r+", storage_options)
    hookpoints, dtype, first = meta_of(group)["hookpoints"], meta_of(group)["dtype"], meta_of(group)["first_position"]
    sub = subgroup_at(group, split)
    layout = layout_of(group, split)
    c0, c1 = layout.shard_contexts_range(index)
    damaged = token_problems(url, split, storage_options, shard=index)
    if damaged:
        raise IncompleteStoreError(f"{url}: {'; '.join(damaged)}: run `saeflow cache SPEC` to plan the store again")
    ids = torch.from_numpy(np.asarray(array_at(sub, "tokens")[c0:c1]))
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
            blocks[h].append(encode_rows(a, dtype))
    bar.close()
    fs, root = filesystem(url, storage_options)
    crcs = {}
    rows = slice(c0 * layout.positions, c1 * layout.positions)
    for h in hookpoints:
        array_at(sub, f"acts/{array_name(h)}")[rows] = np.concatenate(blocks[h])
        crcs[h] = zlib.crc32(fs.cat_file(shard_file(root, split, h, index)))
    fs.makedirs(f"{root}/{MARKERS}", exist_ok=True)
    write_marker(fs, marker_path(root, split, index), json.dumps({"crc32": crcs}).encode())
