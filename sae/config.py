"""Plain configuration records for the SAE and its trainer (no I/O, no framework)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
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


# Released config: lr 1e-4 at n_latents = 2**15; the paper finds lr ~ 1/sqrt(n) (PAPER-NOTES).
AUTO_LR_AT_32K = 1e-4


def auto_lr(n_latents: int) -> float:
    return AUTO_LR_AT_32K * math.sqrt(2**15 / n_latents)


@dataclass(frozen=True)
class TrainConfig:
    """The paper's recipe; each default is the paper's (or its released code's) value."""

    batch_tokens: int = 4096
    tokens: int = 1_000_000
    lr: float | None = None  # None: auto_lr(n_latents)
    lr_warmup_tokens: int = 0
    lr_decay: Literal["constant", "linear", "cosine"] = "constant"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 6.25e-10  # gradients are batch means, hence the small eps
    grad_clip: float | None = None
    aux_k: int = 256  # released config; the paper's text says 512; others use d/2
    aux_coef: float = 1 / 32
    dead_tokens: int = 10_000_000  # a latent is dead after this many tokens without firing
    fire_threshold: float = 1e-3  # "fired" = kept value above this, as in the released code
    multi_topk: bool = False  # L(k) + L(4k)/8 (§5.3)
    ema_decay: float | None = None  # e.g. 0.999: train with, and return, a bias-corrected weight EMA
    geometric_median_samples: int = 32768
    seed: int = 0
    device: str = "cpu"
    # bf16: the encoder matmul and the top-k selection run under bf16 autocast; parameters, Adam
    # state, the sparse decoder and every gradient product stay float32. auto: bf16 on CUDA only
    # (on CPU bf16 matmuls are rarely faster and fp32 keeps resumes bitwise exact).
    precision: Precision = "auto"
    log_every: int = 20

    def resolved_lr(self, n_latents: int) -> float:
        return self.lr if self.lr is not None else auto_lr(n_latents)

    def bf16(self) -> bool:
        """Whether the training forward runs under bf16 autocast."""
        return self.precision == "bf16" or (self.precision == "auto" and self.device.startswith("cuda"))
