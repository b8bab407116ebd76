"""Held-out evaluation of an SAE: reconstruction statistics and the LM's loss with the SAE spliced in."""

from __future__ import annotations

from typing import Iterable

import torch
from tqdm.auto import tqdm

from sae.lm import logits, replaced
from sae.metrics import ReconstructionStats, kl_divergence, next_token_ce
from sae.model import TopKSAE


def reconstruction_metrics(sae: TopKSAE, batches: Iterable[torch.Tensor], progress: bool = True) -> dict[str, float]:
    k = sae.cfg.k
    stats = ReconstructionStats(sae, ks=(k // 2, 2 * k, 4 * k))
    for batch in tqdm(batches, desc="eval", unit="batch", disable=not progress):
        stats.update(batch)
    return stats.result()


@torch.no_grad()
def downstream_metrics(
    sae: TopKSAE,
    model: torch.nn.Module,
    contexts: torch.Tensor,
    hookpoint: str,
    first_position: int,
    batch_contexts: int = 16,
    progress: bool = True,
) -> dict[str, float]:
    """§4.1: next-token CE with the reconstruction in place of the activation, vs the clean forward.

    Positions before `first_position` (excluded from training) keep their clean activation; the loss
    is averaged over every next-token prediction of the contexts.
    """
    device = next(model.parameters()).device
    sae = sae.to(device)

    def splice(h: torch.Tensor) -> torch.Tensor:
        tail = h[:, first_position:]
        recon = sae(tail.reshape(-1, tail.shape[-1])).view_as(tail).to(h.dtype)
        return torch.cat([h[:, :first_position], recon], dim=1)

    ce_clean = ce_sae = kl = 0.0
    n = 0
    for start in tqdm(range(0, len(contexts), batch_contexts), desc="eval LM loss", disable=not progress):
        ids = contexts[start : start + batch_contexts].to(device, torch.long)
        clean = logits(model, ids)
        with replaced(model, hookpoint, splice):
            spliced = logits(model, ids)
        count = ids.shape[0] * (ids.shape[1] - 1)
        ce_clean += next_token_ce(clean, ids).sum().item()
        ce_sae += next_token_ce(spliced, ids).sum().item()
        kl += kl_divergence(clean[:, :-1], spliced[:, :-1]).sum().item()
        n += count
    return {
        "ce_clean": ce_clean / n,
        "ce_with_sae": ce_sae / n,
        "ce_increase": (ce_sae - ce_clean) / n,
        "kl_divergence": kl / n,
    }
