"""The all-latent feature browser: a static site (HTML, one script, data as JavaScript files) that
opens from the file system, with no server and no network.

Data files assign to `window.SAE` and are loaded by script tags, because browsers refuse fetch()
of file:// URLs. The page loads the summary of every latent (density, max activation, N2G
explanation and scores), the token index for search and the contexts once; each latent's details
(top contexts, logit effects, histogram, explanation) live in shards of SHARD_SIZE latents loaded
when one of them is opened.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np

from sae.features import Firings
from sae.plots import frequency_histogram_png

SHARD_SIZE = 256
ASSET_DIR = Path(__file__).parent / "browser_assets"
ASSETS = ("index.html", "browser.js", "style.css")
INDEX_FILE = "index.html"
HISTOGRAM_FILE = "activation_frequency.png"
SWEEP_DATA = "data/sweep.js"  # the SAE's sweep, when it has one: written once every SAE of it is evaluated


def _js(name: str, value) -> str:
    return f"window.SAE = window.SAE || {{}};\nSAE.{name} = {json.dumps(value, separators=(',', ':'))};\n"


def _round(x: float, digits: int = 4):
    return None if not math.isfinite(x) else float(f"{x:.{digits}g}")


# The overview's metric groups: (metric, what it measures, which way is better, digits; 0 for a count).
# Metrics not named here are listed under "other".
OVERVIEW_GROUPS: dict[str, list[tuple[str, str, str, int]]] = {
    "reconstruction": [
        ("normalized_mse", "MSE over the MSE of predicting each dimension's mean", "lower", 4),
        ("fraction_variance_explained", "1 - normalized MSE", "higher", 4),
    ],
    "downstream (the model's loss with the SAE spliced in)": [
        ("ce_clean", "next-token cross-entropy of the model alone", "", 4),
        ("ce_with_sae", "... with the reconstruction in place of the activations", "lower", 4),
        ("ce_increase", "ce_with_sae - ce_clean", "lower", 4),
        ("kl_divergence", "KL of the spliced model's next-token distribution from the model's", "lower", 4),
        ("loss_recovered_vs_zero", "share of zero-ablation's CE increase the SAE avoids", "higher", 4),
        ("loss_recovered_vs_mean", "share of mean-ablation's CE increase the SAE avoids", "higher", 4),
        ("ce_zero_ablation", "the reference: CE with the activations set to zero", "", 4),
        ("ce_mean_ablation", "the reference: CE with the activations set to their mean", "", 4),
        ("kl_zero_ablation", "KL of the zero-ablated model's distribution from the model's", "", 4),
        ("kl_mean_ablation", "KL of the mean-ablated model's distribution from the model's", "", 4),
    ],
    "sparsity": [
        ("l0", "latents active per token", "", 2),
        ("dead_fraction", "latents that never fired on the held-out tokens", "lower", 4),
        ("dense_fraction", "latents firing on more than 10% of tokens", "lower", 4),
        ("train_dead_fraction", "latents dead by the trainer's count at the end of training", "lower", 4),
        (
            "ablation_sparsity",
            "§4.4: spread of the logits one latent's ablation moves (near 0: few, 1: all)",
            "lower",
            4,
        ),
    ],
    "interpretability": [
        ("probe_loss", "§4.2: the best single latent's probe loss, mean over the tasks", "lower", 4),
        ("probe_loss_raw", "... the best raw activation dimension's (a baseline)", "lower", 4),
        ("probe_loss_random", "... the best random direction's (a baseline)", "lower", 4),
        ("probe_loss_prior", "... predicting each label's frequency (every probe should beat it)", "lower", 4),
        ("n2g_precision", "§4.3: held-out precision of the n-gram explanations, mean", "higher", 4),
        ("n2g_recall", "... held-out recall", "higher", 4),
        ("n2g_scored_latents", "latents with an n-gram explanation scored", "", 0),
    ],
    "what was measured": [
        ("eval_tokens", "held-out tokens", "", 0),
        ("probe_tasks", "probe tasks", "", 0),
        ("ablation_sparsity_samples", "ablations scored", "", 0),
        ("ablation_sparsity_window", "positions each ablation's logit change is scored over", "", 0),
    ],
}


OTHER_K = re.compile(r"normalized_mse_k(\d+)")  # the reconstruction at another k than trained with


def overview_groups(metrics: dict[str, float]) -> list[dict]:
    """The overview's groups of the metrics at hand: name, and rows of key, value, meaning, better, digits."""
    shown = {k: v for k, v in metrics.items() if "." not in k and isinstance(v, (int, float)) and math.isfinite(v)}
    groups, named = [], set()
    at_other_k = sorted((int(m.group(1)), key) for key in shown if (m := OTHER_K.fullmatch(key)))
    other_k = [(key, f"normalized MSE keeping the top {k} latents of each token", "lower", 4) for k, key in at_other_k]
    for group, rows in OVERVIEW_GROUPS.items():
        rows = rows + other_k if group == "reconstruction" else rows
        present = [(k, means, better, digits) for k, means, better, digits in rows if k in shown]
        named.update(k for k, *_ in rows)
        if present:
            groups.append({"name": group, "rows": [[k, shown[k], m, b, d] for k, m, b, d in present]})
    other = [[k, v, "", "", 4] for k, v in shown.items() if k not in named]
    if other:
        groups.append({"name": "other", "rows": other})
    return groups


def build_browser(
    out_dir: str | os.PathLike,
    sample,
    n_latents: int,
    title: str,
    metrics: dict[str, float],
    details: dict | None = None,
    n_top: int = 8,
) -> Path:
    """Writes the browser into out_dir (replacing an older one only once the new one is complete),
    its density histogram as HISTOGRAM_FILE among them; returns the path of its index.html. `sample`
    is an evaluation's FeatureSample."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data" / "latents").mkdir(parents=True)
    positions = sample.tokens.shape[1] - sample.first_position
    firings = Firings.of(sample.values, sample.indices, n_latents)
    density, top_act, hist = firings.density(), firings.max_activation(), firings.histograms()
    top = firings.top_contexts(positions, n_top)
    bands, drawn = firings.lower_contexts(positions, skip=n_top)
    co_ids, co_counts = firings.co_firing()
    in_context = firings.in_context(positions)
    expl = sample.explanations
    used: set[int] = set()

    def tokens_of(ids) -> list[int]:
        ids = [int(i) for i in ids]
        used.update(ids)
        return ids

    shown = [top, drawn, [[e for _, _, band in mine for e in band] for mine in bands]]
    contexts = sorted({c for per_latent in shown for examples in per_latent for c, _ in examples})
    (tmp / "data" / "contexts.js").write_text(_js("contexts", {c: tokens_of(sample.tokens[c]) for c in contexts}))
    row_tokens = sample.tokens[:, sample.first_position :].reshape(-1)
    index = {t: [[latent, c] for latent, c in pairs] for t, pairs in firings.by_token(row_tokens).items()}
    tokens_of(index)
    (tmp / "data" / "search.js").write_text(_js("tokens", index))

    patterns = expl.patterns if expl is not None else [[] for _ in range(n_latents)]
    nan = np.full(n_latents, np.nan)
    precision, recall = (expl.precision, expl.recall) if expl is not None else (nan, nan)
    for start in range(0, n_latents, SHARD_SIZE):
        shard = {}
        for latent in range(start, min(start + SHARD_SIZE, n_latents)):
            shard[latent] = {
                "top": _examples(top[latent], latent, in_context),
                "bands": [[hi, lo, _examples(band, latent, in_context)] for hi, lo, band in bands[latent]],
                "random": _examples(drawn[latent], latent, in_context),
                "hist": hist[latent].tolist(),
                "n2g": [tokens_of(g) for g in patterns[latent][:8]],
                **_effects(sample.logit_effects, latent, tokens_of),
                "cofiring": [[int(i), int(c)] for i, c in zip(co_ids[latent], co_counts[latent]) if c > 0],
                "neighbours": []
                if sample.neighbours is None
                else [[int(i), _round(c, 3)] for i, c in zip(*(a[latent] for a in sample.neighbours))],
            }
        body = json.dumps(shard, separators=(",", ":"))
        (tmp / "data" / "latents" / f"{start // SHARD_SIZE:04d}.js").write_text(
            f"SAE.shard({start // SHARD_SIZE}, {body});\n"
        )

    summary = {
        "density": [_round(x) for x in density.tolist()],
        "max": [_round(x, 3) for x in top_act.tolist()],
        "n2g": [[tokens_of(g) for g in p[:3]] for p in patterns],  # the first three n-grams
        "n2g_precision": [_round(x, 2) for x in precision.tolist()],
        "n2g_recall": [_round(x, 2) for x in recall.tolist()],
    }
    (tmp / "data" / "summary.js").write_text(_js("summary", summary))
    (tmp / "data" / "vocab.js").write_text(_js("vocab", {t: sample.token_text(t) for t in sorted(used)}))
    meta = {
        "title": title,
        "n_latents": n_latents,
        "shard_size": SHARD_SIZE,
        "first_position": sample.first_position,
        "groups": overview_groups(metrics),
        "probes": _probe_rows(metrics, (details or {}).get("probe_latents", {})),
        "n2g": {
            "scored": int((~np.isnan(recall)).sum()),
            "precision_hist": np.histogram(precision[~np.isnan(precision)], bins=10, range=(0, 1))[0].tolist(),
            "recall_hist": np.histogram(recall[~np.isnan(recall)], bins=10, range=(0, 1))[0].tolist(),
        },
        "by_density": np.argsort(-density, kind="stable").tolist(),
    }
    (tmp / "data" / "meta.js").write_text(_js("meta", meta))
    (tmp / SWEEP_DATA).write_text(_js("sweep", None))
    for name in ASSETS:
        shutil.copyfile(ASSET_DIR / name, tmp / name)
    (tmp / HISTOGRAM_FILE).write_bytes(frequency_histogram_png(density, title))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out / INDEX_FILE


# what the overview's sweep section shows of each SAE of the sweep (key in a sweep point, key in the page)
SWEEP_FIELDS = (
    ("n_latents", "n"),
    ("k", "k"),
    ("lr", "lr"),
    ("tokens", "tokens"),
    ("l0", "l0"),
    ("normalized_mse", "nmse"),
    ("ce_increase", "ce"),
    ("dead_fraction", "dead"),
)


def sweep_data(points: list[dict], this: int) -> bytes:
    """SWEEP_DATA for the browser of points[this]: every SAE of its sweep at its hookpoint, each with
    its metrics and whether it lies on the normalized-MSE-vs-L0 frontier (§3), for the overview's
    frontier plots."""
    from sae.scaling import l0_frontier

    on = l0_frontier([p["l0"] for p in points], [p["normalized_mse"] for p in points])
    shown = [{short: _value(p.get(key)) for key, short in SWEEP_FIELDS} | {"frontier": f} for p, f in zip(points, on)]
    return _js("sweep", {"this": this, "points": shown}).encode()


def _value(x):
    return x if x is None or isinstance(x, int) else _round(float(x))


def _examples(pairs, latent: int, in_context) -> list:
    """[context, strongest activation, [[position, activation] of every firing there]] per example."""
    return [[c, _round(v), [[p, _round(a, 3)] for p, a in in_context[(latent, c)]]] for c, v in pairs]


def _effects(effects, latent: int, tokens_of) -> dict:
    """A latent's promoted and suppressed tokens and the histogram of its logit changes."""
    if effects is None:
        return {"promoted": [], "suppressed": [], "logit_hist": None}

    def ranked(ids, values) -> list:
        return [[t, _round(float(v), 3)] for t, v in zip(tokens_of(ids[latent]), values[latent].tolist())]

    return {
        "promoted": ranked(*effects.promoted),
        "suppressed": ranked(*effects.suppressed),
        "logit_hist": [
            effects.counts[latent].tolist(),
            _round(float(effects.low[latent]), 3),
            _round(float(effects.high[latent]), 3),
        ],
    }


def _probe_rows(metrics: dict[str, float], latents: dict[str, int]) -> list[dict]:
    return [
        {
            "task": task,
            "sae": metrics[f"probe_loss.{task}"],
            "raw": metrics.get(f"probe_loss_raw.{task}"),
            "random": metrics.get(f"probe_loss_random.{task}"),
            "prior": metrics.get(f"probe_loss_prior.{task}"),
            "latent": latent,
        }
        for task, latent in latents.items()
    ]
