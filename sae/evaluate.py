"""Held-out evaluation of an SAE: reconstruction statistics and the LM's loss with the SAE spliced in."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from sae.lm import logits, replaced
from sae.metrics import ReconstructionStats, ablation_sparsity_score, kl_divergence, next_token_ce
from sae.model import TopKSAE


def reconstruction_metrics(sae: TopKSAE, batches: Iterable[torch.Tensor], progress: bool = True) -> dict[str, float]:
    k = sae.cfg.k
    stats = ReconstructionStats(sae, ks=(k // 2, 2 * k, 4 * k))
    for batch in tqdm(batches, desc="eval", unit="batch", disable=not progress):
        stats.update(batch)
    return stats.result()


@torch.no_grad()
def held_out_metrics(sae: TopKSAE, rows: torch.Tensor) -> dict[str, float]:
    """normalized MSE, L0 and dead fraction on a block of held-out rows (the evaluation's scorer, for
    scoring an SAE while it trains)."""
    stats = ReconstructionStats(sae)
    stats.update(rows)
    result = stats.result()
    return {key: result[key] for key in ("normalized_mse", "l0", "dead_fraction")}


@torch.no_grad()
def downstream_metrics(
    sae: TopKSAE,
    model: torch.nn.Module,
    contexts: torch.Tensor,
    hookpoint: str,
    first_position: int,
    mean_activation: torch.Tensor,
    batch_contexts: int = 16,
    progress: bool = True,
) -> dict[str, float]:
    """§4.1: next-token CE and KL from the clean distribution with the activation replaced by the
    SAE's reconstruction, by zeros and by the mean activation; loss recovered compares the three.
    For a transcoder (at a "MODULE:io" hookpoint) the MLP's output is replaced by the prediction from
    its input, and `mean_activation` is the mean output.

    Positions before `first_position` (excluded from training) keep their clean activation in every
    variant; the loss is averaged over every next-token prediction of the contexts.
    """
    device = next(model.parameters()).device
    sae = sae.to(device)
    mean_activation = mean_activation.to(device)

    def splice(replace, reads_input: bool = False):
        def fn(h: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
            tail = (x if reads_input and x is not None else h)[:, first_position:]
            new = replace(tail.reshape(-1, tail.shape[-1])).reshape(h[:, first_position:].shape).to(h.dtype)
            return torch.cat([h[:, :first_position], new], dim=1)

        return fn

    variants = {
        "sae": splice(sae, reads_input=isinstance(sae, TopKSAE) and sae.cfg.transcoder),
        "zero": splice(torch.zeros_like),
        "mean": splice(lambda t: mean_activation.expand_as(t)),
    }
    ce = {name: 0.0 for name in ("clean", *variants)}
    kl = {name: 0.0 for name in variants}
    n = 0
    for start in tqdm(range(0, len(contexts), batch_contexts), desc="eval LM loss", disable=not progress):
        ids = contexts[start : start + batch_contexts].to(device, torch.long)
        clean = logits(model, ids)
        ce["clean"] += next_token_ce(clean, ids).sum().item()
        for name, fn in variants.items():
            with replaced(model, hookpoint, fn):
                out = logits(model, ids)
            ce[name] += next_token_ce(out, ids).sum().item()
            kl[name] += kl_divergence(clean[:, :-1], out[:, :-1]).sum().item()
        n += ids.shape[0] * (ids.shape[1] - 1)
    ce = {name: total / n for name, total in ce.items()}
    return {
        "ce_clean": ce["clean"],
        "ce_with_sae": ce["sae"],
        "ce_increase": ce["sae"] - ce["clean"],
        "kl_divergence": kl["sae"] / n,
        "ce_zero_ablation": ce["zero"],
        "ce_mean_ablation": ce["mean"],
        "kl_zero_ablation": kl["zero"] / n,
        "kl_mean_ablation": kl["mean"] / n,
        "loss_recovered_vs_zero": (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]),
        "loss_recovered_vs_mean": (ce["mean"] - ce["sae"]) / (ce["mean"] - ce["clean"]),
    }


@torch.no_grad()
def ablation_sparsity(
    sae: TopKSAE,
    model: torch.nn.Module,
    contexts: torch.Tensor,
    hookpoint: str,
    first_position: int,
    window: int = 16,
    seed: int = 0,
) -> dict[str, float]:
    """§4.4 on a small sample: per context, ablate one active latent at one position of the spliced-in
    reconstruction and score the sparsity of the logit change over that and the next positions.

    One latent per context (a random position, then a random one of its k active latents); the score
    is averaged over contexts. Lower is sparser.
    """
    device = next(model.parameters()).device
    sae = sae.to(device)
    ids = contexts.to(device, torch.long)
    B, L = ids.shape
    window = min(window, L - first_position)  # short contexts: as many positions as there are
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(first_position, L - window + 1, (B,), generator=g)
    slot = torch.randint(sae.cfg.k, (B,), generator=g)

    def splice(ablate: bool):
        def fn(h: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
            tail = (x if sae.cfg.transcoder and x is not None else h)[:, first_position:]
            codes = sae.encode(tail.reshape(-1, tail.shape[-1]))
            if ablate:
                rows = torch.arange(B, device=device) * (L - first_position) + (t.to(device) - first_position)
                codes.values[rows, slot.to(device) % codes.values.shape[1]] = 0.0  # a JumpReLU code's width varies
            recon = sae.decode(codes).view_as(h[:, first_position:]).to(h.dtype)
            return torch.cat([h[:, :first_position], recon], dim=1)

        return fn

    with replaced(model, hookpoint, splice(False)):
        base = logits(model, ids)
    with replaced(model, hookpoint, splice(True)):
        ablated = logits(model, ids)
    scores = [
        ablation_sparsity_score(ablated[b, t[b] : t[b] + window] - base[b, t[b] : t[b] + window]) for b in range(B)
    ]
    finite = [s for s in scores if torch.isfinite(s)]  # an inactive (zero) latent changes nothing
    measured = {"ablation_sparsity": torch.stack(finite).mean().item()} if finite else {}  # none fired: no score
    return {**measured, "ablation_sparsity_samples": float(len(finite)), "ablation_sparsity_window": float(window)}
