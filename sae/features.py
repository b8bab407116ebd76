"""What the feature browser shows about each latent, computed from codes of held-out tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from sae.model import TopKSAE


@dataclass
class SparseCodes:
    """TopK codes of n token rows; row r is context r // positions, position first + r % positions."""

    values: np.ndarray  # (n, k) float32
    indices: np.ndarray  # (n, k) int64
    positions: int
    first_position: int

    def latent_activations(self, latent: int) -> np.ndarray:
        """(n,) activation of one latent on every row (0 where it was not selected)."""
        return np.where(self.indices == latent, self.values, 0.0).sum(axis=1)

    def frequencies(self, n_latents: int) -> np.ndarray:
        fired = self.values > 0
        return np.bincount(self.indices[fired], minlength=n_latents) / len(self.values)


@torch.no_grad()
def encode_rows(sae: TopKSAE, batches, positions: int, first_position: int) -> SparseCodes:
    values, indices = [], []
    for batch in batches:
        codes = sae.encode(batch)
        values.append(codes.values.float().cpu().numpy())
        indices.append(codes.indices.cpu().numpy())
    return SparseCodes(np.concatenate(values), np.concatenate(indices), positions, first_position)


@dataclass
class Example:
    context: int
    activations: list[float]  # one per token of the context (0 at positions never encoded)
    max_activation: float


@dataclass
class LatentCard:
    latent: int
    frequency: float
    max_activation: float
    top: list[Example]
    by_quantile: list[tuple[str, list[Example]]]
    histogram: tuple[list[float], list[int]]  # bin edges, counts of non-zero activations
    promoted_tokens: list[tuple[int, float]] = field(default_factory=list)


def _example(codes: SparseCodes, acts: np.ndarray, context: int, context_length: int) -> Example:
    rows = acts[context * codes.positions : (context + 1) * codes.positions]
    per_token = [0.0] * codes.first_position + rows.tolist()
    return Example(context, per_token[:context_length], float(rows.max()))


def latent_card(
    codes: SparseCodes,
    latent: int,
    context_length: int,
    n_top: int = 8,
    n_per_quantile: int = 2,
    rng: np.random.Generator | None = None,
) -> LatentCard:
    rng = rng or np.random.default_rng(0)
    acts = codes.latent_activations(latent)
    # one example per context: the context's strongest activation of this latent
    per_context = acts.reshape(-1, codes.positions).max(axis=1)
    order = np.argsort(-per_context, kind="stable")
    top = [_example(codes, acts, int(c), context_length) for c in order[:n_top] if per_context[c] > 0]
    active = np.flatnonzero(per_context > 0)
    by_quantile = []
    if len(active):
        edges = np.quantile(per_context[active], [0, 0.25, 0.5, 0.75, 1.0])
        for lo, hi, name in zip(edges[:-1], edges[1:], ("0-25%", "25-50%", "50-75%", "75-100%")):
            members = active[(per_context[active] >= lo) & (per_context[active] <= hi)]
            picked = rng.choice(members, size=min(n_per_quantile, len(members)), replace=False) if len(members) else []
            by_quantile.append((name, [_example(codes, acts, int(c), context_length) for c in picked]))
    nonzero = acts[acts > 0]
    counts, bin_edges = np.histogram(nonzero, bins=20) if len(nonzero) else (np.zeros(0, int), np.zeros(0))
    return LatentCard(
        latent=latent,
        frequency=float((acts > 0).mean()),
        max_activation=float(acts.max()),
        top=top,
        by_quantile=by_quantile,
        histogram=(bin_edges.tolist(), counts.tolist()),
    )


def promoted_tokens(sae: TopKSAE, unembedding: torch.Tensor, latents: list[int], n: int = 8) -> dict[int, list]:
    """Tokens whose logits the latent's decoder direction raises most (direct path through W_U)."""
    with torch.no_grad():
        logits = sae.W_dec[latents].float() @ unembedding.float().T  # (latents, vocab)
        top = logits.topk(n, dim=1)
    return {
        latent: list(zip(top.indices[i].tolist(), top.values[i].tolist())) for i, latent in enumerate(latents)
    }


def pick_latents(frequencies: np.ndarray, n_random: int, n_frequent: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """(random latents among those that fired, most frequent latents)."""
    alive = np.flatnonzero(frequencies > 0)
    rng = np.random.default_rng(seed)
    random = sorted(rng.choice(alive, size=min(n_random, len(alive)), replace=False).tolist())
    frequent = np.argsort(-frequencies, kind="stable")[:n_frequent].tolist()
    return random, frequent
