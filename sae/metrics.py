"""Evaluation metrics of the paper (§4), as streaming accumulators and pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sae.model import TopKSAE


def next_token_ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy of predicting tokens[:, 1:] from logits[:, :-1]: (B, L-1)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none").view(
        tokens.shape[0], -1
    )


def kl_divergence(clean_logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """KL(clean || other) of the next-token distributions, per position: (B, L)."""
    p = clean_logits.float().log_softmax(-1)
    q = other_logits.float().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


class ReconstructionStats:
    """Streams batches of raw activations through an SAE; all statistics in the normalised space.
    A transcoder's rows are [input | target], and x below is the target (its FVU).

    normalized MSE = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 with the mean of the evaluated set
    (the paper's definition, §2.1); L0; latents that never fired; latents firing on > 10% of tokens;
    and normalized MSE when keeping k' latents at test time (progressive codes, §5.3).
    """

    DENSE_FREQUENCY = 0.1

    def __init__(self, sae: TopKSAE, ks: tuple[int, ...] = ()):
        n, d = sae.cfg.n_latents, sae.cfg.d_in
        self.sae = sae
        self.ks = tuple(sorted({k for k in ks if 0 < k <= n} | {sae.cfg.k}))
        self.count = 0
        self.sum_x = torch.zeros(d, dtype=torch.float64)
        self.sum_sq_x = 0.0
        self.sq_err = {k: 0.0 for k in self.ks}
        self.main_sq_err = 0.0
        self.active = 0
        self.fire_counts = torch.zeros(n, dtype=torch.long)

    @torch.no_grad()
    def update(self, x_raw: torch.Tensor) -> None:
        sae = self.sae
        inputs, targets = sae.split(x_raw.to(sae.W_enc.device))
        x_in, _ = sae.normalize(inputs)
        x = sae.normalize_target(targets)[0] if sae.cfg.transcoder else x_in
        wide = sae.encode_normalized(x_in, k=max(self.ks))
        for k in self.ks:
            recon = sae.decode_normalized(wide.first(k))
            self.sq_err[k] += (x - recon).double().pow(2).sum().item()
        # the SAE's own code: its k for TopK, the thresholded code for BatchTopK
        main = wide.first(sae.cfg.k) if sae.cfg.activation == "topk" else sae.encode_normalized(x_in)
        self.main_sq_err += (x - sae.decode_normalized(main)).double().pow(2).sum().item()
        fired = main.values > 0
        self.active += int(fired.sum())
        self.fire_counts += torch.bincount(main.indices[fired].cpu(), minlength=len(self.fire_counts))
        xd = x.double().cpu()
        self.count += x.shape[0]
        self.sum_x += xd.sum(0)
        self.sum_sq_x += xd.pow(2).sum().item()

    def total_variance(self) -> float:
        return self.sum_sq_x - self.sum_x.pow(2).sum().item() / self.count

    def result(self) -> dict[str, float]:
        var = self.total_variance()
        k = self.sae.cfg.k
        freq = self.fire_counts.double() / self.count
        out = {
            "normalized_mse": self.main_sq_err / var,
            "fraction_variance_explained": 1.0 - self.main_sq_err / var,
            "l0": self.active / self.count,
            "dead_fraction": (self.fire_counts == 0).double().mean().item(),
            "dense_fraction": (freq > self.DENSE_FREQUENCY).double().mean().item(),
            "eval_tokens": float(self.count),
        }
        for kk in self.ks:
            if kk != k:
                out[f"normalized_mse_k{kk}"] = self.sq_err[kk] / var
        return out


def ablation_sparsity_score(delta: torch.Tensor) -> torch.Tensor:
    """§4.4: delta is the (T, V) change of the logits over T positions after ablating one latent.

    Subtract each position's median over the vocabulary, flatten to v of length T*V, and return
    (||v||_1 / ||v||_2)^2 / (T*V): 1/(T*V) for a single changed logit, 1 for a uniform change.
    """
    v = (delta.double() - delta.double().median(dim=-1, keepdim=True).values).flatten()
    return (v.abs().sum() / v.norm()).pow(2) / v.numel()
