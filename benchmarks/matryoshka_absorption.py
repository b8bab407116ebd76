"""Feature absorption, plain TopK against Matryoshka, on a planted dictionary with parent/child features.

    python benchmarks/matryoshka_absorption.py [--tokens 1048576] [--seeds 2]

The data (d 128): 32 parent features, each with 4 children that fire only when their parent does
(each with probability 0.4 then), and 64 independent features; every feature a random unit
direction, magnitudes lognormal, a little noise. An SAE that absorbs a parent into its children
learns child latents that carry the parent's direction and leaves the parent's latent silent
whenever a child fires. Measured on held-out tokens, per SAE:

- absorption: over tokens where a parent and at least one of its children fire, the share on which
  the parent's latent (the latent whose decoder row is closest to the parent's direction) is silent;
- the same share on tokens where the parent fires alone (a plain miss, for comparison);
- normalized MSE of the whole SAE and, for Matryoshka, of each prefix against plain TopK SAEs of
  the prefix's size trained on the same tokens (the issue's bound: within 10%): at k, and at the
  prefix's own L0 (a prefix keeps only those of a token's k latents that fall inside it; L0 is
  fractional, so the plain SAEs at the k just below and just above it, interpolated linearly).

Every SAE trains with saeflow's defaults (256 latents, k 8, batches of 4096) on the same tokens in
the same order; Matryoshka's groups are 32, 64 and 160 latents (prefixes of 32, 96 and 256), once
with all groups from the start (the default) and once with `matryoshka_ramp` 0.3 (the groups join
the top-k one by one over the first 30% of the run).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sae import SAEConfig, TopKSAE, TrainConfig, train_sae  # noqa: E402

D, PARENTS, CHILDREN, LONE = 128, 32, 4, 64
P_PARENT, P_CHILD, P_LONE = 0.06, 0.4, 0.04
N_LATENTS, K, BATCH = 256, 8, 4096
GROUPS = (32, 64, 160)


class Hierarchy:
    """The planted features: directions, and a sampler of (activations, which features fired)."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        n = PARENTS * (1 + CHILDREN) + LONE
        dirs = torch.randn(n, D, generator=g)
        self.directions = dirs / dirs.norm(dim=1, keepdim=True)
        self.mean = torch.randn(D, generator=g) * 0.5
        self.seed = seed

    def sample(self, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        parent = torch.rand(rows, PARENTS, generator=g) < P_PARENT
        child = (torch.rand(rows, PARENTS, CHILDREN, generator=g) < P_CHILD) & parent[..., None]
        lone = torch.rand(rows, LONE, generator=g) < P_LONE
        fired = torch.cat([parent, child.reshape(rows, -1), lone], dim=1)
        magnitude = torch.exp(0.3 * torch.randn(fired.shape, generator=g))
        x = (fired * magnitude) @ self.directions + self.mean + 0.02 * torch.randn(rows, D, generator=g)
        return x, fired


def nmse(x: torch.Tensor, recon: torch.Tensor) -> float:
    return float(((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def absorption(sae: TopKSAE, data: Hierarchy, x: torch.Tensor, fired: torch.Tensor) -> tuple[float, float]:
    """(share of parent-with-child tokens on which the parent's latent is silent, the same share on
    parent-alone tokens), pooled over the parents."""
    with torch.no_grad():
        active = sae.encode(x).dense(sae.cfg.n_latents) > 0
        cos = data.directions[:PARENTS] @ (sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)).T
    latent = cos.argmax(dim=1)  # each parent's latent
    parent = fired[:, :PARENTS]
    with_child = fired[:, PARENTS : PARENTS * (1 + CHILDREN)].reshape(-1, PARENTS, CHILDREN).any(-1)
    silent = ~active[:, latent]
    both, alone = parent & with_child, parent & ~with_child
    return float((silent & both).sum() / both.sum()), float((silent & alone).sum() / alone.sum())


def train(cfg: SAEConfig, rows: torch.Tensor, seed: int, ramp: float = 0.0) -> TopKSAE:
    tcfg = TrainConfig(batch_tokens=BATCH, tokens=len(rows), seed=seed, matryoshka_ramp=ramp)
    return train_sae(cfg, tcfg, rows, progress=False).sae


class PlainSAEs:
    """Plain TopK SAEs on one seed's training tokens, each size and k trained once: held-out nMSE."""

    def __init__(self, rows: torch.Tensor, held: torch.Tensor, seed: int):
        self.rows, self.held, self.seed = rows, held, seed
        self.found: dict[tuple[int, int], float] = {}

    def nmse(self, latents: int, k: int) -> float:
        if (latents, k) not in self.found:
            sae = train(SAEConfig(D, latents, k), self.rows, self.seed)
            with torch.no_grad():
                self.found[latents, k] = nmse(self.held, sae(self.held))
        return self.found[latents, k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2**20)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"{'seed':>4} {'SAE':<24} {'nMSE':>7} {'absorbed':>9} {'missed alone':>12} {'s':>5}")
    for seed in range(args.seeds):
        data = Hierarchy(seed)
        rows, _ = data.sample(args.tokens, seed=1000 + seed)
        held, fired = data.sample(32768, seed=2000 + seed)
        plain = PlainSAEs(rows, held, seed)
        for name, cfg, ramp in (
            ("topk", SAEConfig(D, N_LATENTS, K), 0.0),
            ("matryoshka 32/64/160", SAEConfig(D, N_LATENTS, K, matryoshka=GROUPS), 0.0),
            ("  the same, ramp 0.3", SAEConfig(D, N_LATENTS, K, matryoshka=GROUPS), 0.3),
        ):
            start = time.time()
            sae = train(cfg, rows, seed, ramp)
            with torch.no_grad():
                error = nmse(held, sae(held))
                codes = sae.encode(held)
            absorbed, missed = absorption(sae, data, held, fired)
            print(f"{seed:>4} {name:<24} {error:>7.4f} {absorbed:>9.1%} {missed:>12.1%} {time.time() - start:>5.0f}")
            for end in sae.cfg.prefix_ends()[:-1] if sae.cfg.matryoshka else ():
                with torch.no_grad():
                    prefix = nmse(held, sae.decode(codes.prefix(end)))
                    l0 = float((codes.prefix(end).values > 0).sum(1).float().mean())
                below, above = max(1, math.floor(l0)), max(1, math.ceil(l0))
                lo, hi, at_k = plain.nmse(end, below), plain.nmse(end, above), plain.nmse(end, K)
                at_l0 = lo + (l0 - below) * (hi - lo)
                print(
                    f"{seed:>4}   {'its first ' + str(end):<22} {prefix:>7.4f}   L0 {l0:.1f}: a plain {end}-latent "
                    f"SAE at k {below} / {above} {lo:.4f} / {hi:.4f}, at L0 {at_l0:.4f}: {prefix / at_l0:.2f}x; "
                    f"at k {K} {at_k:.4f}: {prefix / at_k:.2f}x"
                )


if __name__ == "__main__":
    main()
