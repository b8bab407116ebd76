"""The pipeline with its work dir and activation store in an object store (a real S3 server on
loopback): stages share nothing but that store and the registry, so a machine with an empty local
disk finds every finished stage, and a stage that failed is re-run alone from there."""

from __future__ import annotations

import json

import pytest
from test_pipeline import task_states

from flows import stages
from flows.spec import parse_spec

HOOK = "model.layers.1"
STAGE_TASKS = ("cache_activations", "train_sae", "evaluate", "register")


def s3_spec(tiny_model_dir, text_dir, s3, prefix: str, tracking_uri: str):
    return parse_spec(
        {
            "name": "tiny-s3",
            "model": {"source": str(tiny_model_dir)},
            "data": {"source": str(text_dir), "context_length": 16, "tokens": 1500, "eval_fraction": 0.3},
            "hookpoints": [HOOK],
            "sae": {"n_latents": 64, "k": 4, "dead_tokens": 500},
            "train": {"batch_tokens": 128, "tokens": 1500, "checkpoint_every_tokens": 512},
            "eval": {"tokens": 300, "downstream_contexts": 4, "browser": True, "ablation_contexts": 0},
            "registry": {"tracking_uri": tracking_uri},
            "workdir": f"s3://saeflow/{prefix}",
            "workdir_options": s3["options"],
        }
    )


def test_pipeline_on_an_s3_work_dir_is_found_by_a_machine_with_an_empty_disk(
    prefect_harness, tiny_model_dir, text_dir, s3_server, tmp_path, monkeypatch
):
    import s3fs

    from flows.pipeline import pipeline

    registry = f"sqlite:///{tmp_path / 'shared-registry.db'}"  # stands for the MLflow server here
    spec = s3_spec(tiny_model_dir, text_dir, s3_server, "run-a", registry)
    monkeypatch.setenv("SAEFLOW_SCRATCH", str(tmp_path / "machine-1"))
    rows = pipeline(spec)
    assert rows[0]["model_uri"] == "models:/tiny-s3@candidate"
    assert rows[0]["sae_dir"].startswith("s3://saeflow/run-a/saes/")

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server["endpoint"]})
    sae = rows[0]["sae_dir"].removeprefix("s3://")
    assert {"sae.safetensors", "config.json", "train_history.json"} <= {p.rsplit("/", 1)[-1] for p in fs.ls(sae)}
    assert not fs.exists(f"{sae}/checkpoints")  # removed once the SAE is complete
    eval_folder = rows[0]["report"].removeprefix("s3://").removesuffix("/browser/index.html")
    metrics = json.loads(fs.cat_file(eval_folder + "/metrics.json"))
    assert metrics["normalized_mse"] == pytest.approx(rows[0]["normalized_mse"])
    assert fs.exists(rows[0]["report"].removeprefix("s3://")) and fs.exists(eval_folder + "/browser/data/summary.js")
    assert fs.exists(stages.store_url(spec).removeprefix("s3://") + "/zarr.json")

    # another machine: nothing on its disk, the same object store and registry: everything is Cached
    monkeypatch.setenv("SAEFLOW_SCRATCH", str(tmp_path / "machine-2"))
    state = pipeline(spec, return_state=True)
    assert state.result()[0]["normalized_mse"] == pytest.approx(rows[0]["normalized_mse"])
    ran = task_states(state)
    assert [ran[t] for t in STAGE_TASKS] == ["Cached"] * 4, ran

    # evaluation outputs deleted from the object store: the third machine recomputes them (and only them)
    fs.rm(eval_folder, recursive=True)
    monkeypatch.setenv("SAEFLOW_SCRATCH", str(tmp_path / "machine-3"))
    ran = task_states(pipeline(spec, return_state=True))
    assert (
        ran["cache_activations"] == ran["train_sae"] == ran["register"] == "Cached" and ran["evaluate"] == "Completed"
    ), ran


def test_training_resumes_from_checkpoints_in_the_object_store_on_another_machine(
    prefect_harness, tiny_model_dir, text_dir, s3_server, tmp_path, monkeypatch
):
    """Training stopped after its first checkpoints; a machine with an empty disk resumes from them
    and ends with the same weights as an uninterrupted run."""
    from safetensors.torch import load_file

    import flows.training as train_module  # the lifecycle that calls train_saes

    registry = f"sqlite:///{tmp_path / 'registry.db'}"
    straight = s3_spec(tiny_model_dir, text_dir, s3_server, "straight", registry)
    interrupted = s3_spec(tiny_model_dir, text_dir, s3_server, "interrupted", registry)
    monkeypatch.setenv("SAEFLOW_SCRATCH", str(tmp_path / "machine-1"))
    from flows.pipeline import pipeline
    from flows.status import spec_status

    pipeline(straight, only=["cache", "train"])
    pipeline(interrupted, only=["cache"])

    class Stop(Exception):
        pass

    calls = {"n": 0}
    original = train_module.train_saes

    def stop_after_two_checkpoints(trainers, batches, progress, checkpoint, every, **options):
        def counting(t):
            checkpoint(t)
            calls["n"] += 1
            if calls["n"] == 2:
                raise Stop

        return original(trainers, batches, progress, counting, every, **options)

    monkeypatch.setattr(train_module, "train_saes", stop_after_two_checkpoints)
    with pytest.raises(Stop):
        stages.train(interrupted, HOOK, progress=False)
    monkeypatch.setattr(train_module, "train_saes", original)
    status = spec_status(interrupted)
    assert status["saes"][0]["train"]["state"] == "partial"
    assert status["saes"][0]["train"]["last_checkpoint"].startswith("s3://saeflow/interrupted/")

    monkeypatch.setenv("SAEFLOW_SCRATCH", str(tmp_path / "machine-2"))  # another machine
    stages.train(interrupted, HOOK, progress=False)
    a = load_file(stages.fetch_sae(straight, HOOK) / "sae.safetensors")
    b = load_file(stages.fetch_sae(interrupted, HOOK) / "sae.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("endpoint", "workdir: s3://saeflow/bad: EndpointConnectionError"),
        (
            "credentials",
            "set the store's credentials (S3: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or key and secret in "
            "workdir_options)",
        ),
        ("bucket", "workdir: s3://no-such-bucket/bad: no-such-bucket does not exist"),
    ],
)
def test_an_unusable_object_store_is_one_line_within_seconds(
    tiny_model_dir, text_dir, s3_server, tmp_path, monkeypatch, capsys, problem, expected
):
    import time

    import yaml

    from flows.cli import main

    spec = s3_spec(tiny_model_dir, text_dir, s3_server, "bad", f"sqlite:///{tmp_path / 'r.db'}").model_dump(mode="json")
    if problem == "endpoint":
        spec["workdir_options"] = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:1"}}
    elif problem == "credentials":
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no credential lookup off this machine
    else:
        spec["workdir"] = "s3://no-such-bucket/bad"
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    start = time.monotonic()
    assert main(["run", str(path)]) == 2
    assert time.monotonic() - start < 20
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
