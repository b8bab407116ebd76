"""Headless Chromium for the browser tests: the rendered DOM, screenshots, and the pixels of a colour
in a screenshot (what was drawn, not only what the DOM says)."""

import shutil
import subprocess

import numpy as np

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(tmp_path, url, *extra):
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--allow-file-access-from-files",
        "--virtual-time-budget=5000",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    assert CHROMIUM is not None
    return subprocess.run([CHROMIUM, *flags, *extra, url], capture_output=True, text=True, timeout=120)


def screenshot(tmp_path, url, name: str, size: str = "1100,1300") -> np.ndarray:
    """The page at `url` as rendered: an (height, width, 3) array of its pixels."""
    from PIL import Image

    shot = tmp_path / f"{name}.png"
    chromium(tmp_path, url, f"--window-size={size}", f"--screenshot={shot}")
    return np.asarray(Image.open(shot).convert("RGB"))


def pixels_of(image: np.ndarray, hex_colour: str) -> int:
    """How many pixels of the image have exactly this colour (#rrggbb)."""
    rgb = [int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)]
    return int((image == rgb).all(axis=-1).sum())
