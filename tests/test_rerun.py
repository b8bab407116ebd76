"""Re-run only what failed: a failure injected into each stage in turn (SAEFLOW_FAIL_STAGE), then the
same spec again runs only that stage and the ones after it; the earlier ones are Cached, untouched."""

from __future__ import annotations

import failing_stage
import pytest
from test_pipeline import task_states

from flows import done, stages
from flows.spec import parse_spec

HOOK = "model.layers.1"


def tiny(tiny_model_dir, text_dir, workdir, store):
    return parse_spec(
        {
            "name": "tiny",
            "model": {"source": str(tiny_model_dir)},
            "data": {
                "source": str(text_dir),
                "context_length": 16,
                "tokens": 1500,
                "eval_fraction": 0.3,
                "store": str(store),
            },
            "hookpoints": [HOOK],
            "sae": {"n_latents": 64, "k": 4, "dead_tokens": 500},
            "train": {"batch_tokens": 128, "tokens": 1500},
            "eval": {"tokens": 300, "downstream_contexts": 4, "browser": False, "ablation_contexts": 0},
            "workdir": str(workdir),
        }
    )


def outputs(spec) -> dict[str, int]:
    """Modification times of each stage's main output (0 when absent)."""
    files = {
        "cache": stages.store_url(spec) + "/zarr.json",
        "train": stages.sae_dir(spec, HOOK) / "sae.safetensors",
        "evaluate": stages.metrics_path(spec, HOOK),
    }
    from pathlib import Path

    return {k: Path(f).stat().st_mtime_ns if Path(f).exists() else 0 for k, f in files.items()}


@pytest.mark.parametrize("failing", stages.STAGES)
def test_rerun_runs_only_the_failed_stage_and_those_after(
    prefect_harness, tiny_model_dir, text_dir, tmp_path, monkeypatch, failing
):
    from flows.pipeline import pipeline

    # a separate work dir (and registry) per case; the activation store is shared unless cache is the one failing
    store = tmp_path / "store" if failing == "cache" else tmp_path.parent / "shared-store"
    spec = tiny(tiny_model_dir, text_dir, tmp_path / "work", store)
    with monkeypatch.context() as patch:
        failing_stage.failing(patch, failing)
        with pytest.raises(failing_stage.InjectedFailure, match=f"SAEFLOW_FAIL_STAGE={failing}"):
            pipeline(spec)
    before = outputs(spec)
    done_before = {s: done.is_done(s, spec, *(() if s == "cache" else (HOOK, 0))) for s in stages.STAGES}
    assert not done_before[failing]

    state = pipeline(spec, return_state=True)
    rows = state.result()
    assert rows[0]["model_uri"] == "models:/tiny@candidate"
    ran = task_states(state)
    position = stages.STAGES.index(failing)
    names = {"cache": "cache_activations", "train": "train_sae", "evaluate": "evaluate", "register": "register"}
    for i, stage in enumerate(stages.STAGES):
        expected = "Completed" if i >= position and not done_before[stage] else "Cached"
        assert ran[names[stage]] == expected, (stage, ran)
    after = outputs(spec)
    for stage in stages.STAGES[:position]:  # the stages before the failure were not redone
        if stage in before and before[stage]:
            assert after[stage] == before[stage], stage


def test_status_reports_each_stage_without_touching_anything(
    prefect_harness, tiny_model_dir, text_dir, tmp_path, capsys
):
    import json

    import yaml

    from flows.cli import main
    from flows.pipeline import pipeline

    spec = tiny(tiny_model_dir, text_dir, tmp_path / "work", tmp_path / "store")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))

    def status() -> dict:
        assert main(["status", str(path), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    empty = status()
    assert empty["cache"]["state"] == "missing"
    (sae,) = empty["saes"]
    assert [sae[s]["state"] for s in ("train", "evaluate", "register")] == ["missing"] * 3
    assert not (tmp_path / "work" / "mlflow.db").exists()  # asking did not create the registry

    first, *rest = stages.plan_cache(spec)
    stages.cache_shard(spec, *first)
    partial = status()["cache"]
    assert partial["state"] == "partial" and partial["shards_done"] == 1 and partial["shards"] == len(rest) + 1

    pipeline(spec)
    done = status()
    (sae,) = done["saes"]
    assert done["cache"]["state"] == "done" and sae["train"]["state"] == "done" and sae["evaluate"]["state"] == "done"
    assert sae["register"]["model_uri"] == "models:/tiny@candidate"
    assert sae["register"]["versions"] == [
        {
            "version": 1,
            "aliases": ["candidate"],
            "spec_hash": sae["register"]["versions"][0]["spec_hash"],
            "run_id": sae["register"]["versions"][0]["run_id"],
            "complete": True,
        }
    ]
    assert main(["status", str(path)]) == 0
    text = capsys.readouterr().out
    assert "register  done" in text and "versions: v1 @candidate" in text


def _delete_shard(spec):
    import shutil
    from pathlib import Path

    url = Path(stages.store_url(spec))
    victim = next(p for p in sorted(url.rglob("*")) if p.is_dir() and p.parent.name == "c")  # a chunk folder
    shutil.rmtree(victim)


def _delete_weights(spec):
    (stages.sae_dir(spec, HOOK) / "sae.safetensors").unlink()


def _delete_metrics(spec):
    stages.metrics_path(spec, HOOK).unlink()


def _delete_run(spec):
    from mlflow import MlflowClient

    from storage.registry import model_version

    run_id = model_version("models:/tiny@candidate").run_id
    MlflowClient().delete_run(run_id)


@pytest.mark.parametrize(
    "deleted, redone",
    [
        (_delete_shard, "cache_activations"),
        (_delete_weights, "train_sae"),
        (_delete_metrics, "evaluate"),
        (_delete_run, "register"),
    ],
)
def test_a_deleted_output_is_recomputed_never_trusted(
    prefect_harness, tiny_model_dir, text_dir, tmp_path, deleted, redone
):
    from flows.pipeline import pipeline

    spec = tiny(tiny_model_dir, text_dir, tmp_path / "work", tmp_path / "store")
    pipeline(spec)
    deleted(spec)
    ran = task_states(pipeline(spec, return_state=True))
    order = ["cache_activations", "train_sae", "evaluate", "register"]
    assert ran[redone] == "Completed", ran
    for name in order[: order.index(redone)]:
        assert ran[name] == "Cached", ran
    assert all(done.is_done(s, spec, *(() if s == "cache" else (HOOK, 0))) for s in stages.STAGES)
