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
    A transcoder's rows are [input | target], and x below is the target (its FVU); a cross-layer
    transcoder's FVU is also reported per layer (normalized_mse_layer_0, ...: each layer's error over
    its own variance).

    normalized MSE = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 with the mean of the evaluated set
    (the paper's definition, §2.1); L0; latents that never fired; latents firing on > 10% of tokens;
    and normalized MSE when keeping k' latents at test time (progressive codes, §5.3).
    """

    DENSE_FREQUENCY = 0.1

    def __init__(self, sae: TopKSAE, ks: tuple[int, ...] = ()):
        n, d = sae.cfg.n_latents, sae.cfg.width()
        self.sae = sae
        # test-time k' comes from the first k' of one wide code; a cross-layer transcoder's code is its
        # layers' top k / L side by side, not one sorted list, and a JumpReLU code has no k: their own only
        ks = () if sae.cfg.cross_layer or sae.cfg.activation == "jumprelu" else ks
        self.ks = tuple(sorted({k for k in ks if 0 < k <= n} | {sae.cfg.k}))
        self.count = 0
        self.sum_x = torch.zeros(d, dtype=torch.float64)
        self.sum_sq_x = 0.0
        self.sq_err = {k: 0.0 for k in self.ks}
        self.main_sq_err = 0.0
        self.active = 0
        self.fire_counts = torch.zeros(n, dtype=torch.long)
        self.layer_sq_err = torch.zeros(sae.cfg.layers(), dtype=torch.float64)  # read for cross-layer coders
        self.layer_sum_sq = torch.zeros(sae.cfg.layers(), dtype=torch.float64)

    @torch.no_grad()
    def update(self, x_raw: torch.Tensor) -> None:
        sae = self.sae
        inputs, targets = sae.split(x_raw.to(sae.W_enc.device))
        x_in, _ = sae.normalize(inputs)
        x = sae.normalize_target(targets)[0] if sae.cfg.transcoder else x_in
        jump = sae.cfg.activation == "jumprelu"
        wide = sae.encode_normalized(x_in, k=None if jump else max(self.ks))
        for k in self.ks:
            recon = sae.decode_normalized(wide.first(k))
            self.sq_err[k] += (x - recon).double().pow(2).sum().item()
        # the SAE's own code: its k for TopK, the thresholded code for BatchTopK and JumpReLU
        if jump:
            main = wide
        elif sae.cfg.activation == "topk":
            main = wide.first(sae.cfg.k)
        else:
            main = sae.encode_normalized(x_in)
        error = (x - sae.decode_normalized(main)).double().pow(2)
        self.main_sq_err += error.sum().item()
        if sae.cfg.cross_layer:
            self.layer_sq_err += self._per_layer(error).cpu()
            self.layer_sum_sq += self._per_layer(x.double().pow(2)).cpu()
        fired = main.values > 0
        self.active += int(fired.sum())
        self.fire_counts += torch.bincount(main.indices[fired].cpu(), minlength=len(self.fire_counts))
        xd = x.double().cpu()
        self.count += x.shape[0]
        self.sum_x += xd.sum(0)
        self.sum_sq_x += xd.pow(2).sum().item()

    def _per_layer(self, columns: torch.Tensor) -> torch.Tensor:
        """Row-wise squares summed over each layer's columns and over the rows: (L,)."""
        return columns.unflatten(-1, (self.sae.cfg.layers(), self.sae.cfg.d_in)).sum(dim=(0, 2))

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
        if self.sae.cfg.cross_layer:
            mean_sq = self._per_layer(self.sum_x.pow(2)[None]) / self.count  # count * ||mean||^2, per layer
            layer_var = self.layer_sum_sq - mean_sq
            for layer, (err, v) in enumerate(zip(self.layer_sq_err.tolist(), layer_var.tolist())):
                out[f"normalized_mse_layer_{layer}"] = err / v
        return out


def ablation_sparsity_score(delta: torch.Tensor) -> torch.Tensor:
    """§4.4: delta is the (T, V) change of the logits over T positions after ablating one latent.

    Subtract each position's median over the vocabulary, flatten to v of length T*V, and return
    (||v||_1 / ||v||_2)^2 / (T*V): 1/(T*V) for a single changed logit, 1 for a uniform change.
    """
    v = (delta.double() - delta.double().median(dim=-1, keepdim=True).values).flatten()
    return (v.abs().sum() / v.norm()).pow(2) / v.numel()
