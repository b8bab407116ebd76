"""Synthetic activations with a known dictionary, for measuring how well an SAE recovers it.

Each token is a sparse non-negative combination of `n_features` true directions in R^d, plus a fixed
mean offset (real residual streams are far from centred) and isotropic Gaussian noise:

    x = mu + sum_i  fire_i * m_i * f_i  + sigma * eps

- firing: feature i fires with probability p_i proportional to (i + 1)^(-alpha) (a power law, as
  latent frequencies of real SAEs are), scaled so that `active` features fire per token on average.
  With `group` > 1 the firing is correlated: a Gaussian copula in which the features of one group
  (consecutive indices) share a common factor with weight `rho`.
- magnitudes: lognormal(0, `magnitude_sigma`), independent of firing.
- directions: random unit vectors; with `group` > 1 the members of a group also share a common
  direction (cosine ~ `direction_share`), so they are harder to tell apart.
- noise: `noise` is sigma relative to the RMS norm of the signal part, so regimes are comparable.

Only torch is imported, so the peers' venv can import this file to draw the same data: every batch
is a pure function of (regime, seed, batch index).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Regime:
    name: str
    n_features: int = 2048
    alpha: float = 1.0
    active: float = 24.0
    noise: float = 0.05
    group: int = 1
    rho: float = 0.0
    direction_share: float = 0.0
    magnitude_sigma: float = 0.5
    d: int = 256

    def to_dict(self) -> dict:
        return asdict(self)


REGIMES = {
    r.name: r
    for r in (
        Regime("fewer-features"),  # 2048 true features for 4096 latents: a full recovery is possible
        Regime("more-features", n_features=16384),  # 4x more true features than latents
        Regime("steep", alpha=1.6),  # a steep power law: many very rare features
        Regime("correlated", group=8, rho=0.6, direction_share=0.3),
        Regime("noisy", noise=0.3),
    )
}


class PlantedDictionary:
    """The generator of one regime: a fixed dictionary and firing law drawn from `seed`."""

    def __init__(self, regime: Regime, seed: int = 0):
        self.regime = r = regime
        # an offset seed: a generator seeded like an SAE's init (seed 0) would draw its decoder rows
        g = torch.Generator().manual_seed(7919 * seed + 104_729)
        directions = torch.randn(r.n_features, r.d, generator=g)
        if r.group > 1:
            shared = torch.randn(r.n_features // r.group, r.d, generator=g)
            shared = shared / shared.norm(dim=1, keepdim=True)
            directions = directions / directions.norm(dim=1, keepdim=True)
            w = r.direction_share**0.5
            directions = w * shared.repeat_interleave(r.group, 0) + (1 - r.direction_share) ** 0.5 * directions
        self.features = directions / directions.norm(dim=1, keepdim=True)  # (F, d), unit rows
        ranks = torch.arange(1, r.n_features + 1, dtype=torch.float64)
        p = ranks ** (-r.alpha)
        self.p_fire = (p * r.active / p.sum()).clamp(max=0.9).float()
        self.mean = torch.randn(r.d, generator=g) * 0.5
        # Gaussian-copula thresholds: feature i fires when its unit-variance score exceeds z_i
        self.n_frequent = int((self.p_fire >= 0.02).sum())  # p_fire is non-increasing
        self.z_fire = torch.distributions.Normal(0.0, 1.0).icdf(1 - self.p_fire)
        self.seed = seed
        # noise scale from the signal's RMS norm: E||sum m f||^2 ~ active * E[m^2]
        signal_rms = (r.active * torch.exp(torch.tensor(2 * r.magnitude_sigma**2))).sqrt()
        self.sigma = float(r.noise * signal_rms / r.d**0.5)

    def batch(self, index: int, size: int) -> torch.Tensor:
        """Batch `index` of the stream (a (size, d) float32 tensor), the same on every call."""
        r = self.regime
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index + 1)
        if r.group > 1:
            common = torch.randn(size, r.n_features // r.group, generator=g).repeat_interleave(r.group, 1)
            score = r.rho**0.5 * common + (1 - r.rho) ** 0.5 * torch.randn(size, r.n_features, generator=g)
            rows, cols = (score > self.z_fire).nonzero(as_tuple=True)
        else:
            # independent firing. The frequent features draw a Bernoulli per token; the rare ones
            # (p < 0.02, most of them) draw Binomial(size, p_i) tokens uniformly, in O(fires), where
            # a token drawn twice for one feature (rare at that p) gets the sum of two magnitudes
            rows_f, cols_f = (torch.rand(size, self.n_frequent, generator=g) < self.p_fire[: self.n_frequent]).nonzero(
                as_tuple=True
            )
            p_rare = self.p_fire[self.n_frequent :]
            counts = torch.binomial(torch.full_like(p_rare, size), p_rare, generator=g).long()
            cols_r = self.n_frequent + torch.repeat_interleave(torch.arange(len(p_rare)), counts)
            rows = torch.cat([rows_f, torch.randint(0, size, (len(cols_r),), generator=g)])
            cols = torch.cat([cols_f, cols_r])
        magnitude = torch.exp(torch.randn(len(rows), generator=g) * r.magnitude_sigma)
        signal = torch.zeros(size, r.d).index_add_(0, rows, self.features[cols] * magnitude[:, None])
        return self.mean + signal + torch.randn(size, r.d, generator=g) * self.sigma


def held_out(gen: PlantedDictionary, rows: int) -> torch.Tensor:
    """Rows no training stream reaches (negative batch indices)."""
    return gen.batch(-1, rows)
