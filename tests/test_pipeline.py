"""The whole flow under a Prefect test server, with a tiny random Llama and local text files."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from flows import stages
from flows.cli import main
from flows.spec import check_resources, parse_spec
from sae.model import TopKSAE


@pytest.fixture
def spec(tiny_model_dir, text_dir, tmp_path):
    s = parse_spec(
        {
            "name": "tiny",
            "model": {"source": str(tiny_model_dir)},
            "data": {"source": str(text_dir), "context_length": 16, "tokens": 1500, "eval_fraction": 0.3},
            "hookpoints": ["model.layers.1"],
            "sae": {"n_latents": 128, "k": 8, "dead_tokens": 500},
            "train": {"batch_tokens": 128, "tokens": 3000},
            "eval": {"tokens": 400, "downstream_contexts": 8},
            "workdir": str(tmp_path / "work"),
        }
    )
    check_resources(s)
    return s


def task_states(flow_state) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    # Prefect 3 records task runs from events, after the flow returns: a run may still lack its state
    deadline = time.monotonic() + 20
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id]))
            )
            if all(r.state is not None for r in runs) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    return {r.name.rsplit("-", 1)[0]: r.state.name if r.state else "no state" for r in runs}


def _refuse(*_a, **_k):
    raise AssertionError("this stage should have been re-used, not run")


# the two warnings MLflow printed in every run, now fixed at their cause (predict's type hint, an input example)
@pytest.mark.filterwarnings("error:Add type hints:UserWarning", "error:An input example was not provided:UserWarning")
def test_pipeline_end_to_end(prefect_harness, spec, tmp_path, monkeypatch):
    from flows.pipeline import pipeline

    first = pipeline(spec, return_state=True)
    rows = first.result()
    (row,) = rows
    assert row["model_uri"] == "models:/tiny@candidate"
    assert 0 < row["l0"] <= 8 and 0 < row["normalized_mse"] < 1
    assert 0 <= row["dead_fraction"] <= 1 and "ce_increase" in row and "kl_divergence" in row
    assert set(task_states(first).values()) == {"Completed"}

    # the same spec again: every stage is Cached (its value read back from its outputs, nothing
    # unpickled) and none of the stage functions runs; the store's checksums are checked again
    for name in stages.STAGES:
        monkeypatch.setattr(stages, name, _refuse)
    again = pipeline(spec, return_state=True)
    again_rows = again.result()
    walls = [row.pop("stage_seconds") for row in (*rows, *again_rows)]
    assert again_rows == rows  # every value read back, the wall times aside
    assert list(walls[0]) == list(stages.STAGES) and all(s >= 0 for w in walls for s in w.values())
    assert task_states(again) == {
        "verify_cache": "Completed",
        "cache_activations": "Cached",
        "train_sae": "Cached",
        "evaluate": "Cached",
        "register": "Cached",
    }

    # only train.lr changes: the activations are re-used, the rest runs again
    monkeypatch.undo()
    monkeypatch.setattr(stages, "cache", _refuse)
    new_lr = spec.model_copy(
        update={
            "train": spec.train.model_copy(update={"lr": 3e-3}),
            "registry": spec.registry.model_copy(update={"alias": "lr-trial"}),
        }
    )
    rows_lr = pipeline(new_lr)
    assert rows_lr[0]["sae_dir"] != row["sae_dir"] and rows_lr[0]["model_uri"] == "models:/tiny@lr-trial"

    # an output deleted behind Prefect's back is recomputed, not trusted from the cache
    monkeypatch.undo()
    (stages.metrics_path(spec, "model.layers.1")).unlink()
    assert pipeline(spec)[0]["normalized_mse"] == pytest.approx(row["normalized_mse"])

    # pull, then load with the documented call; a fresh process loads the pyfunc by alias
    uri = spec.tracking_uri()
    pulled = tmp_path / "pulled"
    assert main(["pull", "models:/tiny@candidate", "--out", str(pulled), "--tracking-uri", uri]) == 0
    sae = TopKSAE.load(pulled)
    x = np.random.default_rng(0).normal(size=(20, sae.cfg.d_in)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code = (
        "import mlflow, numpy as np, sys; mlflow.set_tracking_uri(sys.argv[1]);"
        "m = mlflow.pyfunc.load_model('models:/tiny@candidate');"
        "np.save(sys.argv[3], m.predict(np.load(sys.argv[2])))"
    )
    subprocess.run([sys.executable, "-c", code, uri, tmp_path / "x.npy", tmp_path / "codes.npy"], check=True)
    predicted = np.load(tmp_path / "codes.npy")
    expected = sae.encode(torch.from_numpy(x)).dense(sae.cfg.n_latents).detach().numpy()
    np.testing.assert_allclose(predicted, expected, rtol=1e-6)
    assert (predicted != 0).sum(1).max() <= 8
    meta = json.loads((pulled / "config.json").read_text())["metadata"]
    assert meta["hookpoint"] == "model.layers.1"

    # the version's run carries its metrics, the report and the histogram
    from mlflow import MlflowClient

    version = MlflowClient(tracking_uri=uri).get_model_version_by_alias("tiny", "candidate")
    run = MlflowClient(tracking_uri=uri).get_run(version.run_id)
    assert run.data.metrics["normalized_mse"] == pytest.approx(row["normalized_mse"], rel=1e-5)
    assert "Feature browser: artifact `browser/index.html`" in run.data.tags["mlflow.note.content"]
    assert "Feature browser (`browser/index.html`)" in version.description
    assert version.tags["k"] == "8" and version.tags["hookpoint"] == "model.layers.1"
    artifacts = {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(version.run_id)}
    assert {"browser", "activation_frequency.png", "train_history.json"} <= artifacts
    browser = {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(version.run_id, "browser")}
    assert {"browser/index.html", "browser/browser.js", "browser/data"} <= browser
    assert "probe_loss" in row and "n2g_recall" in row  # §4.2 and §4.3 in the evaluation's metrics

    # `saeflow report` rebuilds the browser from the registry alone
    assert main(["report", "models:/tiny@candidate", "--out", str(tmp_path / "rep"), "--tracking-uri", uri]) == 0
    summary = (tmp_path / "rep" / "browser" / "data" / "summary.js").read_text()
    assert summary.startswith("window.SAE") and (tmp_path / "rep" / "browser" / "index.html").exists()


def test_stage_needs_its_inputs(prefect_harness, spec):
    from flows.pipeline import pipeline

    with pytest.raises(RuntimeError, match=r"run `saeflow cache SPEC`"):
        pipeline(spec, only=("train",))


def test_saes_that_do_not_fit_together_train_in_groups_to_the_same_weights(
    prefect_harness, tiny_model_dir, text_dir, tmp_path
):
    """train.device_memory_gib below what three SAEs need together: one train task per group (sae/memory.py's
    packing), and each SAE ends with the weights it gets when all three train in one pass."""
    from flows.pipeline import pipeline
    from sae.lm import load_config
    from sae.memory import pack_groups

    def make(workdir: str, limit_gib: float | None):
        s = parse_spec(
            {
                "name": "groups",
                "model": {"source": str(tiny_model_dir)},
                "data": {"source": str(text_dir), "context_length": 16, "tokens": 1500, "eval_fraction": 0.3},
                "hookpoints": ["model.layers.1"],
                "sae": [{"n_latents": n, "k": 4, "dead_tokens": 500} for n in (64, 128, 256)],
                "train": {
                    "batch_tokens": 128,
                    "tokens": 1024,
                    "device": "cpu",
                    "device_memory_gib": limit_gib,
                    "shuffle_buffer_mb": 1,  # the reader's block, counted once, small beside the SAEs
                },
                "eval": {"tokens": 200, "downstream_contexts": 0, "browser": False, "ablation_contexts": 0},
                "workdir": str(tmp_path / workdir),
            }
        )
        check_resources(s)
        return s

    together = make("together", None)
    d_model = load_config(str(tiny_model_dir)).hidden_size
    plans = [together.memory_plan(d_model, i, device="cpu") for i in range(3)]
    limit_gib = max(p.total for p in plans) * 1.01 / 2**30
    expected = pack_groups(plans, int(limit_gib * 2**30))
    assert len(expected) > 1
    grouped = make("grouped", limit_gib)
    state = pipeline(grouped, return_state=True)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    assert sum(r.name.startswith("train_sae") for r in runs) == len(expected)
    pipeline(together)
    for i in range(3):
        a = TopKSAE.load(stages.sae_dir(grouped, "model.layers.1", i))
        b = TopKSAE.load(stages.sae_dir(together, "model.layers.1", i))
        assert torch.equal(a.W_dec, b.W_dec) and torch.equal(a.W_enc, b.W_enc), i
