"""Where each stage's output lives: paths derived from the spec sections the stage reads, so that a
stage's output is found again exactly when those sections are unchanged."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from flows.spec import RunSpec, safe_name
from sae.files import weights_intact

# the spec sections each stage's output depends on (cache keys and output paths)
# the store is keyed by what its train split holds; its held-out split by the evaluation settings too,
# re-planned alone when they change (stages.plan_cache): a new eval.tokens caches no train row again
CACHE_SECTIONS = ("model", "data", "hookpoints")
EVAL_SPLIT_SECTIONS = CACHE_SECTIONS + ("eval.tokens", "eval.downstream_contexts")
TRAIN_ALL_SECTIONS = CACHE_SECTIONS + ("train", "sae")  # one training pass feeds every SAE of the spec

SAE_MARKER = "config.json"  # written last: a SAE folder is complete once it exists
SAE_WEIGHTS = "sae.safetensors"
METRICS_FILE = "metrics.json"  # written last in an evaluation folder
CHECKPOINTS = "checkpoints"


def train_parts(index: int) -> tuple[str, ...]:
    return CACHE_SECTIONS + ("train", f"sae.{index}")


def eval_parts(index: int) -> tuple[str, ...]:
    return train_parts(index) + ("eval",)


def register_parts(index: int) -> tuple[str, ...]:
    return eval_parts(index) + ("registry", "name")


# `*_rel` inside the work dir; `*_dir` the local copy this machine reads and writes
def store_url(spec: RunSpec) -> str:
    base, _ = spec.store_location()
    return f"{base.rstrip('/')}/{spec.part_hash(*CACHE_SECTIONS)}"


def store_options(spec: RunSpec) -> dict:
    return spec.store_location()[1]


def sae_rel(spec: RunSpec, hookpoint: str, index: int = 0) -> str:
    return f"saes/{spec.part_hash(*train_parts(index))}/{safe_name(hookpoint)}"


BROWSER_DIR = "browser"  # the feature browser, inside an SAE's evaluation folder


def eval_rel(spec: RunSpec, hookpoint: str, index: int = 0) -> str:
    return f"{sae_rel(spec, hookpoint, index)}/eval-{spec.part_hash(*eval_parts(index))}"


def sae_dir(spec: RunSpec, hookpoint: str, index: int = 0) -> Path:
    return spec.root / sae_rel(spec, hookpoint, index)


def eval_dir(spec: RunSpec, hookpoint: str, index: int = 0) -> Path:
    return spec.root / eval_rel(spec, hookpoint, index)


def metrics_path(spec: RunSpec, hookpoint: str, index: int = 0) -> Path:
    return eval_dir(spec, hookpoint, index) / METRICS_FILE


def is_trained(spec: RunSpec, hookpoint: str, indices) -> bool:
    """Whether the work dir holds the finished SAEs `indices` of a hookpoint, with weights that match
    their checksums (a remote work dir's are checked when they are fetched and loaded)."""
    return all(
        spec.work.exists(f"{sae_rel(spec, hookpoint, i)}/{name}")
        and (spec.work.remote or name != SAE_WEIGHTS or _intact(sae_dir(spec, hookpoint, i)))
        for i in indices
        for name in (SAE_MARKER, SAE_WEIGHTS)
    )


def _intact(directory: Path) -> bool:
    """sae.files.weights_intact, hashed once per version of the files in this process: a run asks
    several times (skip checks, the train stage, status), and a large SAE's hash takes seconds. Every
    load still checks the hash it reads."""
    try:
        stamp = tuple(
            (s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns)
            for s in (os.stat(directory / SAE_MARKER), os.stat(directory / SAE_WEIGHTS))
        )
    except OSError:
        return False
    return _intact_as_of(directory, stamp)


@functools.lru_cache(maxsize=1024)
def _intact_as_of(directory: Path, stamp: tuple) -> bool:
    return weights_intact(directory)


def fetch_sae(spec: RunSpec, hookpoint: str, index: int = 0) -> Path:
    """The trained SAE's folder on this machine (downloaded when the work dir is remote)."""
    return spec.work.fetch(sae_rel(spec, hookpoint, index)) if spec.work.remote else sae_dir(spec, hookpoint, index)
