"""The paper's scaling laws (§3), fitted to measured losses, and a compute planner built on them.

- L(x) = a · x^(-b) + c: loss against latents at convergence (L(N)) or against compute on the
  frontier (L(C)), with an irreducible term c;
- the joint law in latents n and sparsity k:
  L(n, k) = exp(α + β_k log k + β_n log n + γ log k log n) + exp(ζ + η log k).

Fits are least squares on log L (the losses span decades), with parameter standard errors from the
fit's covariance; predictions carry an uncertainty from the same covariance (delta method).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class Fit:
    law: str  # "power" or "joint"
    params: dict[str, float]
    stderr: dict[str, float]
    rms_log_residual: float  # root mean square of log(L) - log(fit)
    points: int
    cov: list[list[float]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return asdict(self)

    def predict(self, *args: float) -> float:
        return float(_LAWS[self.law](np.asarray(args, dtype=float)[:, None], *self.params.values())[0])

    def predict_with_error(self, *args: float) -> tuple[float, float]:
        """The predicted loss and its standard error (delta method on log L)."""
        theta = np.array(list(self.params.values()))
        x = np.asarray(args, dtype=float)[:, None]

        def log_loss(t):
            return math.log(_LAWS[self.law](x, *t)[0])

        grad = np.array(
            [
                (log_loss(theta + step) - log_loss(theta - step)) / (2 * h)
                for step, h in ((np.eye(len(theta))[i] * _h(theta[i]), _h(theta[i])) for i in range(len(theta)))
            ]
        )
        value = math.exp(log_loss(theta))
        var = float(grad @ np.asarray(self.cov) @ grad) if self.cov else 0.0
        return value, value * math.sqrt(max(var, 0.0))


def _h(v: float) -> float:
    return 1e-6 * max(abs(v), 1.0)


def power_law(x, log_a, b, log_c):
    """a x^-b + c, with a and c kept positive through their logs."""
    return np.exp(log_a) * np.power(x[0], -b) + np.exp(log_c)


def joint_law(x, alpha, beta_k, beta_n, gamma, zeta, eta):
    n, k = np.log(x[0]), np.log(x[1])
    return np.exp(alpha + beta_k * k + beta_n * n + gamma * k * n) + np.exp(zeta + eta * k)


_LAWS = {"power": power_law, "joint": joint_law}
_NAMES = {"power": ("log_a", "b", "log_c"), "joint": ("alpha", "beta_k", "beta_n", "gamma", "zeta", "eta")}


def _fit(law: str, x: np.ndarray, loss: np.ndarray, start) -> Fit:
    from scipy.optimize import curve_fit

    loss = np.asarray(loss, dtype=float)
    if np.any(loss <= 0) or not np.all(np.isfinite(loss)):
        raise ValueError("scaling fits need positive, finite losses")
    names = _NAMES[law]
    if len(loss) <= len(names):
        raise ValueError(f"the {law} law has {len(names)} parameters: fit it to more than {len(names)} points")

    def model(xs, *t):
        return np.log(_LAWS[law](xs, *t))

    theta, cov = curve_fit(model, x, np.log(loss), p0=start, maxfev=20000)
    residual = np.log(loss) - model(x, *theta)
    cov = np.where(np.isfinite(cov), cov, 0.0)
    return Fit(
        law,
        dict(zip(names, map(float, theta))),
        dict(zip(names, map(float, np.sqrt(np.diag(cov))))),
        float(np.sqrt(np.mean(residual**2))),
        len(loss),
        cov.tolist(),
    )


def fit_power_law(x, loss) -> Fit:
    """L(x) = a x^-b + c (x: latents at convergence, or compute)."""
    x = np.asarray(x, dtype=float)
    loss = np.asarray(loss, dtype=float)
    floor = max(loss.min() * 0.5, 1e-12)
    slope = -np.polyfit(np.log(x), np.log(np.maximum(loss - floor, 1e-12)), 1)[0]
    start = (math.log(max(loss.max() - floor, 1e-12)) + slope * math.log(x.min()), max(slope, 0.05), math.log(floor))
    return _fit("power", x[None, :], loss, start)


def fit_joint_law(n, k, loss) -> Fit:
    """The joint L(n, k) of §3 over a grid of (latents, k)."""
    x = np.stack([np.asarray(n, dtype=float), np.asarray(k, dtype=float)])
    return _fit("joint", x, loss, PAPER_JOINT_LAW_START)


# The paper's GPT-4 joint fit (§3; α, β_k, β_n, γ, ζ, η as our notes give them, unchecked): a starting
# point for fits, and the shape of the planner's allocation when no sweep of the model has been fitted.
PAPER_JOINT_LAW_START = (-0.50, 0.25, -0.017, -0.042, -1.32, -0.085)


def paper_joint_law() -> Fit:
    params = dict(zip(_NAMES["joint"], PAPER_JOINT_LAW_START))
    return Fit("joint", params, {name: float("nan") for name in params}, float("nan"), 0, [])


# planner -------------------------------------------------------------------------------------------
TOKENS_TO_CONVERGENCE_EXPONENT = 0.6  # §3: tokens to convergence grow about as n^0.6 (GPT-2 small)


def training_flops(d_model: int, n_latents: int, tokens: int) -> float:
    """The dense work of training: the encoder matmul, 2·d·n per token forward (the rest is sparse)."""
    return 2.0 * d_model * n_latents * tokens


@dataclass(frozen=True)
class Recommendation:
    n_latents: int
    k: int
    tokens: int
    flops: float
    predicted_loss: float
    predicted_loss_stderr: float
    tokens_to_convergence: int


def recommend(budget_flops: float, d_model: int, k: int, law: Fit, tokens_at_4096: float = 4e7) -> Recommendation:
    """The largest power-of-two n whose training to convergence (tokens_at_4096 · (n/4096)^0.6 tokens)
    fits the budget; the law (at convergence) predicts its loss. k is the sparsity the user wants:
    the law's loss falls with k, so k is a choice of interpretability, not of compute."""
    best = None
    n = 256
    while True:
        tokens = tokens_at_4096 * (n / 4096) ** TOKENS_TO_CONVERGENCE_EXPONENT
        if training_flops(d_model, n, int(tokens)) > budget_flops or n > 2**26:
            break
        if n >= 2 * k:
            best = (n, int(tokens))
        n *= 2
    if best is None:
        raise ValueError(
            f"a budget of {budget_flops:.3g} FLOPs cannot train even {max(256, 2 * k)} latents at "
            f"d_model {d_model} to convergence: raise the budget"
        )
    n, tokens = best
    loss, err = law.predict_with_error(n, k)
    # spend the rest of the budget on more tokens at that n: beyond convergence it only helps
    spend = int(budget_flops / (2.0 * d_model * n))
    return Recommendation(n, k, spend, training_flops(d_model, n, spend), loss, err, tokens)


def l0_frontier(l0, loss) -> list[bool]:
    """Which points lie on the loss-vs-L0 frontier (the curve SAEs are compared on, §3): no other point
    has an L0 at most as large and a strictly lower loss."""
    points = list(zip(l0, loss))
    return [not any(l2 <= l1 and m2 < m1 for l2, m2 in points) for l1, m1 in points]


def compute_frontier(flops, loss) -> list[bool]:
    """Which (training compute, loss) points lie on the compute-efficient frontier (§3, L(C)): no
    point of at most the same compute has a lower loss."""
    points = list(zip(flops, loss))
    return [not any(c2 <= c1 and m2 < m1 for c2, m2 in points) for c1, m1 in points]
