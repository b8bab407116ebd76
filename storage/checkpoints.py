"""Training checkpoints: tensors in safetensors, the rest in JSON, each checkpoint written under a
temporary name and renamed into place, so a kill at any moment leaves the last complete one readable.
meta.json, written last, holds the sha256 of the tensors' file: a checkpoint whose bytes changed since
is never resumed from (the run falls back to the one before it)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads where tensors are written or read: status lists checkpoints without it
    import torch

STATE_FILE = "state.safetensors"
META_FILE = "meta.json"
CHECKSUM = "state_sha256"  # meta.json's key for the tensors' checksum
KEEP = 2

log = logging.getLogger(__name__)


class DamagedCheckpoint(ValueError):
    """A checkpoint's files do not match the checksum written with them."""


def _steps_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step-*") if (p / META_FILE).exists() and (p / STATE_FILE).exists())


def save_checkpoint(root: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{meta['steps']:09d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    from safetensors.torch import save

    data = save(tensors)
    (tmp / STATE_FILE).write_bytes(data)
    (tmp / META_FILE).write_text(json.dumps({**meta, CHECKSUM: hashlib.sha256(data).hexdigest()}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in _steps_dirs(root)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def steps_available(root: str | os.PathLike) -> list[int]:
    """Steps of the complete checkpoints under root, oldest first (not yet checked: see intact_steps)."""
    return [int(p.name.removeprefix("step-")) for p in _steps_dirs(Path(root))]


def intact_steps(root: str | os.PathLike) -> list[int]:
    """Steps of the checkpoints under root whose files match their checksums, oldest first; each
    damaged one is named in a warning."""
    good = []
    for step in steps_available(root):
        try:
            load_checkpoint(root, step)
        except DamagedCheckpoint as e:
            log.warning("%s: not resuming from it", e)
            continue
        good.append(step)
    return good


def load_checkpoint(root: str | os.PathLike, steps: int | None = None) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, meta) of the checkpoint at `steps` (default: the newest complete one), or None when
    there is none; DamagedCheckpoint when its files do not match their checksum."""
    available = steps_available(root)
    if not available or (steps is not None and steps not in available):
        return None
    path = Path(root) / f"step-{(steps if steps is not None else available[-1]):09d}"
    try:
        meta = json.loads((path / META_FILE).read_text())
        data = (path / STATE_FILE).read_bytes()
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(f"the checkpoint {path} cannot be read ({e})") from None
    if not isinstance(meta, dict) or CHECKSUM not in meta:
        raise DamagedCheckpoint(f"the checkpoint {path} has no checksum (damaged, or written before checksums)")
    if hashlib.sha256(data).hexdigest() != meta.pop(CHECKSUM):
        raise DamagedCheckpoint(f"the checkpoint {path} is damaged: {STATE_FILE} does not match its checksum")
    from safetensors.torch import load

    return load(data), meta
