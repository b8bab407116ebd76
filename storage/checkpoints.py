"""Training checkpoints: tensors in safetensors, the rest in JSON, each checkpoint written under a
temporary name and renamed into place, so a kill at any moment leaves the last complete one readable."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "state.safetensors"
META_FILE = "meta.json"
KEEP = 2


def _steps_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step-*") if (p / META_FILE).exists() and (p / STATE_FILE).exists())


def save_checkpoint(root: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{meta['steps']:09d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(tensors, tmp / STATE_FILE)
    (tmp / META_FILE).write_text(json.dumps(meta))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in _steps_dirs(root)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def steps_available(root: str | os.PathLike) -> list[int]:
    return [int(p.name.removeprefix("step-")) for p in _steps_dirs(Path(root))]


def load_checkpoint(root: str | os.PathLike, steps: int | None = None) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, meta) of the checkpoint at `steps` (default: the newest complete one), or None."""
    available = steps_available(root)
    if not available or (steps is not None and steps not in available):
        return None
    path = Path(root) / f"step-{(steps if steps is not None else available[-1]):09d}"
    return load_file(path / STATE_FILE), json.loads((path / META_FILE).read_text())
