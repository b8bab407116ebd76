"""Scaling-law fits recover known laws from noisy synthetic losses; the planner turns a budget into a
spec that validates."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from chromium import CHROMIUM, chromium, pixels_of, screenshot

from flows import paths
from sae.scaling import Fit, fit_joint_law, fit_power_law, joint_law, recommend, training_flops

TRUE_JOINT = {"alpha": -0.3, "beta_k": 0.2, "beta_n": -0.05, "gamma": -0.03, "zeta": -1.5, "eta": -0.2}


def test_joint_law_parameters_recovered_from_noisy_losses():
    rng = np.random.default_rng(0)
    n = np.repeat([2**10, 2**12, 2**14, 2**16, 2**18], 5)
    k = np.tile([8, 16, 32, 64, 128], 5)
    loss = joint_law(np.stack([n, k]).astype(float), *TRUE_JOINT.values()) * np.exp(rng.normal(0, 0.01, n.size))
    fit = fit_joint_law(n, k, loss)
    for name, value in TRUE_JOINT.items():  # every parameter within 3 standard errors of the truth
        assert abs(fit.params[name] - value) <= 3 * fit.stderr[name], (name, fit.params[name], fit.stderr[name])
    assert fit.rms_log_residual < 0.02  # the noise was 1%
    # extrapolated 4x beyond the largest n: within 2% and within 3 standard errors of the true loss
    truth = float(joint_law(np.array([[2.0**20], [32.0]]), *TRUE_JOINT.values())[0])
    predicted, stderr = fit.predict_with_error(2**20, 32)
    assert abs(predicted - truth) < 0.02 * truth and abs(predicted - truth) < 3 * stderr
    again = Fit(**json.loads(json.dumps(fit.to_dict())))  # a fit saved as JSON predicts the same
    assert again.predict(2**20, 32) == pytest.approx(predicted)


def test_power_law_with_irreducible_loss_recovered():
    rng = np.random.default_rng(1)
    x = np.array([1e3, 3e3, 1e4, 3e4, 1e5, 3e5, 1e6])
    loss = (2.0 * x**-0.4 + 0.05) * np.exp(rng.normal(0, 0.01, x.size))
    fit = fit_power_law(x, loss)
    assert np.exp(fit.params["log_a"]) == pytest.approx(2.0, rel=0.1)
    assert fit.params["b"] == pytest.approx(0.4, abs=3 * fit.stderr["b"])
    assert np.exp(fit.params["log_c"]) == pytest.approx(0.05, rel=0.1)


def test_fits_refuse_what_they_cannot_fit():
    with pytest.raises(ValueError, match="positive, finite losses"):
        fit_power_law([1, 2, 3, 4], [1.0, 0.0, 0.5, 0.4])
    with pytest.raises(ValueError, match="fit it to more than 6 points"):
        fit_joint_law([1, 2, 3], [4, 8, 16], [0.3, 0.2, 0.1])


def test_planner_spends_the_budget_on_the_largest_n_that_converges():
    law = Fit("joint", dict(TRUE_JOINT), {k: 0.0 for k in TRUE_JOINT}, 0.0, 25)
    small, large = recommend(1e15, 768, 32, law), recommend(1e18, 768, 32, law)
    assert large.n_latents > small.n_latents and large.predicted_loss < small.predicted_loss
    for r in (small, large):
        assert r.flops <= 1e18 and r.tokens >= r.tokens_to_convergence
        assert training_flops(768, 2 * r.n_latents, int(4e7 * (2 * r.n_latents / 4096) ** 0.6)) > (
            1e15 if r is small else 1e18
        )
    with pytest.raises(ValueError, match="cannot train even"):
        recommend(1e6, 768, 32, law)


def test_saeflow_plan_prints_a_recommendation_and_writes_a_spec_that_validates(
    tiny_model_dir, text_dir, tmp_path, capsys
):
    from flows.cli import main

    base = {
        "name": "tiny",
        "model": {"source": str(tiny_model_dir)},
        "data": {"source": str(text_dir)},
        "hookpoints": ["model.layers.1"],
        "sae": {"n_latents": 64, "k": 4},
        "workdir": str(tmp_path / "w"),
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    out = tmp_path / "planned.yaml"
    assert main(["plan", str(tmp_path / "base.yaml"), "--budget-flops", "1e14", "--k", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    planned = yaml.safe_load(out.read_text())
    n = planned["sae"][0]["n_latents"]
    assert f"n_latents {n:,}  k 8" in printed and "no predicted loss: no law is fitted" in printed
    assert "predicted normalized MSE" not in printed
    assert planned["data"]["tokens"] * 2 * 32 * n <= 1e14
    # the store's size: whole contexts of 63 kept positions, d_model float16 values a row
    from sae.lm import load_config

    d = load_config(str(tiny_model_dir)).hidden_size
    expected = -(-planned["data"]["tokens"] // 63) * 63 * d * 2
    size, unit = re.search(r"activation store: ([\d.]+) (\w+) of training activations", printed).groups()
    assert abs(float(size) * {"TB": 1e12, "GB": 1e9, "MB": 1e6, "kB": 1e3}[unit] / expected - 1) < 0.01
    # the corpus: every document and its EOS, 90% of them for training (eval_fraction 0.1)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    held = sum(len(tok(p.read_text(), add_special_tokens=False)["input_ids"]) + 1 for p in text_dir.iterdir())
    assert f"holds about {int(held * 0.9):,} training tokens (of {held:,})" in printed
    assert ("NOT ENOUGH DATA" in printed) == (planned["data"]["tokens"] > held * 0.9)
    assert main(["validate", str(out)]) == 0
    assert planned["train"].get("tokens") is None and planned["sae"][0].get("tokens") is None  # trains them all
    assert main(["plan", str(tmp_path / "base.yaml"), "--out", str(out)]) == 2  # no budget: one line, exit 2
    # a law fitted elsewhere is refused; one fitted here predicts, with its standard error
    fits = tmp_path / "fits.json"
    law = Fit("joint", dict(TRUE_JOINT), {k: 0.01 for k in TRUE_JOINT}, 0.0, 9).to_dict()
    fits.write_text(json.dumps({"model": "other/model", "hookpoints": {"model.layers.1": law}}))
    argv = ["plan", str(tmp_path / "base.yaml"), "--budget-flops", "1e14", "--k", "8", "--law", str(fits)]
    assert main([*argv, "--out", str(out)]) == 2
    assert "fitted to other/model at model.layers.1, not to" in capsys.readouterr().err
    fits.write_text(json.dumps({"model": str(tiny_model_dir), "hookpoints": {"model.layers.1": law}}))
    assert main([*argv, "--out", str(out)]) == 0
    assert f"predicted normalized MSE {recommend(1e14, d, 8, Fit(**law)).predicted_loss:.4g}" in capsys.readouterr().out


def sweep_spec(
    tmp_path, tiny_model_dir, text_dir, name: str, sweep: dict, downstream_contexts: int, browser: bool = False
):
    """A sweep spec on the tiny model: 1500 tokens, 30% held out, batches of 128."""
    spec = {
        "name": name,
        "model": {"source": str(tiny_model_dir)},
        "data": {"source": str(text_dir), "context_length": 16, "tokens": 1500, "eval_fraction": 0.3},
        "hookpoints": ["model.layers.1"],
        "sae": {"n_latents": 64, "k": 4, "dead_tokens": 500},
        "sweep": sweep,
        "train": {"batch_tokens": 128},
        "eval": {"tokens": 300, "downstream_contexts": downstream_contexts, "browser": browser, "ablation_contexts": 0},
        "workdir": str(tmp_path / "work"),
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_small_real_sweep_runs_end_to_end(prefect_harness, tiny_model_dir, text_dir, tmp_path):
    """3 x 3 (latents x k) on the tiny model: nine SAEs trained in one pass, evaluated, registered,
    then fitted and reported."""
    from flows.cli import main
    from flows.spec import load_spec
    from flows.sweep import sweep_dir

    path = sweep_spec(tmp_path, tiny_model_dir, text_dir, "tiny-sweep", {"n_latents": [32, 64, 128], "k": [2, 4, 8]}, 0)
    assert main(["sweep", str(path)]) == 0
    out = sweep_dir(load_spec(path))
    rows = json.loads((out / "points.json").read_text())
    assert sorted((r["n_latents"], r["k"]) for r in rows) == [(n, k) for n in (32, 64, 128) for k in (2, 4, 8)]
    saved = json.loads((out / "fits.json").read_text())
    assert saved["model"] == str(tiny_model_dir)
    fit = saved["hookpoints"]["model.layers.1"]
    assert "params" in fit or "error" in fit  # nine noisy points may not pin six parameters: either way said
    if "params" in fit:
        assert fit["points"] == 9
    page = (out / "report.html").read_text()
    assert page.count("<tr>") == 10 and page.count("data:image/png;base64,") == 5
    for name in ("mse_vs_n", "mse_vs_l0", "dead_vs_n", "mse_vs_tokens", "mse_vs_compute"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    # each SAE was scored at 4 token milestones while training, before its final evaluation
    for r in rows:
        assert [m["tokens"] for m in r["milestones"]] == sorted(m["tokens"] for m in r["milestones"])
        assert len(r["milestones"]) == 4 and r["milestones"][-1]["tokens"] < r["tokens"]
    compute = json.loads((out / "compute.json").read_text())
    assert len(compute["points"]) == 9 * 5
    # the frontier by a plain double loop: nothing at most as costly has a lower loss
    for p in compute["points"]:
        assert p["frontier"] == (
            not any(o["flops"] <= p["flops"] and o["normalized_mse"] < p["normalized_mse"] for o in compute["points"])
        )
    assert "params" in compute["fits"]["model.layers.1"] or "error" in compute["fits"]["model.layers.1"]
    # more latents at the same k reconstruct better on these held-out tokens
    by = {(r["n_latents"], r["k"]): r["normalized_mse"] for r in rows}
    assert by[(128, 8)] < by[(32, 2)]


def test_a_sweep_over_lr_registers_its_frontier_under_one_parent_run(
    prefect_harness, tiny_model_dir, text_dir, tmp_path
):
    """latents x k x lr with registered: frontier: every SAE has a run under the sweep's parent run,
    only the loss-vs-L0 frontier is registered, and the parent holds the report with the dCE plot."""
    import mlflow
    from mlflow import MlflowClient

    from flows.cli import main
    from flows.spec import load_spec
    from flows.sweep import sweep_dir
    from storage.registry import connect

    grid = {"n_latents": [32, 64], "k": [2, 4], "lr": [1e-3, 4e-3], "registered": "frontier"}
    path = sweep_spec(tmp_path, tiny_model_dir, text_dir, "tiny-lr-sweep", grid, downstream_contexts=2, browser=True)
    assert main(["sweep", str(path)]) == 0
    parsed = load_spec(path)
    out = sweep_dir(parsed)
    rows = json.loads((out / "points.json").read_text())
    assert len(rows) == 8 and (out / "dce_vs_mse.png").read_bytes()[:4] == b"\x89PNG"
    # the frontier by a plain double loop over the evaluated points
    frontier = {
        i
        for i, r in enumerate(rows)
        if not any(o["l0"] <= r["l0"] and o["normalized_mse"] < r["normalized_mse"] for o in rows)
    }
    assert 0 < len(frontier) < 8
    connect(parsed.tracking_uri())
    client = MlflowClient()
    names = [parsed.model_name("model.layers.1", i) for i in range(8)]
    assert "-lr0.004" in names[1]
    registered = {m.name for m in client.search_registered_models()}
    assert registered == {names[i] for i in frontier}
    experiment = client.get_experiment_by_name("tiny-lr-sweep")
    parents = client.search_runs([experiment.experiment_id], filter_string=f"tags.`saeflow.sweep` = '{out.name}'")
    assert len(parents) == 1
    parent = parents[0].info.run_id
    children = client.search_runs([experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.info.run_name for r in children) == sorted(names)
    logged = {a.path for a in client.list_artifacts(parent)}
    assert {"report.html", "fits.json", "points.json", "dce_vs_mse.png"} <= logged
    # each SAE's browser shows the sweep, itself marked, as registered (the artifact) and as rendered
    for i, name in enumerate(names):
        shown = _sweep_points(paths.eval_dir(parsed, "model.layers.1", i) / "browser" / "data" / "sweep.js")
        assert shown["this"] == i and [p["frontier"] for p in shown["points"]] == [j in frontier for j in range(8)]
        assert [p["nmse"] for p in shown["points"]] == [float(f"{r['normalized_mse']:.4g}") for r in rows]
        if name in registered:
            version = client.search_model_versions(f"name = '{name}'")[0]
            local = mlflow.artifacts.download_artifacts(
                run_id=version.run_id, artifact_path="browser/data/sweep.js", dst_path=str(tmp_path / f"dl{i}")
            )
            assert _sweep_points(Path(local)) == shown
    if CHROMIUM is not None:
        url = (paths.eval_dir(parsed, "model.layers.1", 1) / "browser" / "index.html").as_uri()
        page = chromium(tmp_path, url, "--dump-dom").stdout
        assert page.count('<tr class="point ') == 8 and page.count("<circle ") == 16  # two plots of 8 SAEs
        this = re.search(r'<tr class="point this">(.*?)</tr>', page).group(1)
        assert f">{rows[1]['normalized_mse']:.4f}<" in this and f">{rows[1]['l0']:.2f}<" in this
        drawn = screenshot(tmp_path, url, "sweep", "1100,1800")
        assert pixels_of(drawn, "#d9480f") > 50 and pixels_of(drawn, "#1c7ed6") > 50  # this SAE, the frontier
    assert main(["sweep", str(path)]) == 0  # a rerun updates the same parent and children
    assert (
        len(client.search_runs([experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'"))
        == 8
    )


def _sweep_points(sweep_js: Path) -> dict:
    text = sweep_js.read_text()
    return json.loads(text[text.index("SAE.sweep = ") + len("SAE.sweep = ") :].rstrip().rstrip(";"))


def test_a_sweep_over_token_budgets_trains_each_budget_in_its_own_pass(
    prefect_harness, tiny_model_dir, text_dir, tmp_path
):
    """tokens as a sweep axis: SAEs of one budget share a pass (one train task per budget), each SAE
    trains for its own budget, and the report's fit takes the best SAE of each (n, k)."""
    from flows import stages
    from flows.cli import main
    from flows.spec import load_spec
    from flows.sweep import sweep_dir
    from sae.model import TopKSAE

    grid = {"n_latents": [32, 64], "k": [4], "tokens": [512, 1024], "milestones": 0}
    path = sweep_spec(tmp_path, tiny_model_dir, text_dir, "tiny-token-sweep", grid, downstream_contexts=0)
    parsed = load_spec(path)
    assert [s.tokens for s in parsed.sae] == [512, 1024, 512, 1024]
    assert parsed.model_name("model.layers.1", 1).endswith("-n32-k4-t1024")
    assert main(["sweep", str(path)]) == 0
    assert stages.train_groups(parsed, "model.layers.1") == [[0, 2], [1, 3]]
    for i, s in enumerate(parsed.sae):
        sae = TopKSAE.load(stages.sae_dir(parsed, "model.layers.1", i))
        assert sae.metadata["train_tokens"] == s.tokens
    rows = json.loads((sweep_dir(parsed) / "points.json").read_text())
    assert sorted(r["tokens"] for r in rows) == [512, 512, 1024, 1024]
    spec = yaml.safe_load(path.read_text())
    spec["train"]["devices"] = 2  # different budgets cannot share one distributed pass: refused at validation
    path.write_text(yaml.safe_dump(spec))
    assert main(["validate", str(path)]) == 2
