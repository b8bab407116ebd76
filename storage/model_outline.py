"""A model's outline (its width and module names), cached by the hash of its config file.

Checking a spec's hookpoints needs the names of the model's modules, which transformers gives by
building the model on the meta device: a few seconds of imports. The outline depends only on the
config file and the transformers version, so it is kept under that key and read back without torch
or transformers: `validate`, `status` and `plan` then answer at once from the second call on.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path


@dataclass(frozen=True)
class Outline:
    d_model: int
    modules: tuple[str, ...]


def cache_dir() -> Path:
    """$SAEFLOW_CACHE_DIR, else saeflow/outlines under $XDG_CACHE_HOME (default ~/.cache)."""
    if os.environ.get("SAEFLOW_CACHE_DIR"):
        return Path(os.environ["SAEFLOW_CACHE_DIR"]) / "outlines"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "saeflow" / "outlines"


def config_file(source: str, converted: Path, online: bool) -> Path | None:
    """The config.json this machine holds for `source`: its converted copy (a GGUF dequantised by an
    earlier run), a model directory's own, or (offline only: online may fetch a newer one) the
    hub cache's; None where there is none yet."""
    for path in (converted / "config.json", Path(source) / "config.json"):
        if path.is_file():
            return path
    if online or source.startswith("builtin:") or source.endswith(".gguf") or source.count("/") != 1:
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(source, "config.json")
    return Path(found) if isinstance(found, str) else None


def outline_key(config: Path) -> str:
    """The config file's bytes and the transformers version that names the modules."""
    digest = hashlib.sha256(config.read_bytes())
    digest.update(version("transformers").encode())
    return digest.hexdigest()


def _cached(path: Path, key: str) -> Outline | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    modules, d_model = data.get("modules"), data.get("d_model")
    if data.get("key") != key or not isinstance(d_model, int) or not isinstance(modules, list):
        return None  # another key's file, or damaged: recomputed
    return Outline(d_model, tuple(str(m) for m in modules))


def _save(path: Path, key: str, outline: Outline) -> None:
    """Written whole (a temporary file renamed), so a reader sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, "d_model": outline.d_model, "modules": list(outline.modules)}))
    os.replace(tmp, path)


def model_outline(source: str, converted: Path, online: bool = False) -> Outline:
    """The outline of `source` (converted: where a GGUF source's dequantised copy lives). Raises
    what transformers raises (OSError, ValueError, KeyError) for a model it cannot read."""
    config = config_file(source, converted, online)
    key = outline_key(config) if config else None
    if key and (found := _cached(cache_dir() / f"{key}.json", key)):
        return found
    from sae.lm import load_config, module_names

    hf_config = load_config(str(converted) if (converted / "config.json").is_file() else source, local_only=not online)
    outline = Outline(hf_config.hidden_size, tuple(module_names(hf_config)))
    if key:
        try:
            _save(cache_dir() / f"{key}.json", key, outline)
        except OSError:
            pass  # a read-only home: the next call computes it again
    return outline
