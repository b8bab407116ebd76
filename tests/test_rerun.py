"""Re-run only what failed: a failure injected into each stage in turn (SAEFLOW_FAIL_STAGE), then the
same spec again runs only that stage and the ones after it; the earlier ones are Cached, untouched."""

from __future__ import annotations

import pytest

from flows import stages
from flows.spec import parse_spec

from test_pipeline import task_states

HOOK = "model.layers.1"


def tiny(tiny_model_dir, text_dir, workdir, store):
    return parse_spec({
        "name": "tiny",
        "model": {"source": str(tiny_model_dir)},
        "data": {"source": str(text_dir), "context_length": 16, "tokens": 1500, "eval_fraction": 0.3, "store": str(store)},
        "hookpoints": [HOOK],
        "sae": {"n_latents": 64, "k": 4, "dead_tokens": 500},
        "train": {"batch_tokens": 128, "tokens": 1500},
        "eval": {"tokens": 300, "downstream_contexts": 4, "report_latents": 0, "ablation_contexts": 0},
        "workdir": str(workdir),
    })


def outputs(spec) -> dict[str, int]:
    """Modification times of each stage's main output (0 when absent)."""
    files = {"cache": stages.store_url(spec) + "/zarr.json", "train": stages.sae_dir(spec, HOOK) / "sae.safetensors",
             "evaluate": stages.metrics_path(spec, HOOK)}
    from pathlib import Path

    return {k: Path(f).stat().st_mtime_ns if Path(f).exists() else 0 for k, f in files.items()}


@pytest.mark.parametrize("failing", stages.STAGES)
def test_rerun_runs_only_the_failed_stage_and_those_after(prefect_harness, tiny_model_dir, text_dir, tmp_path,
                                                          monkeypatch, failing):
    from flows.pipeline import InjectedFailure, pipeline

    # a separate work dir (and registry) per case; the activation store is shared unless cache is the one failing
    store = tmp_path / "store" if failing == "cache" else tmp_path.parent / "shared-store"
    spec = tiny(tiny_model_dir, text_dir, tmp_path / "work", store)
    monkeypatch.setenv("SAEFLOW_FAIL_STAGE", failing)
    with pytest.raises(InjectedFailure, match=f"SAEFLOW_FAIL_STAGE={failing}"):
        pipeline(spec)
    before = outputs(spec)
    done_before = {s: stages.is_done(s, spec, *(() if s == "cache" else (HOOK, 0))) for s in stages.STAGES}
    assert not done_before[failing]

    monkeypatch.delenv("SAEFLOW_FAIL_STAGE")
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
