"""A saved SAE's folder: its two files and the checksum that ties them (no torch: checking a folder
is part of commands that must answer at once)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
CHECKSUM = "weights_sha256"  # config.json's key: the sha256 of sae.safetensors as saved


def weights_intact(directory: Path) -> bool:
    """Whether an SAE folder's weights match the checksum its config.json holds (True without one)."""
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text())
        expected = meta.get(CHECKSUM)
        return expected is None or hashlib.sha256((directory / WEIGHTS_FILE).read_bytes()).hexdigest() == expected
    except (OSError, ValueError):
        return False
