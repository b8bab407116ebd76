"""What each stage has finished, read back from its outputs and the registry; nothing is computed or
written. The pipeline skips what is done by it, and `saeflow status` reports it (without the
libraries the stages compute with, so that it answers at once)."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

from flows.locks import exclusive
from flows.paths import (
    EVAL_SPLIT_SECTIONS,
    METRICS_FILE,
    eval_rel,
    fetch_sae,
    is_trained,
    register_parts,
    sae_dir,
    sae_rel,
    store_options,
    store_url,
)
from flows.spec import RunSpec
from sae.files import CHECKSUM as WEIGHTS_CHECKSUM
from storage import activations as store
from storage.registry import file_sha256, find_registered


def is_done(stage: str, spec: RunSpec, hookpoint: str | None = None, index: int | list[int] | None = None) -> bool:
    """Whether a stage's output exists in the work dir: for train, every SAE of the hookpoint unless
    `index` is given."""
    if stage == "cache":  # complete, and its held-out split the one the evaluation settings ask for
        url, opts = store_url(spec), store_options(spec)
        held_out = store.planned_hash(url, opts, "eval_hash") == spec.part_hash(*EVAL_SPLIT_SECTIONS)
        return held_out and store.is_complete(url, opts)
    if hookpoint is None:
        raise ValueError(f"the {stage} stage's outputs are per hookpoint: name one")
    if stage == "train":  # index: one SAE, a group of them (list), or None for all
        return is_trained(
            spec, hookpoint, range(len(spec.sae)) if index is None else index if isinstance(index, list) else [index]
        )
    if not isinstance(index, int):
        raise ValueError(f"the {stage} stage's outputs are per SAE: give its index")
    if stage == "evaluate":  # and of the weights there now
        return spec.work.exists(f"{eval_rel(spec, hookpoint, index)}/{METRICS_FILE}") and scored_weights(
            spec, hookpoint, index
        ) == weights_sha256(spec, hookpoint, index)
    found = registered(spec, hookpoint, index)
    return found is not None and decided(spec, found)


def decided(spec: RunSpec, found) -> bool:
    """Whether registry.promote_if (if the spec has one) has decided on the registered version."""
    from storage.registry import PROMOTION_TAG, model_version

    rule = spec.registry.promote_if
    return rule is None or model_version(f"models:/{found.name}/{found.version}").tags.get(PROMOTION_TAG) == rule.alias


def existing_output(
    stage: str, spec: RunSpec, hookpoint: str | None = None, index: int | list[int] | None = None
) -> Any:
    """What a finished stage returns, read back from its outputs; None when the stage has not finished."""
    if stage == "cache":
        return store_url(spec) if is_done("cache", spec) else None
    if hookpoint is None:
        raise ValueError(f"the {stage} stage's outputs are per hookpoint: name one")
    if stage == "train":
        return (
            [str(sae_dir(spec, hookpoint, i)) for i in (index if isinstance(index, list) else range(len(spec.sae)))]
            if is_done("train", spec, hookpoint, index)
            else None
        )
    if not isinstance(index, int):
        raise ValueError(f"the {stage} stage's outputs are per SAE: give its index")
    if stage == "evaluate":
        return stored_metrics(spec, hookpoint, index) if is_done("evaluate", spec, hookpoint, index) else None
    found = registered(spec, hookpoint, index)
    return None if found is None or not decided(spec, found) else found.uri


SCORED_FILE = "scored.json"  # beside metrics.json: the sha256 of the weights it measured


def _json(spec: RunSpec, rel: str) -> dict:
    try:
        found = json.loads(spec.work.read_bytes(rel))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def weights_sha256(spec: RunSpec, hookpoint: str, index: int) -> str | None:
    """The checksum the trained SAE's config.json holds for its weights."""
    return _json(spec, f"{sae_rel(spec, hookpoint, index)}/config.json").get(WEIGHTS_CHECKSUM)


def scored_weights(spec: RunSpec, hookpoint: str, index: int) -> str | None:
    """The checksum of the weights an evaluation measured."""
    return _json(spec, f"{eval_rel(spec, hookpoint, index)}/{SCORED_FILE}").get(WEIGHTS_CHECKSUM)


def registered(spec: RunSpec, hookpoint: str, index: int):
    with registry_lock(spec.tracking_uri()):
        return find_version(spec, hookpoint, index)


def find_version(spec: RunSpec, hookpoint: str, index: int):
    """The registered version of this spec and of the trained weights (any weights if there are none)."""
    weights = sae_dir(spec, hookpoint, index) / "sae.safetensors"
    if spec.work.remote and not weights.exists() and is_done("train", spec, hookpoint, index):
        fetch_sae(spec, hookpoint, index)
    return find_registered(
        spec.tracking_uri(),
        spec.model_name(hookpoint, index),
        spec.registry.alias,
        spec.part_hash(*register_parts(index)),
        file_sha256(weights) if weights.exists() else None,
    )


def registry_lock(uri: str):
    """A SQLite registry is one file: processes take turns on it (its first set-up is not concurrent-safe)."""
    if uri.startswith("sqlite:///"):
        return exclusive(Path(uri.removeprefix("sqlite:///") + ".lock"), "the MLflow database")
    return contextlib.nullcontext()


class NonFiniteError(ValueError):
    """A result holds NaN or infinity: it is never written as done, registered or promoted."""


def check_finite_metrics(metrics: dict, what: str) -> dict:
    bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        listed = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise NonFiniteError(
            f"{what} has non-finite metrics ({listed}): the SAE or its evaluation data is "
            "broken; retrain it (and check the activation store) before evaluating again"
        )
    return metrics


def read_metrics(path: Path) -> dict:
    return check_finite_metrics(json.loads(path.read_text()), str(path))


def stored_metrics(spec: RunSpec, hookpoint: str, index: int = 0) -> dict:
    """metrics.json of an evaluation, read from the work dir."""
    rel = f"{eval_rel(spec, hookpoint, index)}/{METRICS_FILE}"
    return check_finite_metrics(json.loads(spec.work.read_bytes(rel)), spec.work.location(rel))
