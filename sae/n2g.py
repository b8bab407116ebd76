"""N2G explanations (§4.3): each latent explained by the n-grams its top activations end on, scored by
how well they predict where the latent fires on held-out text.

Neuron-to-Graph (Foote et al. 2023) keeps, for each top-activating example, the shortest context
that still makes the neuron fire, and merges those contexts into a trie that predicts activation.
Here the contexts are n-grams of up to `MAX_N` tokens ending at the activating token, and "still
fires" is measured on text instead of by re-running the model: for each of a latent's `TOP`
strongest activations on the first half of the contexts, the explanation takes the shortest n-gram
ending there whose precision on that half (fraction of its occurrences where the latent fires) is at
least `MIN_PRECISION`. The explanation predicts that the latent fires wherever one of its n-grams
ends. On the second half: precision = predicted positions where it fired / predicted positions;
recall = firing positions predicted / firing positions ("fires": the latent is among the token's kept
latents with a positive value).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_N = 3
TOP = 32
MIN_PRECISION = 0.5
MIN_FIRINGS = 2  # a latent is scored where it fired at least this often on each half


@dataclass
class Explanations:
    """Per latent: its n-grams (token-id tuples, most useful first), held-out precision and recall
    (NaN where the latent fired fewer than MIN_FIRINGS times on a half; precision also NaN where the
    explanation predicts nothing)."""

    patterns: list[list[tuple[int, ...]]]
    precision: np.ndarray
    recall: np.ndarray

    def metrics(self) -> dict[str, float]:
        scored = ~np.isnan(self.recall)
        predicted = ~np.isnan(self.precision)
        return {
            "n2g_precision": float(np.nanmean(self.precision)) if predicted.any() else float("nan"),
            "n2g_recall": float(np.nanmean(self.recall)) if scored.any() else float("nan"),
            "n2g_scored_latents": float(scored.sum()),
        }


def _ngram_keys(tokens: np.ndarray, first_position: int, vocab: int) -> list[np.ndarray]:
    """Per n in 1..MAX_N, one int64 key per encoded position for the n-gram ending there; n-grams
    that would start before the context get a boundary symbol (vocab) in the missing places."""
    c, length = tokens.shape
    padded = np.concatenate([np.full((c, MAX_N - 1), vocab, np.int64), tokens.astype(np.int64)], axis=1)
    keys, key = [], np.zeros((c, length - first_position), np.int64)
    for n in range(1, MAX_N + 1):
        lo = MAX_N - 1 + first_position - (n - 1)
        key = key + padded[:, lo : lo + length - first_position] * (vocab + 1) ** (n - 1)
        keys.append(key.reshape(-1).copy())
    return keys


def _count(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct keys, their counts) for lookups with `_lookup`."""
    return np.unique(keys, return_counts=True)


def _lookup(table: tuple[np.ndarray, np.ndarray], keys: np.ndarray) -> np.ndarray:
    distinct, counts = table
    if len(distinct) == 0:
        return np.zeros(len(keys), np.int64)
    at = np.clip(np.searchsorted(distinct, keys), 0, len(distinct) - 1)
    return np.where(distinct[at] == keys, counts[at], 0)


def explain(
    tokens: np.ndarray,
    first_position: int,
    values: np.ndarray,
    indices: np.ndarray,
    n_latents: int,
    train_contexts: int,
    vocab: int,
) -> Explanations:
    """tokens: (contexts, length) ids; values/indices: (contexts * (length - first_position), k) TopK
    codes of the encoded positions, row-major; contexts before train_contexts build the explanations,
    the rest score them."""
    positions = tokens.shape[1] - first_position
    split = train_contexts * positions
    keys = _ngram_keys(tokens, first_position, vocab)
    # every n-gram as a dense id (0..U) so that (latent, n-gram) pairs fit one int64 key
    dense = [np.unique(k, return_inverse=True)[1].astype(np.int64) for k in keys]
    width = max(int(d.max()) + 1 for d in dense)

    fired = values > 0
    rows = np.broadcast_to(np.arange(len(values))[:, None], values.shape)[fired]
    latents, acts = indices[fired].astype(np.int64), values[fired]
    train = rows < split
    firings = [np.bincount(latents[train], minlength=n_latents), np.bincount(latents[~train], minlength=n_latents)]

    pattern_count = [(_count(d[:split]), _count(d[split:])) for d in dense]
    pair_count = [
        (_count(latents[train] * width + d[rows[train]]), _count(latents[~train] * width + d[rows[~train]]))
        for d in dense
    ]

    # each latent's TOP strongest training activations
    tr_lat, tr_rows, tr_acts = latents[train], rows[train], acts[train]
    order = np.lexsort((-tr_acts, tr_lat))
    tr_lat, tr_rows = tr_lat[order], tr_rows[order]
    starts = np.searchsorted(tr_lat, tr_lat, side="left")
    top = (np.arange(len(tr_lat)) - starts) < TOP
    cand_lat, cand_rows = tr_lat[top], tr_rows[top]

    # the shortest n-gram at each candidate with training precision >= MIN_PRECISION
    chosen = np.zeros(len(cand_lat), np.int64)  # n, 0: none
    for n in range(MAX_N, 0, -1):
        ids = dense[n - 1][cand_rows]
        hits = _lookup(pair_count[n - 1][0], cand_lat * width + ids)
        occurrences = _lookup(pattern_count[n - 1][0], ids)
        chosen = np.where(hits >= MIN_PRECISION * np.maximum(occurrences, 1), n, chosen)

    # the distinct n-grams of each latent. Precision depends on the n-gram, not on where it was seen,
    # so no kept n-gram has a kept shorter suffix (it would have been chosen instead): the kept
    # n-grams of a latent never match the same position, and their counts add up
    tp, predicted = np.zeros(n_latents), np.zeros(n_latents)
    patterns: list[list[tuple[float, tuple[int, ...]]]] = [[] for _ in range(n_latents)]
    for n in range(1, MAX_N + 1):
        pick = chosen == n
        pairs, first = np.unique(cand_lat[pick] * width + dense[n - 1][cand_rows[pick]], return_index=True)
        lat = pairs // width
        np.add.at(tp, lat, _lookup(pair_count[n - 1][1], pairs))
        np.add.at(predicted, lat, _lookup(pattern_count[n - 1][1], pairs % width))
        context, pos = np.divmod(cand_rows[pick][first], positions)
        ends = first_position + pos + 1
        at = ends[:, None] - n + np.arange(n)
        grams = np.where(at >= 0, tokens[context[:, None], np.maximum(at, 0)], -1)  # -1: the context's start
        for latent, hits, gram in zip(lat.tolist(), _lookup(pair_count[n - 1][0], pairs).tolist(), grams.tolist()):
            patterns[latent].append((hits, tuple(t for t in gram if t >= 0)))

    scored = (firings[0] >= MIN_FIRINGS) & (firings[1] >= MIN_FIRINGS)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(scored, tp / np.maximum(firings[1], 1), np.nan)
        precision = np.where(scored & (predicted > 0), tp / predicted, np.nan)
    ranked = [[p for _, p in sorted(ps, key=lambda hp: -hp[0])] for ps in patterns]
    return Explanations(ranked, precision, recall)
