"""Probe loss (§4.2): the 1-D logistic probes against closed forms and a plain optimiser, the tasks'
labels on hand-made contexts, and the best-latent selection."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from sae.probes import DenseCandidates, SparseCandidates, best_probe_loss, fit_probes, probe_metrics, task_labels


def _entropy(p):
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def test_binary_feature_probe_reaches_the_conditional_entropy():
    """z in {0, c}: the best logistic probe predicts each group's label frequency, so its loss is
    the conditional entropy H(y | z), computed by hand."""
    rng = np.random.default_rng(0)
    n = 5000
    on = rng.random(n) < 0.3
    y = np.where(on, rng.random(n) < 0.9, rng.random(n) < 0.2)
    z = torch.tensor(on * 2.5)[:, None]
    c = DenseCandidates(z)
    _, _, loss = fit_probes(c.scaled(c.rms()), y, ridge=1e-10)
    expected = on.mean() * _entropy(y[on].mean()) + (1 - on.mean()) * _entropy(y[~on].mean())
    assert float(loss[0]) == pytest.approx(expected, abs=1e-6)


def test_probe_matches_a_plain_optimiser_and_sparse_equals_dense():
    rng = np.random.default_rng(1)
    n = 3000
    x = rng.normal(size=(n, 3)) * (rng.random((n, 3)) < 0.4)  # sparse-ish, with exact zeros
    y = rng.random(n) < 1 / (1 + np.exp(-(2 * x[:, 1] - 0.5)))
    dense = DenseCandidates(torch.tensor(x))
    scale = dense.rms()
    a, b, loss = fit_probes(dense.scaled(scale), y, ridge=0.0)
    for j in range(3):

        def objective(p, j=j):
            s = p[0] * x[:, j] / float(scale[j]) + p[1]
            return np.mean(np.logaddexp(0, s) - y * s)

        ref = minimize(objective, [0.0, 0.0], method="BFGS", options={"gtol": 1e-10})
        assert float(loss[j]) == pytest.approx(ref.fun, abs=1e-7)
        assert float(a[j]) == pytest.approx(ref.x[0], abs=1e-3)
    # the same three features as TopK-style sparse entries (values > 0 only, so use |x|)
    pos = np.abs(x)
    sparse = SparseCandidates.from_codes(torch.tensor(pos), torch.tensor(np.tile([0, 1, 2], (n, 1))), 3)
    dense = DenseCandidates(torch.tensor(pos))
    np.testing.assert_allclose(
        fit_probes(sparse.scaled(sparse.rms()), y)[2], fit_probes(dense.scaled(dense.rms()), y)[2], rtol=1e-9
    )


def test_best_latent_is_chosen_on_the_training_half_and_scored_on_the_other():
    rng = np.random.default_rng(2)
    n = 4000
    y = rng.random(n) < 0.3
    informative = np.where(y, 1.0 + rng.random(n), 0.0) * (rng.random(n) < 0.95)
    noise = rng.random(n) * (rng.random(n) < 0.3)
    values = torch.tensor(np.stack([noise, informative, noise[::-1].copy()], 1))
    indices = torch.tensor(np.tile([0, 1, 2], (n, 1)))
    half = n // 2
    train = SparseCandidates.from_codes(values[:half], indices[:half], 3)
    test = SparseCandidates.from_codes(values[half:], indices[half:], 3)
    loss, best = best_probe_loss(train, y[:half], test, y[half:])
    assert best == 1
    assert loss < 0.5 * _entropy(y[half:].mean())


def test_task_labels_on_hand_made_contexts():
    contexts = [
        ["x", " = f", "(", "a", ",", " 1", ")", "\n", "def", " g"],
        ["The", ' "', "quoted", '"', " end", ".", " Next", "\n", "None", " 42"],
    ]
    labels = task_labels(contexts, first_position=1)
    assert labels["in_parentheses"][0].tolist() == [False, False, True, True, True, True, False, False, False]
    assert labels["digit"][0].tolist() == [False, False, False, False, True, False, False, False, False]
    assert labels["line_start"][0].tolist() == [False] * 7 + [True, False]
    assert labels["python_keyword"][0].tolist() == [False] * 7 + [True, False]
    assert labels["python_keyword"][1].tolist() == [False] * 7 + [True, False]
    assert labels["in_quotes"][1].tolist() == [False, True, True, False, False, False, False, False, False]
    assert labels["after_period"][1].tolist() == [False, False, False, False, False, True, False, False, False]
    assert labels["capitalized"][1].tolist() == [False, False, False, False, False, True, False, True, False]


def test_probe_metrics_rank_an_sae_latent_that_isolates_the_task_above_raw_neurons():
    """The label is a direction spread over all raw dimensions; one latent holds it. The SAE's probe
    loss must beat the raw dimensions' and the random directions', and the prior is the label's entropy."""
    rng = np.random.default_rng(3)
    n, d = 6000, 16
    y = rng.random(n) < 0.25
    direction = np.ones(d) / math.sqrt(d)
    acts = rng.normal(size=(n, d)) + np.outer(y * 3.0, direction)
    values = np.stack([y * (2 + rng.random(n)), rng.random(n)], 1)
    indices = np.tile([5, 9], (n, 1))
    out = probe_metrics({"task": y}, (torch.tensor(values), torch.tensor(indices)), torch.tensor(acts), 16, n // 2)
    assert out["probe_tasks"] == 1
    assert out["probe_loss"] < 0.05 < out["probe_loss_raw"] < out["probe_loss_prior"]
    assert out["probe_loss_prior"] == pytest.approx(_entropy(y[: n // 2].mean()), abs=0.02)
    assert out["probe_loss.task"] == out["probe_loss"] and out["probe_latent.task"] == 5
