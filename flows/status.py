"""`saeflow status SPEC`: where each stage of a spec stands (done, partial, missing) and where its outputs
are, read from the outputs themselves and the registry; nothing is computed or written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flows import done, paths
from flows.spec import RunSpec
from storage import activations as store


def spec_status(spec: RunSpec) -> dict:
    return {
        "spec": spec.name,
        "cache": _cache(spec),
        "saes": [_sae(spec, h, i) for h in spec.hookpoints for i in range(len(spec.sae))],
    }


def _cache(spec: RunSpec) -> dict:
    url, opts = paths.store_url(spec), paths.store_options(spec)
    if done.is_done("cache", spec):
        return {"state": "done", "store": url}
    if store.is_complete(url, opts):  # `saeflow cache` caches the held-out split again, the train split kept
        return {"state": "stale", "store": url, "why": "its held-out split was cached for other eval settings"}
    if store.planned_hash(url, opts) is None:
        return {"state": "missing", "store": url}
    group = store.open_group_for_status(url, opts)
    total = sum(store.layout_of(group, s).n_shards for s in store.cached_splits(group))
    left = len(store.missing_shards(url, opts))
    return {"state": "partial", "store": url, "shards_done": total - left, "shards": total}


def _sae(spec: RunSpec, hookpoint: str, index: int) -> dict:
    from storage.checkpoints import META_FILE  # (no torch)

    work, rel = spec.work, paths.sae_rel(spec, hookpoint, index)
    row: dict[str, Any] = {"sae": spec.model_name(hookpoint, index), "hookpoint": hookpoint, "dir": work.location(rel)}
    # complete checkpoints only: a step folder gets its meta file last
    steps = [
        name
        for name in work.listdir(f"{rel}/checkpoints")
        if name.startswith("step-") and work.exists(f"{rel}/checkpoints/{name}/{META_FILE}")
    ]
    if done.is_done("train", spec, hookpoint, index):
        row["train"] = {"state": "done"}
    elif steps:
        meta = json.loads(work.read_bytes(f"{rel}/checkpoints/{max(steps)}/{META_FILE}"))
        row["train"] = {
            "state": "partial",
            "tokens_done": meta["tokens"],
            "tokens": spec.train.tokens or spec.data.tokens,
            "last_checkpoint": work.location(f"{rel}/checkpoints/{max(steps)}"),
            "step": meta["steps"],
        }
    else:
        row["train"] = {"state": "missing"}
    metrics = f"{paths.eval_rel(spec, hookpoint, index)}/{paths.METRICS_FILE}"
    row["evaluate"] = (
        {"state": "done", "metrics": work.location(metrics)} if work.exists(metrics) else {"state": "missing"}
    )
    row["register"] = _registry(spec, hookpoint, index)
    return row


def _registry(spec: RunSpec, hookpoint: str, index: int) -> dict:
    uri = spec.tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return {"state": "missing", "tracking_uri": uri, "versions": []}  # opening it would create it
    from storage.registry import list_versions

    try:
        versions = list_versions(uri, spec.model_name(hookpoint, index))
    except Exception as e:  # the status of everything else is still worth printing
        return {"state": "unknown", "tracking_uri": uri, "error": " ".join(str(e).split())[:200]}
    found = done.registered(spec, hookpoint, index) if versions else None
    return {
        "state": "done" if found else "missing",
        "tracking_uri": uri,
        "model_uri": found.uri if found else None,
        "versions": versions,
    }


def format_status(status: dict) -> str:
    c = status["cache"]
    lines = [
        f"{status['spec']}",
        f"  cache     {c['state']:<8} {c['store']}"
        + (f"   ({c['shards_done']} of {c['shards']} shards)" if c["state"] == "partial" else "")
        + (f"   ({c['why']})" if c["state"] == "stale" else ""),
    ]
    for row in status["saes"]:
        t = row["train"]
        lines.append(f"  {row['sae']} ({row['hookpoint']})")
        lines.append(
            f"    train     {t['state']:<8} {row['dir']}"
            + (
                f"   ({t['tokens_done']:,} of {t['tokens']:,} tokens, checkpoint at step {t['step']})"
                if t["state"] == "partial"
                else ""
            )
        )
        e = row["evaluate"]
        lines.append(f"    evaluate  {e['state']:<8} {e.get('metrics', '')}")
        r = row["register"]
        versions = ", ".join(
            f"v{v['version']}" + (f" @{','.join(v['aliases'])}" if v["aliases"] else "") for v in r.get("versions", [])
        )
        lines.append(
            f"    register  {r['state']:<8} {r.get('model_uri') or ''}  [{r['tracking_uri']}]"
            + (f"   versions: {versions}" if versions else "")
            + (f"   {r['error']}" if "error" in r else "")
        )
    return "\n".join(lines)
