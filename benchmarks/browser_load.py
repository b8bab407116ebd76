"""How long the feature browser of a wide SAE takes to open from disk in a real browser.

    python benchmarks/browser_load.py [--latents 32768] [--rows 16384] [--vocab 49152] [--repeats 5]

Builds a browser for `--latents` latents from random TopK codes of `--rows` held-out rows (k 32, token
ids drawn from `--vocab`, SmolLM2's size: the page's own data, not an SAE's quality, is timed; the
page loads everything but the latent shards), then times headless
Chromium (Debian's `chromium`) opening the overview and one latent from file://, each until its DOM is
dumped, minus the same browser opening an empty page (its own start). Median of `--repeats`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def opened(chromium: str, url: str, profile: Path, shows: str) -> float:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--allow-file-access-from-files"]
    start = time.perf_counter()
    done = subprocess.run(
        [chromium, *flags, f"--user-data-dir={profile}", "--dump-dom", url], capture_output=True, text=True
    )
    elapsed = time.perf_counter() - start
    if done.returncode != 0 or shows not in done.stdout:
        raise SystemExit(f"chromium did not show {shows!r} at {url}: {done.stderr[-300:]}")
    return elapsed


def main() -> None:
    from sae.browser import build_browser
    from sae.evaluation import FeatureSample

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latents", type=int, default=32768)
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Debian's chromium: apt-get install chromium")
    rng = np.random.default_rng(0)
    positions, k = 63, 32
    contexts = args.rows // positions
    rows = contexts * positions
    sample = FeatureSample(
        tokens=rng.integers(0, args.vocab, (contexts, positions + 1)),
        first_position=1,
        values=rng.random((rows, k), dtype=np.float32),
        indices=rng.integers(0, args.latents, (rows, k)),  # a repeat within a row is harmless here
        token_text=lambda t: f"t{t}",
    )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        index = build_browser(Path(tmp) / "browser", sample, args.latents, "load test", {"normalized_mse": 0.2})
        built = time.perf_counter() - start
        loaded = sum(p.stat().st_size for p in index.parent.rglob("*") if p.is_file() and "latents" not in p.parts)
        blank = Path(tmp) / "blank.html"
        blank.write_text("<html><body></body></html>")
        profile = Path(tmp) / "profile"
        latent = args.latents - 1
        pages = {  # what each must show once opened
            "empty page": (blank.as_uri(), "<body>"),
            "overview": (index.as_uri(), 'class="result"'),
            "latent": (index.as_uri() + f"#latent={latent}", f'id="latent-{latent}"'),
        }
        times = {
            name: statistics.median(opened(chromium, url, profile, shows) for _ in range(args.repeats))
            for name, (url, shows) in pages.items()
        }
    print(
        f"{args.latents} latents, {rows} rows: browser written in {built:.1f} s; the page loads {loaded / 1e6:.1f} MB"
    )
    for name in ("overview", "latent"):
        print(
            f"  {name:<9} {times[name] - times['empty page']:.2f} s beyond an empty page ({times[name]:.2f} s in all)"
        )


if __name__ == "__main__":
    main()
