"""Whole training runs on the CPU with the sparse products' two paths: MKL's CSR product (saeflow's
CPU path) and embedding_bag's backward (the path before it), alternated in one process on the
quality benchmark's cached rows of one SmolLM2 layer, so that AuxK's picks are real ones.

    python benchmarks/cpu_kernels.py [--layer 12] [--runs 1024:100000,4096:200000,16384:200000] [--repeats 2]

Prints each path's seconds per run (batch:tokens, 4096 latents, k 32, the defaults), and whether the
two paths' trained weights are equal to the bit. The rows come from quality.py's cache (the first
use of quality.py makes it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from quality import REAL, real_data  # noqa: E402

import sae.kernels  # noqa: E402
from sae import SAEConfig, TrainConfig, train_sae  # noqa: E402

CSR = sae.kernels._on_cpu


def run(rows: np.ndarray, batch: int, tokens: int, path: str) -> tuple[float, dict]:
    sae.kernels._on_cpu = CSR if path == "csr" else (lambda t: False)
    try:
        start = time.perf_counter()
        result = train_sae(
            SAEConfig(rows.shape[1], REAL["n_latents"], REAL["k"]),
            TrainConfig(batch_tokens=batch, tokens=tokens, seed=0),
            rows,
            progress=False,
        )
        return time.perf_counter() - start, result.sae.state_dict()
    finally:
        sae.kernels._on_cpu = CSR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", default="12")
    parser.add_argument("--runs", default="1024:100000,4096:200000,16384:200000", help="batch:tokens, ...")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = np.load(real_data(f"model.layers.{args.layer}")["train"], mmap_mode="r")
    rows.sum(dtype=np.float64)  # into the page cache before the first timed run
    print(f"{'batch':>6} {'tokens':>7} {'csr s':>14} {'embedding_bag s':>16} {'speed-up':>8}  weights")
    for spec in args.runs.split(","):
        batch, tokens = map(int, spec.split(":"))
        times: dict[str, list[float]] = {"csr": [], "eb": []}
        weights = {}
        for _ in range(args.repeats):
            for path in ("eb", "csr"):
                seconds, weights[path] = run(rows, batch, tokens, path)
                times[path].append(seconds)
        same = all(torch.equal(weights["csr"][k], weights["eb"][k]) for k in weights["csr"])
        csr, eb = np.mean(times["csr"]), np.mean(times["eb"])
        print(
            f"{batch:>6} {tokens:>7} {' / '.join(f'{t:.1f}' for t in times['csr']):>14} "
            f"{' / '.join(f'{t:.1f}' for t in times['eb']):>16} {eb / csr:>7.2f}x  {'equal' if same else 'differ'}",
            flush=True,
        )


if __name__ == "__main__":
    main()
