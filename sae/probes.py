"""Probe loss (§4.2): how well the single best latent predicts a binary property of the token.

Per task, a 1-D logistic probe p(y) = sigmoid(a z + b) is fitted by Newton-Raphson to every latent's
activation z on the first half of the held-out contexts; the latent with the lowest loss there is
scored by its cross-entropy on the second half. The same probe on every raw activation dimension and
on as many random directions gives the references: an SAE whose best latent beats the best neuron
has isolated the property in one latent.

The tasks (`TASKS`) are labelled from the token strings and their context alone, so they run offline
on any corpus; one that has fewer than `MIN_LABELS` positive or negative tokens in either half is
skipped.
"""

from __future__ import annotations

import keyword
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

MIN_LABELS = 10
RIDGE = 1e-3  # on a, with z scaled to unit RMS: keeps perfectly separating latents finite
NEWTON_STEPS = 30
MAX_STEP = 4.0  # per Newton step, on a and b: no overshoot from a flat start


def _digit(tokens: Sequence[str], i: int) -> bool:
    return any(c.isdigit() for c in tokens[i])


def _capitalized(tokens: Sequence[str], i: int) -> bool:
    s = tokens[i].lstrip()
    return bool(s) and s[0].isupper()


def _keyword(tokens: Sequence[str], i: int) -> bool:
    return keyword.iskeyword(tokens[i].strip())


def _line_start(tokens: Sequence[str], i: int) -> bool:
    return i > 0 and tokens[i - 1].endswith("\n")


def _after_period(tokens: Sequence[str], i: int) -> bool:
    return i > 0 and tokens[i - 1].rstrip().endswith(".")


def _in_parentheses(tokens: Sequence[str], i: int) -> bool:
    before = "".join(tokens[:i])
    return before.count("(") > before.count(")")


def _in_quotes(tokens: Sequence[str], i: int) -> bool:
    line = "".join(tokens[:i]).rsplit("\n", 1)[-1]
    return sum(line.count(q) for q in "'\"`") % 2 == 1


# name -> (rule on the context's token strings and a position, what it asks of the representation)
TASKS: dict[str, tuple[Callable[[Sequence[str], int], bool], str]] = {
    "digit": (_digit, "the token contains a digit"),
    "capitalized": (_capitalized, "the token's first letter is upper case"),
    "python_keyword": (_keyword, "the token is a Python keyword (def, return, None, ...)"),
    "line_start": (_line_start, "the token is the first of a line (context: the previous token)"),
    "after_period": (_after_period, "the previous token ends with a period"),
    "in_parentheses": (_in_parentheses, "an opening parenthesis before the token is not yet closed"),
    "in_quotes": (_in_quotes, "an odd number of quote marks precedes the token on its line"),
}


def task_labels(contexts: Sequence[Sequence[str]], first_position: int) -> dict[str, np.ndarray]:
    """Per task, (contexts x positions from first_position) booleans, in the codes' row order."""
    out = {}
    for name, (rule, _) in TASKS.items():
        out[name] = np.array([[rule(c, i) for i in range(first_position, len(c))] for c in contexts], dtype=bool)
    return out


class Candidates(Protocol):
    """m candidate features over n rows; `sums` gives each candidate's probe loss and its derivatives."""

    n: int
    m: int

    def rms(self) -> torch.Tensor: ...

    def scaled(self, scale: torch.Tensor) -> Candidates: ...

    def sums(self, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per candidate: mean loss, gradient and Hessian in (a, b) over all n rows."""
        ...


class SparseCandidates:
    """Value `values[e]` of candidate `cols[e]` on row `rows[e]`; absent entries are zero (TopK codes)."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n: int, m: int):
        self.rows, self.cols, self.values, self.n, self.m = rows, cols, values.double(), n, m

    @classmethod
    def from_codes(cls, values: torch.Tensor, indices: torch.Tensor, n_latents: int) -> SparseCandidates:
        keep = values.reshape(-1) > 0
        rows = torch.arange(values.shape[0]).repeat_interleave(values.shape[1])[keep]
        return cls(rows, indices.reshape(-1)[keep], values.reshape(-1)[keep], values.shape[0], n_latents)

    def _total(self, v: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.m, dtype=torch.float64).index_add_(0, self.cols, v)

    def rms(self) -> torch.Tensor:
        return (self._total(self.values.pow(2)) / self.n).sqrt().clamp_min(1e-12)

    def scaled(self, scale: torch.Tensor) -> SparseCandidates:
        return SparseCandidates(self.rows, self.cols, self.values / scale[self.cols], self.n, self.m)

    def sums(self, y, a, b):
        yr, z = y[self.rows], self.values
        s = a[self.cols] * z + b[self.cols]
        p = torch.sigmoid(s)
        r, w = p - yr, p * (1 - p)
        # the rows where a candidate is zero share one logit b: counted rather than enumerated
        n0 = self.n - self._total(torch.ones_like(s))
        pos0 = y.sum() - self._total(yr)
        p0 = torch.sigmoid(b)
        loss = self._total(_log_loss(s, yr)) + n0 * torch.nn.functional.softplus(b) - pos0 * b
        ga = self._total(r * z)
        gb = self._total(r) + n0 * p0 - pos0
        haa, hab = self._total(w * z * z), self._total(w * z)
        hbb = self._total(w) + n0 * p0 * (1 - p0)
        return tuple(t / self.n for t in (loss, ga, gb, haa, hab, hbb))


class DenseCandidates:
    """The columns of an (n, m) matrix (raw dimensions, projections on random directions)."""

    CHUNK = 2**22  # elements per block of columns: bounds the temporaries at large n

    def __init__(self, x: torch.Tensor):
        self.x = x.double()
        self.n, self.m = x.shape

    def rms(self) -> torch.Tensor:
        return self.x.pow(2).mean(0).sqrt().clamp_min(1e-12)

    def scaled(self, scale: torch.Tensor) -> DenseCandidates:
        return DenseCandidates(self.x / scale)

    def sums(self, y, a, b):
        parts = []
        step = max(1, self.CHUNK // max(self.n, 1))
        for lo in range(0, self.m, step):
            z = self.x[:, lo : lo + step]
            s = a[lo : lo + step] * z + b[lo : lo + step]
            p = torch.sigmoid(s)
            r, w = p - y[:, None], p * (1 - p)
            parts.append(
                torch.stack(
                    [
                        _log_loss(s, y[:, None]).mean(0),
                        (r * z).mean(0),
                        r.mean(0),
                        (w * z * z).mean(0),
                        (w * z).mean(0),
                        w.mean(0),
                    ]
                )
            )
        return tuple(torch.cat(parts, dim=1))


def _log_loss(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy (nats) of logits s against 0/1 labels y, stable for large |s|."""
    return torch.nn.functional.softplus(s) - y * s


def fit_probes(c: Candidates, y: np.ndarray, ridge: float = RIDGE, steps: int = NEWTON_STEPS):
    """Newton-Raphson on mean cross-entropy + ridge/2 * a^2, for all m candidates at once.

    Returns (a, b, training cross-entropy without the ridge term), each of shape (m,)."""
    yt = torch.as_tensor(y, dtype=torch.float64)
    prior = float(yt.mean().clamp(1e-6, 1 - 1e-6))
    a = torch.zeros(c.m, dtype=torch.float64)
    b = torch.full((c.m,), math.log(prior / (1 - prior)), dtype=torch.float64)
    for _ in range(steps):
        _, ga, gb, haa, hab, hbb = c.sums(yt, a, b)
        ga, haa, hbb = ga + ridge * a, haa + ridge, hbb + 1e-12
        det = haa * hbb - hab.pow(2)
        a = a - ((hbb * ga - hab * gb) / det).clamp(-MAX_STEP, MAX_STEP)
        b = b - ((haa * gb - hab * ga) / det).clamp(-MAX_STEP, MAX_STEP)
    return a, b, c.sums(yt, a, b)[0]


def best_probe_loss(train: Candidates, y_train: np.ndarray, test: Candidates, y_test: np.ndarray) -> tuple[float, int]:
    """(held-out cross-entropy of the candidate with the lowest training loss, that candidate).
    Features are scaled by their training RMS, so that one ridge suits every candidate."""
    scale = train.rms()
    a, b, loss = fit_probes(train.scaled(scale), y_train)
    best = int(torch.argmin(loss))
    held = test.scaled(scale).sums(torch.as_tensor(y_test, dtype=torch.float64), a, b)[0]
    return float(held[best]), best


def probe_metrics(
    labels: dict[str, np.ndarray],
    codes: tuple[torch.Tensor, torch.Tensor],
    acts: torch.Tensor,
    n_latents: int,
    n_train: int,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """Probe loss per task and averaged over tasks for the SAE's latents (`probe_loss`), the raw
    dimensions (`probe_loss_raw`), as many random directions (`probe_loss_random`) and the constant
    predictor (`probe_loss_prior`, the label's cross-entropy under its training frequency).

    labels: task -> (rows,) booleans; codes: (values, indices) of the rows' TopK codes; acts: their
    raw activations; rows before n_train fit the probes, the rest score them."""
    values, indices = codes
    acts = acts.double()
    directions = torch.randn(
        acts.shape[1], acts.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    projected = (acts - acts[:n_train].mean(0)) @ (directions / directions.norm(dim=0, keepdim=True))
    candidates = {
        "": (
            SparseCandidates.from_codes(values[:n_train], indices[:n_train], n_latents),
            SparseCandidates.from_codes(values[n_train:], indices[n_train:], n_latents),
        ),
        "_raw": (DenseCandidates(acts[:n_train]), DenseCandidates(acts[n_train:])),
        "_random": (DenseCandidates(projected[:n_train]), DenseCandidates(projected[n_train:])),
    }
    per_kind: dict[str, list[float]] = {kind: [] for kind in (*candidates, "_prior")}
    out: dict[str, float] = {}
    for task, y in tqdm(labels.items(), desc="probe loss", unit="task", disable=not progress):
        y_train, y_test = y[:n_train], y[n_train:]
        if min(y_train.sum(), (~y_train).sum(), y_test.sum(), (~y_test).sum()) < MIN_LABELS:
            continue
        for kind, (train, test) in candidates.items():
            loss, best = best_probe_loss(train, y_train, test, y_test)
            per_kind[kind].append(loss)
            out[f"probe_loss{kind}.{task}"] = loss
            if kind == "":
                out[f"probe_latent.{task}"] = float(best)
        prior = float(np.clip(y_train.mean(), 1e-6, 1 - 1e-6))
        per_kind["_prior"].append(float(-np.where(y_test, math.log(prior), math.log(1 - prior)).mean()))
        out[f"probe_loss_prior.{task}"] = per_kind["_prior"][-1]
    for kind, losses in per_kind.items():
        if losses:
            out[f"probe_loss{kind}"] = float(np.mean(losses))
    out["probe_tasks"] = float(len(per_kind["_prior"]))
    return out
