"""Plain configuration records for the SAE and its trainer (no I/O, no framework)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Literal

Normalization = Literal["none", "standardize", "dataset_scale"]
Precision = Literal["auto", "fp32", "bf16"]


@dataclass(frozen=True)
class SAEConfig:
    """Shape and architecture of one TopK SAE.

    normalization:
      - "standardize": per token, (x - mean_d(x)) / (std_d(x) + eps), undone on decode, as the
        released GPT-2 TopK SAEs do (the paper's §2.1 mean-subtraction + unit norm, up to sqrt(d)).
      - "dataset_scale": one scalar s computed once from a sample so that E||s x||^2 = d.
      - "none": raw activations.
    """

    d_in: int
    n_latents: int
    k: int
    encoder_bias: bool = False  # the paper's §2.3 equation has none; the released code has one
    normalization: Normalization = "standardize"
    # batchtopk: the k*B largest pre-activations of a training batch; at inference, the latents above
    # a threshold learnt in training (at most 4k per token)
    activation: Literal["topk", "batchtopk"] = "topk"

    def __post_init__(self) -> None:
        if self.d_in <= 0 or self.n_latents <= 0 or self.k <= 0:
            raise ValueError(f"d_in, n_latents and k must be positive, got {self}")
        if self.k > self.n_latents:
            raise ValueError(f"k={self.k} must not exceed n_latents={self.n_latents}")

    def to_dict(self) -> dict:
        return asdict(self)


Recipe = Literal["default", "paper"]
Decay = Literal["constant", "linear", "cosine"]

# The paper's released config: Adam lr 1e-4 at n_latents = 2**15 and batches of 131,072 tokens, lr
# ~ 1/sqrt(n) (PAPER-NOTES); constant; dead after 10M tokens; tied encoder init, not rescaled.
PAPER_LR_AT_32K = 1e-4
PAPER_DEAD_TOKENS = 10_000_000

# The default recipe's lr at 4096 latents and batches of 4096 tokens, with warmup and linear decay to
# zero. From lr sweeps on benchmarks/quality.py's synthetic "fewer-features" data (d 128, n 2048,
# k 16, batch 4096; held-out normalized MSE): at 524k tokens (128 steps) lr 2e-3 0.306, 4e-3 0.214,
# 8e-3 0.136, 8.5e-3 0.134, 1.6e-2 0.132, 1.7e-2 0.135, 3.4e-2 0.174; "more-features" at 524k: 2e-3 0.374, 4e-3 0.329, 8e-3
# 0.278, 1.6e-2 0.261; at 131k tokens (32 steps): 8.5e-3 0.331, 1.7e-2 0.280, 3.4e-2 0.278. The
# optimum is broad at 128+ steps and moves up in shorter runs, so the rule is 8.5e-3 at n 2048
# (6e-3 at n 4096), as 1/sqrt(n) like the paper's and as sqrt(batch) (Adam's batch rule), times
# sqrt(128 / steps) for runs shorter than 128 steps (at most 2x).
DEFAULT_LR_AT_4K = 6e-3
SHORT_RUN_STEPS = 128


def auto_lr(n_latents: int, batch_tokens: int = 4096, recipe: Recipe = "default", tokens: int | None = None) -> float:
    if recipe == "paper":
        return PAPER_LR_AT_32K * math.sqrt(2**15 / n_latents)
    lr = DEFAULT_LR_AT_4K * math.sqrt(2**12 / n_latents) * math.sqrt(batch_tokens / 4096)
    if tokens is not None:
        steps = max(1, tokens // batch_tokens)
        lr *= min(2.0, max(1.0, math.sqrt(SHORT_RUN_STEPS / steps)))
    return lr


@dataclass(frozen=True)
class TrainConfig:
    """How to train; every field left at None is derived from the run (n_latents, batch, tokens).

    recipe "default": lr from `auto_lr` with a warmup over 5% of the run and linear decay to zero,
    a dead-latent window of 5% of the run (at most the paper's 10M tokens) so that AuxK acts in
    short runs too, and the tied encoder scaled by least squares at init. recipe "paper": the
    paper's released recipe, to reproduce its numbers (constant lr, 10M-token window, tied init).
    """

    batch_tokens: int = 4096
    tokens: int | None = None  # None: one pass over the data (an iterator of unknown length needs it)
    recipe: Recipe = "default"
    lr: float | None = None  # None: auto_lr(n_latents, batch_tokens, recipe)
    lr_warmup_tokens: int | None = None  # None: 5% of tokens (default recipe), 0 (paper)
    lr_decay: Decay | None = None  # None: linear to zero (default recipe), constant (paper)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 6.25e-10  # gradients are batch means, hence the small eps
    grad_clip: float | None = None
    aux_k: int | None = None  # None: d_in / 2 (at most 512); the released config has 256, the paper's text 512
    aux_coef: float = 1 / 32
    dead_tokens: int | None = None  # None: 5% of tokens, at most 10M (default recipe); 10M (paper)
    fire_threshold: float = 1e-3  # "fired" = kept value above this, as in the released code
    multi_topk: bool = False  # L(k) + L(4k)/8 (§5.3)
    ema_decay: float | None = None  # e.g. 0.999: train with, and return, a bias-corrected weight EMA
    encoder_init: Literal["least_squares", "tied"] | None = None  # None: least_squares (default), tied (paper)
    geometric_median_samples: int = 32768
    seed: int = 0
    device: str = "cpu"
    # bf16: the encoder matmul and the top-k selection run under bf16 autocast; parameters, Adam
    # state, the sparse decoder and every gradient product stay float32. auto: bf16 on CUDA only
    # (on CPU bf16 matmuls are rarely faster and fp32 keeps resumes bitwise exact).
    precision: Precision = "auto"
    log_every: int = 20

    def __post_init__(self) -> None:
        if self.recipe not in ("default", "paper"):
            raise ValueError(f"recipe must be 'default' or 'paper', got {self.recipe!r}")
        for name in ("batch_tokens", "tokens", "dead_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    @property
    def paper(self) -> bool:
        return self.recipe == "paper"

    def with_tokens(self, tokens: int) -> "TrainConfig":
        return replace(self, tokens=tokens)

    def resolved_lr(self, n_latents: int) -> float:
        return self.lr if self.lr is not None else auto_lr(n_latents, self.batch_tokens, self.recipe, self.tokens)

    def warmup_tokens(self) -> int:
        if self.lr_warmup_tokens is not None:
            return self.lr_warmup_tokens
        return 0 if self.paper else self._budget() // 20

    def decay(self) -> Decay:
        return self.lr_decay or ("constant" if self.paper else "linear")

    def dead_window(self) -> int:
        if self.dead_tokens is not None:
            return self.dead_tokens
        return PAPER_DEAD_TOKENS if self.paper else max(self.batch_tokens, min(PAPER_DEAD_TOKENS, self._budget() // 20))

    def resolved_aux_k(self, d_in: int) -> int:
        if self.aux_k is not None:
            return self.aux_k
        return 256 if self.paper else min(512, max(1, d_in // 2))

    def scaled_encoder_init(self) -> bool:
        return (self.encoder_init or ("tied" if self.paper else "least_squares")) == "least_squares"

    def _budget(self) -> int:
        if self.tokens is None:
            raise ValueError("TrainConfig.tokens is unknown: give tokens=... (or train on data of known length)")
        return self.tokens

    def bf16(self) -> bool:
        """Whether the training forward runs under bf16 autocast."""
        return self.precision == "bf16" or (self.precision == "auto" and self.device.startswith("cuda"))
