"""Training loop for TopK SAEs: the recipe of Gao et al. 2024 (§2.3, §A), one readable loop."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from sae.config import SAEConfig, TrainConfig
from sae.geometric_median import geometric_median
from sae.kernels import sparse_decode, topk_encode
from sae.model import TopKSAE


@dataclass
class LossParts:
    loss: torch.Tensor
    mse: torch.Tensor  # normalised by the constant from `init_from_sample`
    aux: torch.Tensor
    values: torch.Tensor  # (B, k) kept values of the main TopK
    indices: torch.Tensor


@dataclass
class DeadLatentTracker:
    """Tokens since each latent last fired; dead = not fired for `dead_tokens` tokens (§A.2)."""

    tokens_since_fired: torch.Tensor
    dead_tokens: int
    threshold: float

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.dead_tokens

    def update(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        self.tokens_since_fired += values.shape[0]
        self.tokens_since_fired[indices[values > self.threshold]] = 0


@torch.no_grad()
def init_from_sample(sae: TopKSAE, sample: torch.Tensor, use_geometric_median: bool = True) -> float:
    """Sets the data-dependent constants from a raw sample; returns the MSE scale.

    The MSE scale is 1 / E||x - mean(x)||^2 on the sample, fixed for the whole run: the paper
    normalises the loss once, never per batch.
    """
    if sae.cfg.normalization == "dataset_scale":
        sae.input_scale.fill_(math.sqrt(sae.cfg.d_in / sample.float().pow(2).sum(-1).mean().item()))
    x, _ = sae.normalize(sample)
    if use_geometric_median:
        sae.b_pre.copy_(geometric_median(x))
    return 1.0 / (x - x.mean(0)).pow(2).sum(-1).mean().item()


def sae_loss(
    sae: TopKSAE, x_norm: torch.Tensor, mse_scale: float, tcfg: TrainConfig, dead: torch.Tensor | None
) -> LossParts:
    """L(k) [+ L(4k)/8 with multi-TopK] + aux_coef * L_aux, all scaled by the same constant."""
    k = sae.cfg.k
    k_wide = min(4 * k, sae.cfg.n_latents) if tcfg.multi_topk else k
    n_dead = int(dead.sum()) if dead is not None else 0
    aux_k = min(tcfg.aux_k, n_dead)
    values, indices, aux_values, aux_indices = topk_encode(
        x_norm - sae.b_pre, sae.W_enc, sae.b_enc, k_wide, aux_k, dead
    )

    def sq_err(target, recon):
        return (target - recon).pow(2).sum(-1).mean() * mse_scale

    recon = sparse_decode(values[:, :k], indices[:, :k], sae.W_dec) + sae.b_pre
    mse = sq_err(x_norm, recon)
    loss = mse
    if k_wide > k:
        loss = loss + sq_err(x_norm, sparse_decode(values, indices, sae.W_dec) + sae.b_pre) / 8
    aux = torch.zeros((), device=x_norm.device)
    if aux_k > 0:
        # the dead latents learn to predict the live ones' residual error (§A.2)
        aux = sq_err(x_norm - recon.detach(), sparse_decode(aux_values, aux_indices, sae.W_dec))
        aux = torch.nan_to_num(aux, nan=0.0)
        loss = loss + tcfg.aux_coef * aux
    return LossParts(loss, mse.detach(), aux.detach(), values[:, :k].detach(), indices[:, :k])


@torch.no_grad()
def project_decoder_grad(sae: TopKSAE) -> None:
    """Removes from each decoder row's gradient its component along the row (§A.1, unit norm)."""
    if sae.W_dec.grad is None:
        return
    w, g = sae.W_dec, sae.W_dec.grad
    g.sub_((g * w).sum(dim=1, keepdim=True) * w)


@torch.no_grad()
def renormalize_decoder(sae: TopKSAE) -> None:
    sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


def lr_factor(tcfg: TrainConfig, tokens_seen: int) -> float:
    if tokens_seen < tcfg.lr_warmup_tokens:
        return (tokens_seen + tcfg.batch_tokens) / tcfg.lr_warmup_tokens
    if tcfg.lr_decay == "constant":
        return 1.0
    span = max(tcfg.tokens - tcfg.lr_warmup_tokens, 1)
    progress = min((tokens_seen - tcfg.lr_warmup_tokens) / span, 1.0)
    if tcfg.lr_decay == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class TrainResult:
    sae: TopKSAE
    tokens: int
    steps: int
    dead_fraction: float  # by the trainer's token counter
    history: list[dict] = field(default_factory=list)


def train_sae(
    sae_cfg: SAEConfig,
    tcfg: TrainConfig,
    batches: Iterator[torch.Tensor],
    sample: torch.Tensor,
    progress: bool = True,
    on_log: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Trains one SAE on raw activation batches (each (batch_tokens, d_in)) until tcfg.tokens."""
    device = torch.device(tcfg.device)
    gen = torch.Generator().manual_seed(tcfg.seed)
    sae = TopKSAE(sae_cfg)
    sae.reset_parameters(generator=gen)
    sae.to(device)
    mse_scale = init_from_sample(sae, sample[: tcfg.geometric_median_samples].to(device))
    opt = torch.optim.Adam(sae.parameters(), lr=tcfg.resolved_lr(sae_cfg.n_latents), betas=tcfg.betas, eps=tcfg.eps)
    base_lrs = [g["lr"] for g in opt.param_groups]
    tracker = DeadLatentTracker(
        torch.zeros(sae_cfg.n_latents, dtype=torch.long, device=device), tcfg.dead_tokens, tcfg.fire_threshold
    )
    history: list[dict] = []
    tokens_seen = step = 0
    bar = tqdm(total=tcfg.tokens, unit="tok", unit_scale=True, desc="train", disable=not progress)
    for batch in batches:
        if tokens_seen >= tcfg.tokens:
            break
        x_norm, _ = sae.normalize(batch.to(device, non_blocking=True))
        for group, base in zip(opt.param_groups, base_lrs):
            group["lr"] = base * lr_factor(tcfg, tokens_seen)
        parts = sae_loss(sae, x_norm, mse_scale, tcfg, tracker.dead_mask())
        opt.zero_grad(set_to_none=True)
        parts.loss.backward()
        project_decoder_grad(sae)
        if tcfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), tcfg.grad_clip)
        opt.step()
        renormalize_decoder(sae)
        tracker.update(parts.values, parts.indices)
        tokens_seen += batch.shape[0]
        step += 1
        bar.update(batch.shape[0])
        if step % tcfg.log_every == 0 or tokens_seen >= tcfg.tokens:
            record = {
                "step": step,
                "tokens": tokens_seen,
                "loss": parts.loss.item(),
                "mse": parts.mse.item(),
                "aux": parts.aux.item(),
                "dead_fraction": tracker.dead_mask().float().mean().item(),
            }
            history.append(record)
            bar.set_postfix(mse=f"{record['mse']:.4f}", dead=f"{record['dead_fraction']:.3f}")
            if on_log:
                on_log(record)
    bar.close()
    if tokens_seen < tcfg.tokens:
        raise RuntimeError(f"the batch iterator ran out after {tokens_seen} of {tcfg.tokens} tokens")
    return TrainResult(sae.cpu(), tokens_seen, step, tracker.dead_mask().float().mean().item(), history)
