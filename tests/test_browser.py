"""The all-latent feature browser: built by the evaluation from a real store, checked as data and as
rendered by headless Chromium (page loads, search by token, a latent page opens)."""

import json
import re

import numpy as np
import pytest
import torch
from chromium import CHROMIUM, chromium, pixels_of, screenshot

from flows.stages import BROWSER_DIR, HISTOGRAM_FILE, eval_source, write_browser
from sae.browser import OVERVIEW_GROUPS, overview_groups
from sae.config import SAEConfig, TrainConfig
from sae.evaluation import EvalPlan, evaluate_sae
from sae.features import Firings
from sae.lm import load_lm
from sae.train import train_sae
from storage import activations as store
from storage import reading, shard_writer
from storage.corpus import split_contexts

N_LATENTS = 64


@pytest.fixture(scope="module")
def evaluated(tiny_model_dir, text_dir, tmp_path_factory):
    model, tokenizer = load_lm(str(tiny_model_dir), "float32", "cpu")
    train, heldout = split_contexts(str(text_dir), tokenizer, 16, 4, 40, 0.5)
    url = str(tmp_path_factory.mktemp("store") / "s")
    store.plan_store(
        url,
        {"train": train, "eval": heldout},
        ["model.layers.1"],
        d_model=32,
        first_position=1,
        attrs={},
        shard_contexts=16,
    )
    for split, i in store.missing_shards(url):
        shard_writer.write_shard(url, split, i, model, 8)
    store.finalize_store(url)
    group = store.open_store(url)
    rows = torch.cat(list(reading.iter_rows(store.activations(group, "train", "model.layers.1"), 4096)))
    sae = train_sae(
        SAEConfig(32, N_LATENTS, 4), TrainConfig(batch_tokens=64, tokens=len(rows)), rows, progress=False
    ).sae
    plan = EvalPlan(tokens=400, downstream_contexts=0, ablation_contexts=0, feature_tokens=10**6)
    record = evaluate_sae(sae, plan, eval_source(group, "model.layers.1", lambda: (model, tokenizer)), progress=False)
    out = tmp_path_factory.mktemp("eval")
    index = write_browser(record, N_LATENTS, out, "tiny browser")
    return record, index, tokenizer


def _load_js(path, name):
    text = path.read_text()
    prefix = f"SAE.{name} = "
    return json.loads(text[text.index(prefix) + len(prefix) :].rstrip().rstrip(";"))


def _expected_by_token(record, tokenizer, query):
    """The latents firing most often on tokens whose text is `query`, from the codes directly."""
    sample = record.features
    row_tokens = sample.tokens[:, sample.first_position :].reshape(-1)
    counts = np.zeros(N_LATENTS, int)
    for row, token in enumerate(row_tokens):
        if tokenizer.decode([int(token)]).strip().lower() == query:
            for v, latent in zip(sample.values[row], sample.indices[row]):
                counts[latent] += v > 0
    order = sorted(np.flatnonzero(counts), key=lambda latent: (-counts[latent], latent))
    return order, counts


def test_browser_covers_every_latent(evaluated):
    record, index, _ = evaluated
    root = index.parent
    assert index.name == "index.html" and (root.parent / HISTOGRAM_FILE).read_bytes().startswith(b"\x89PNG")
    summary = _load_js(root / "data" / "summary.js", "summary")
    assert len(summary["density"]) == N_LATENTS
    firings = Firings.of(record.features.values, record.features.indices, N_LATENTS)
    np.testing.assert_allclose(summary["density"], firings.density(), rtol=1e-3)
    shard = json.loads(
        re.search(r"SAE\.shard\(0, (.*)\);", (root / "data" / "latents" / "0000.js").read_text()).group(1)
    )
    assert sorted(map(int, shard)) == list(range(N_LATENTS))
    for page in (root / "index.html", root / "browser.js"):
        assert "http://" not in page.read_text() and "https://" not in page.read_text()


def test_browser_top_contexts_are_the_strongest(evaluated):
    record, index, _ = evaluated
    sample = record.features
    positions = sample.tokens.shape[1] - sample.first_position
    shard = json.loads(
        re.search(r"SAE\.shard\(0, (.*)\);", (index.parent / "data" / "latents" / "0000.js").read_text()).group(1)
    )
    dense = np.zeros((len(sample.values), N_LATENTS), np.float32)
    np.put_along_axis(dense, sample.indices, sample.values, axis=1)
    per_context = dense.reshape(-1, positions, N_LATENTS).max(axis=1)
    for latent in range(N_LATENTS):
        top = shard[str(latent)]["top"]
        expected = [c for c in np.argsort(-per_context[:, latent], kind="stable")[:8] if per_context[c, latent] > 0]
        assert [c for c, _, _ in top] == [int(c) for c in expected]
        for c, best, fires in top:
            assert best == pytest.approx(per_context[c, latent], rel=1e-3)
            assert max(a for _, a in fires) == pytest.approx(best, rel=1e-2)
        # below the top 8: each quartile of its contexts ranked by strongest activation, and random ones
        ranked = np.sort(per_context[:, latent][per_context[:, latent] > 0])[::-1]
        m = len(ranked)
        bands = shard[str(latent)]["bands"]
        assert [(hi, lo) for hi, lo, _ in bands] == [
            (100 - 25 * q, 75 - 25 * q) for q in (1, 2, 3) if (q + 1) * m // 4 > max(8, q * m // 4)
        ]
        for hi, lo, examples in bands:
            first, last = max(8, (100 - hi) * m // 100), (100 - lo) * m // 100
            for c, best, _ in examples:
                assert best == pytest.approx(per_context[c, latent], rel=1e-3)
                assert ranked[last - 1] - 1e-3 <= best <= ranked[first] + 1e-3
        shown_random = shard[str(latent)]["random"]
        assert len(shown_random) == min(4, m) and all(per_context[c, latent] > 0 for c, _, _ in shown_random)
    assert any(shard[str(latent)]["bands"] for latent in range(N_LATENTS))


def test_search_index_matches_the_codes(evaluated):
    """Each token id's entry is its most frequent latents with their exact firing counts (the index
    keeps 16 per token id, so counts are compared per id, not summed over ids that read alike)."""
    record, index, _ = evaluated
    tokens = _load_js(index.parent / "data" / "search.js", "tokens")
    vocab = _load_js(index.parent / "data" / "vocab.js", "vocab")
    the = [t for t in tokens if vocab[t].strip().lower() == "the"]
    assert the
    sample = record.features
    row_tokens = sample.tokens[:, sample.first_position :].reshape(-1)
    for t in the:
        counts = np.zeros(N_LATENTS, int)
        for row in np.flatnonzero(row_tokens == int(t)):
            np.add.at(counts, sample.indices[row], sample.values[row] > 0)
        listed = dict(tokens[t])
        assert all(listed[latent] == counts[latent] for latent in listed)
        unlisted = [counts[latent] for latent in range(N_LATENTS) if latent not in listed]
        assert len(listed) == min(16, np.count_nonzero(counts)) and min(listed.values()) >= max(unlisted, default=0)


def test_browser_in_headlesschromium(evaluated, tmp_path):
    record, index, tokenizer = evaluated
    url = index.as_uri()
    overview = chromium(tmp_path, url, "--dump-dom").stdout
    assert "tiny browser" in overview and overview.count('class="result"') == min(100, N_LATENTS)
    assert "Probe loss" in overview and "N2G explanations" in overview
    assert overview.count('class="lbl xaxis">0.00 ') == 2  # N2G precision and recall, with their axes
    # the overview's metrics, grouped, each with its meaning and direction, values as in the metrics
    shown = dict(
        re.findall(r'<tr class="metric" data-key="(\w+)"><td>\w+</td><td class="num">([-\d.]+)</td>', overview)
    )
    groups = overview_groups(record.metrics)
    assert all(g["name"] != "other" for g in groups), groups  # every metric an evaluation writes has its group
    names = [g["name"] for g in groups]
    assert names[0] == "reconstruction" and names == [n for n in OVERVIEW_GROUPS if n in names]
    for group in groups:
        for key, value, _, _, digits in group["rows"]:
            # as rounded to `digits` (JavaScript rounds an exact half up, Python to even)
            assert (
                len(shown[key].partition(".")[2]) == digits
                and abs(float(shown[key]) - value) <= 0.5 * 10**-digits + 1e-12
            ), key
    assert "lower is better" in overview and "higher is better" in overview and "eval_tokens" in shown

    found = chromium(tmp_path, url + "#search=the", "--dump-dom").stdout
    shown = [int(x) for x in re.findall(r'class="result" data-latent="(\d+)"', found)]
    expected, _ = _expected_by_token(record, tokenizer, "the")
    assert shown[:5] == [int(x) for x in expected[:5]]

    latent = int(expected[0])
    page = chromium(tmp_path, url + f"#latent={latent}", "--dump-dom").stdout
    assert f'id="latent-{latent}"' in page and page.count('class="ctx"') >= 1
    assert "background:rgba(255,110,0," in page and ">promotes<" in page and page.count('<ol class="eff">') == 2
    # values on the tokens: the strongest equals the context's best activation in the shard
    text = (index.parent / "data" / "latents" / "0000.js").read_text()  # the tiny SAE's latents: one shard
    shard = json.loads(re.search(r"SAE\.shard\(0, (.*)\);", text).group(1))[str(latent)]
    values = [float(v) for v in re.findall(r'<sub class="act">([\d.]+)</sub>', page)]
    assert values and max(values) == pytest.approx(shard["top"][0][1], abs=0.006)
    assert f'href="#latent={latent + 1}"' in page and (latent == 0 or f'href="#latent={latent - 1}"' in page)
    near = [
        int(x) for x in re.findall(r'href="#latent=(\d+)"', page.split('class="eff neighbours"')[1].split("</ol>")[0])
    ]
    assert near == [i for i, _ in shard["neighbours"]] and len(near) == 10
    co = page.split('class="eff cofiring"')[1].split("</ol>")[0]
    assert [int(x) for x in re.findall(r'href="#latent=(\d+)"', co)] == [i for i, _ in shard["cofiring"]]
    assert page.count('class="band"') == len(shard["bands"]) and ('class="random"' in page) == bool(shard["random"])
    assert page.count('class="ctx"') == len(shard["top"]) + sum(len(b[2]) for b in shard["bands"]) + len(
        shard["random"]
    )
    assert 'class="lbl xaxis">0.00 ' in page and page.count('class="lbl xaxis"') == 2  # activations, logits
    assert (
        f'class="lbl ymax">{max(shard["logit_hist"][0])}<' in page and f'class="lbl ymax">{max(shard["hist"])}<' in page
    )
    # what was drawn: the histograms' bars (#d9480f, 7 px wide each) and the orange of firing tokens
    drawn = screenshot(tmp_path, url + f"#latent={latent}", "latent")
    bars = sum(max(1, round(44 * c / max(shard["hist"]))) * 7 for c in shard["hist"])
    assert pixels_of(drawn, "#d9480f") >= bars
    red, green, blue = (drawn[..., i].astype(int) for i in range(3))
    assert ((red > 240) & (green < 200) & (blue < 120)).sum() > 200  # tokens behind rgba(255,110,0,a)
    assert "Among its sweep" not in overview and 'class="plot"' not in overview  # trained alone


def test_browser_build_replaces_an_old_one_whole(evaluated, tmp_path):
    record, _, _ = evaluated
    stale = tmp_path / BROWSER_DIR / "data" / "latents" / "9999.js"
    stale.parent.mkdir(parents=True)
    stale.write_text("old")
    write_browser(record, N_LATENTS, tmp_path, "again")
    assert not stale.exists() and (tmp_path / BROWSER_DIR / "index.html").exists()
    assert not (tmp_path / (BROWSER_DIR + ".tmp")).exists()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_browser_works_from_the_mlflow_artifact(evaluated, tmp_path):
    """Logged to a run as the registry logs it, downloaded again, it opens and searches offline."""
    import mlflow
    from mlflow import MlflowClient

    from storage.registry import connect, log_run_files

    record, index, tokenizer = evaluated
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    connect(uri)  # leaves $MLFLOW_TRACKING_URI as it was for the tests after this one
    experiment = mlflow.create_experiment("browser", artifact_location=(tmp_path / "artifacts").as_uri())
    run = MlflowClient().create_run(experiment)
    log_run_files(run.info.run_id, [index.parent])
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="browser", dst_path=str(tmp_path / "dl")
    )
    page = chromium(
        tmp_path, (tmp_path / "dl" / "browser" / "index.html").as_uri() + "#search=the", "--dump-dom"
    ).stdout
    expected, _ = _expected_by_token(record, tokenizer, "the")
    assert local.endswith("browser")
    assert f'data-latent="{int(expected[0])}"' in page


def test_co_firing_neighbours_and_logit_effects_equal_plain_computations():
    """Firings.co_firing against counting every row's pairs one by one; decoder_neighbours against
    the full cosine matrix; logit_effects' ranks and histograms against numpy's on the full logits."""
    from sae.features import Firings, decoder_neighbours, logit_effects
    from sae.model import TopKSAE

    rng = np.random.default_rng(0)
    n, rows, k = 12, 300, 4
    indices = np.stack([rng.choice(n, k, replace=False) for _ in range(rows)])
    values = rng.random((rows, k)).astype(np.float32) * (rng.random((rows, k)) > 0.2)  # some kept at 0
    ids, counts = Firings.of(values, indices, n).co_firing(n=3)
    plain = np.zeros((n, n), int)
    for r in range(rows):
        fired = [int(i) for i, v in zip(indices[r], values[r]) if v > 0]
        for a in fired:
            for b in fired:
                plain[a, b] += a != b
    for latent in range(n):
        expected = sorted(range(n), key=lambda b: (-plain[latent, b], b))[:3]
        assert list(ids[latent]) == [b if plain[latent, b] else -1 for b in expected]
        assert list(counts[latent]) == [plain[latent, b] for b in expected]

    sae = TopKSAE(SAEConfig(8, 40, 4))
    sae.reset_parameters(generator=torch.Generator().manual_seed(1))
    near, cosines = decoder_neighbours(sae, n=5, chunk=16)  # chunks that do not divide the latents
    w = sae.W_dec.detach().numpy()
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    full = w @ w.T
    np.fill_diagonal(full, -np.inf)
    assert (near == np.argsort(-full, axis=1, kind="stable")[:, :5]).all()
    assert np.allclose(cosines, np.take_along_axis(full, near, axis=1), atol=1e-6)

    unembedding = torch.randn(50, 8, generator=torch.Generator().manual_seed(2))
    effects = logit_effects(sae, unembedding, n=3, bins=6, chunk=16)
    logits = (sae.W_dec.detach() @ unembedding.T).numpy()
    for latent in range(40):
        row = logits[latent]
        assert list(effects.promoted[0][latent]) == list(np.argsort(-row, kind="stable")[:3])
        assert list(effects.suppressed[0][latent]) == list(np.argsort(row, kind="stable")[:3])
        counts, _ = np.histogram(row, bins=6, range=(row.min(), row.max()))
        assert np.abs(effects.counts[latent] - counts).sum() <= 2 and effects.counts[latent].sum() == 50
        assert (effects.low[latent], effects.high[latent]) == pytest.approx((row.min(), row.max()), abs=1e-5)
