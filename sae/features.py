"""What the feature browser shows about every latent, computed at once for all latents from the TopK
codes of whole held-out contexts (rows context after context, `positions` rows per context)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sae.model import TopKSAE


@dataclass
class Firings:
    """The (row, latent, activation) triples where a latent fired (kept with a positive value)."""

    rows: np.ndarray
    latents: np.ndarray
    values: np.ndarray
    n_rows: int
    n_latents: int

    @classmethod
    def of(cls, values: np.ndarray, indices: np.ndarray, n_latents: int) -> Firings:
        fired = values > 0
        rows = np.broadcast_to(np.arange(len(values))[:, None], values.shape)[fired]
        return cls(rows, indices[fired].astype(np.int64), values[fired].astype(np.float32), len(values), n_latents)

    def density(self) -> np.ndarray:
        return np.bincount(self.latents, minlength=self.n_latents) / max(self.n_rows, 1)

    def co_firing(self, n: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Per latent, the n latents that fire most often on the same rows: ((n_latents, n) ids, counts),
        -1 and 0 where fewer fired with it. One pass over the pairs of every row's firing latents."""
        ids, shared = np.full((self.n_latents, n), -1, np.int64), np.zeros((self.n_latents, n), np.int64)
        if len(self.rows) == 0:  # nothing fired
            return ids, shared
        order = np.argsort(self.rows, kind="stable")
        rows, latents = self.rows[order], self.latents[order]
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        sizes = np.diff(np.r_[starts, len(rows)])
        pair_keys = []
        for size in np.unique(sizes):  # rows with the same number of firing latents, as one array
            block = latents[(starts[sizes == size, None] + np.arange(size)).reshape(-1)].reshape(-1, size)
            a, b = np.broadcast_arrays(block[:, :, None], block[:, None, :])
            keep = a != b
            pair_keys.append(a[keep] * self.n_latents + b[keep])
        keys, counts = np.unique(np.concatenate(pair_keys) if pair_keys else np.zeros(0, np.int64), return_counts=True)
        first, second = keys // self.n_latents, keys % self.n_latents
        ranked = np.lexsort((second, -counts, first))  # per latent: most shared rows first, then by id
        first, second, counts = first[ranked], second[ranked], counts[ranked]
        place = np.arange(len(first)) - np.searchsorted(first, first)  # rank within its latent
        top = place < n
        ids[first[top], place[top]], shared[first[top], place[top]] = second[top], counts[top]
        return ids, shared

    def max_activation(self) -> np.ndarray:
        out = np.zeros(self.n_latents, np.float32)
        np.maximum.at(out, self.latents, self.values)
        return out

    def histograms(self, bins: int = 16) -> np.ndarray:
        """(n_latents, bins) counts of each latent's activations over [0, its max]."""
        top = self.max_activation()[self.latents]
        b = np.minimum((self.values / np.maximum(top, 1e-30) * bins).astype(np.int64), bins - 1)
        return np.bincount(self.latents * bins + b, minlength=self.n_latents * bins).reshape(self.n_latents, bins)

    def _ranked_contexts(self, positions: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(latent, context, strongest activation there, rank): each latent's contexts, strongest first."""
        context = self.rows // positions
        order = np.lexsort((-self.values, context, self.latents))
        lat, ctx, val = self.latents[order], context[order], self.values[order]
        first = np.ones(len(lat), bool)
        first[1:] = (lat[1:] != lat[:-1]) | (ctx[1:] != ctx[:-1])  # the strongest row of each (latent, context)
        lat, ctx, val = lat[first], ctx[first], val[first]
        order = np.lexsort((-val, lat))
        lat, ctx, val = lat[order], ctx[order], val[order]
        return lat, ctx, val, np.arange(len(lat)) - np.searchsorted(lat, lat, side="left")

    def top_contexts(self, positions: int, n_top: int = 8) -> list[list[tuple[int, float]]]:
        """Per latent, its n_top contexts by strongest activation: (context, that activation)."""
        lat, ctx, val, rank = self._ranked_contexts(positions)
        keep = rank < n_top
        out: list[list[tuple[int, float]]] = [[] for _ in range(self.n_latents)]
        for latent, c, v in zip(lat[keep].tolist(), ctx[keep].tolist(), val[keep].tolist()):
            out[latent].append((c, v))
        return out

    def lower_contexts(
        self, positions: int, skip: int = 8, per_band: int = 3, n_random: int = 4, seed: int = 0
    ) -> tuple[list[list[tuple[float, float, list[tuple[int, float]]]]], list[list[tuple[int, float]]]]:
        """Per latent, below its `skip` top contexts: `per_band` contexts spread evenly over each
        quartile of its contexts ranked by strongest activation (the 75th-50th, 50th-25th and
        25th-0th percentiles: [(from, to, [(context, activation)])]), and `n_random` of all its contexts
        drawn at random (seeded)."""
        lat, ctx, val, rank = self._ranked_contexts(positions)
        starts = np.searchsorted(lat, np.arange(self.n_latents + 1))
        rng = np.random.default_rng(seed)
        bands: list[list[tuple[float, float, list[tuple[int, float]]]]] = []
        drawn: list[list[tuple[int, float]]] = []
        for latent in range(self.n_latents):
            lo, hi = starts[latent], starts[latent + 1]
            m, mine = hi - lo, []
            for q in (1, 2, 3):  # quartiles below the top one, by rank
                first, last = max(skip, q * m // 4), (q + 1) * m // 4
                if last > first:
                    picks = np.unique(np.linspace(first, last - 1, per_band).round().astype(int))
                    mine.append((100 - 25 * q, 75 - 25 * q, [(int(ctx[lo + r]), float(val[lo + r])) for r in picks]))
            bands.append(mine)
            chosen = rng.choice(m, min(n_random, m), replace=False) if m else []
            drawn.append([(int(ctx[lo + r]), float(val[lo + r])) for r in sorted(chosen)])
        return bands, drawn

    def in_context(self, positions: int) -> dict[tuple[int, int], list[tuple[int, float]]]:
        """(latent, context) -> [(position within the encoded rows, activation)], every firing."""
        out: dict[tuple[int, int], list[tuple[int, float]]] = {}
        context, pos = np.divmod(self.rows, positions)
        for latent, c, p, v in zip(self.latents.tolist(), context.tolist(), pos.tolist(), self.values.tolist()):
            out.setdefault((latent, c), []).append((p, v))
        return out

    def by_token(self, row_tokens: np.ndarray, per_token: int = 16) -> dict[int, list[tuple[int, int]]]:
        """token id -> the latents that fire most often on it: [(latent, firings)], most first."""
        tok = row_tokens[self.rows].astype(np.int64)
        pairs, counts = np.unique(tok * self.n_latents + self.latents, return_counts=True)
        t, lat = np.divmod(pairs, self.n_latents)
        order = np.lexsort((-counts, t))
        t, lat, counts = t[order], lat[order], counts[order]
        rank = np.arange(len(t)) - np.searchsorted(t, t, side="left")
        out: dict[int, list[tuple[int, int]]] = {}
        for token, latent, c in zip(
            t[rank < per_token].tolist(), lat[rank < per_token].tolist(), counts[rank < per_token].tolist()
        ):
            out.setdefault(token, []).append((latent, c))
        return out


@torch.no_grad()
def decoder_neighbours(sae: TopKSAE, n: int = 10, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Per latent, the n latents whose decoder directions are closest by cosine: ((n_latents, n) ids,
    cosines), itself left out."""
    w = torch.nn.functional.normalize(sae.W_dec.detach().float().cpu(), dim=1)
    n = min(n, len(w) - 1)
    ids, cosines = [], []
    for start, rows in zip(range(0, len(w), chunk), w.split(chunk)):
        sims = rows @ w.T
        sims[torch.arange(len(rows)), torch.arange(start, start + len(rows))] = -2.0  # not itself
        top = sims.topk(n, dim=1)
        ids.append(top.indices)
        cosines.append(top.values)
    return torch.cat(ids).numpy(), torch.cat(cosines).numpy()


@dataclass
class LogitEffects:
    """Each latent's decoder direction through the unembedding (the direct path): the n tokens whose
    logits it raises most and lowers most ((n_latents, n) ids and changes), and the histogram of its
    change of every token's logit (counts over `bins` equal bins from its lowest to its highest)."""

    promoted: tuple[np.ndarray, np.ndarray]
    suppressed: tuple[np.ndarray, np.ndarray]
    counts: np.ndarray  # (n_latents, bins)
    low: np.ndarray  # (n_latents,)
    high: np.ndarray


@torch.no_grad()
def logit_effects(
    sae: TopKSAE, unembedding: torch.Tensor, n: int = 8, bins: int = 24, chunk: int = 1024
) -> LogitEffects:
    w_u = unembedding.detach().float().cpu()
    parts = []
    for rows in sae.output_directions().detach().float().cpu().split(chunk):
        logits = rows @ w_u.T
        up, down = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
        low, high = logits.min(dim=1).values, logits.max(dim=1).values
        width = (high - low).clamp_min(1e-12)[:, None]
        which = ((logits - low[:, None]) / width * bins).long().clamp_(0, bins - 1)  # the highest: the last bin
        counts = torch.zeros(len(rows), bins, dtype=torch.long).scatter_add_(1, which, torch.ones_like(which))
        parts.append((up.indices, up.values, down.indices, down.values, counts, low, high))
    ids_up, val_up, ids_down, val_down, counts, low, high = (torch.cat(p).numpy() for p in zip(*parts))
    return LogitEffects((ids_up, val_up), (ids_down, val_down), counts, low, high)
