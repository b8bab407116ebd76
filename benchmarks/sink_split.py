"""Where a real cell's plain normalized MSE comes from: the attention sinks' rows or the others.

    python benchmarks/sink_split.py LAYER BATCH TOKENS    # e.g. 12 4096 200000

At SmolLM2's layers 12-27 a few held-out rows (attention sinks, `quality.massive_rows`) carry
77-98% of the variance, so the plain nMSE of quality.py is mostly their error. This splits it, for
saeflow (trained again at its defaults, seed 0, on the cell's rows) and for sparsify (its held-out
reconstruction as the last `quality.py` run saved it, from its run to the largest budget), into
sum over sink rows ||x - x_hat||^2 / total and the same over the other rows (the two add up to the
plain nMSE), with the sinks' own relative error and their reconstruction's cosine and length.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from quality import DATA, REAL_BUDGETS, massive_rows, peer_run_path, real_data, run_saeflow  # noqa: E402


def split(held: np.ndarray, recon: np.ndarray) -> str:
    sinks = massive_rows(held)
    total = ((held - held.mean(0)) ** 2).sum()
    err = ((held - recon) ** 2).sum(1)
    plain, on_sinks, on_others = err.sum() / total, err[sinks].sum() / total, err[~sinks].sum() / total
    x, r = held[sinks], recon[sinks]
    cos = ((x * r).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(r, axis=1)).mean()
    length = (np.linalg.norm(r, axis=1) / np.linalg.norm(x, axis=1)).mean()
    relative = (err[sinks] / (x**2).sum(1)).mean()
    return (
        f"plain {plain:.4f} = sinks {on_sinks:.4f} + others {on_others:.4f}; "
        f"the sinks' relative error {relative:.2%}, cosine {cos:.4f}, length {length:.3f}x"
    )


def main() -> None:
    layer, batch, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(2)
    data = real_data(f"model.layers.{layer}")
    data["shape"] = dict(data["shape"], batch=batch)
    rows = data["held_rows"]
    held = np.load(data["held"]).astype(np.float64)[:rows]
    sinks, spread = massive_rows(held), (held - held.mean(0)) ** 2
    share = spread[sinks].sum() / spread.sum()
    print(f"L{layer}/b{batch} {tokens}: {sinks.sum()} sink rows of {rows}, {share:.1%} of the variance")
    trained = run_saeflow(data, tokens, "defaults")[tokens]["recon"].astype(np.float64)[:rows]
    print(f"  saeflow:  {split(held, trained)}")
    run = peer_run_path(DATA / "runs", f"L{layer}/b{batch}", "sparsify", "defaults", REAL_BUDGETS[-1], 0)
    saved = run.with_suffix(".recon.npy" if tokens == REAL_BUDGETS[-1] else f".{tokens}.recon.npy")
    if not saved.exists():
        print(f"  sparsify: no saved reconstruction at {saved}: run quality.py first")
        return
    print(f"  sparsify: {split(held, np.load(saved).astype(np.float64)[:rows])}")


if __name__ == "__main__":
    main()
