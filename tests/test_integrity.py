"""Nothing wrong is marked done: damaged stores are named and repaired, divergence stops training,
non-finite results are never written or registered, no result file is unpickled, user errors are one
line, and only transient failures are retried."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flows import done, stages
from flows.retry import is_transient
from flows.spec import SpecError, parse_spec
from sae import SAEConfig, TopKSAE, TrainConfig, Trainer
from sae.train import NonFiniteLoss, train_saes
from storage import activations as store

REPO = Path(__file__).resolve().parents[1]


def tiny_spec(model_dir, text_dir, workdir, **extra) -> dict:
    return {
        "name": "tiny",
        "model": {"source": str(model_dir)},
        "data": {
            "source": str(text_dir),
            "context_length": 16,
            "tokens": 1500,
            "eval_fraction": 0.3,
            "shard_contexts": 6,
            "batch_contexts": 4,
        },
        "hookpoints": ["model.layers.1"],
        "sae": {"n_latents": 64, "k": 4, "dead_tokens": 500},
        "train": {"batch_tokens": 128, "tokens": 1500},
        "eval": {"tokens": 300, "downstream_contexts": 0},
        "workdir": str(workdir),
        **extra,
    }


def cache_all(spec) -> None:
    for split, index in stages.plan_cache(spec):
        stages.cache_shard(spec, split, index)
    stages.cache(spec)


def flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def evaluated_once(model_dir, text_dir, tmp_path):
    """(spec as written, spec, its metrics) of a tiny run cached, trained and evaluated, the metrics
    file then removed so that evaluate runs again."""
    spec_dict = tiny_spec(model_dir, text_dir, tmp_path / "work")
    spec = parse_spec(spec_dict)
    cache_all(spec)
    stages.train(spec, "model.layers.1", progress=False)
    clean = stages.evaluate(spec, "model.layers.1", progress=False)
    stages.metrics_path(spec, "model.layers.1").unlink()
    return spec_dict, spec, clean


def shard_file(spec, split: str, index: int) -> Path:
    return Path(stages.store_url(spec)) / split / "acts" / "model.layers.1" / "c" / str(index) / "0"


# store corruption -----------------------------------------------------------------------------------
def test_damaged_shards_are_named_by_every_reader_and_cache_repairs_exactly_them(
    prefect_harness, tiny_model_dir, text_dir, tmp_path
):
    import yaml

    from flows.cli import main

    spec_dict, spec, clean = evaluated_once(tiny_model_dir, text_dir, tmp_path)
    sae_dir = stages.sae_dir(spec, "model.layers.1")
    bad = {("train", 1), ("eval", 0), ("eval", 1)}
    good = {(s, i): shard_file(spec, s, i).read_bytes() for s, i in bad}
    untouched = {
        (s, i): shard_file(spec, s, i).stat().st_mtime_ns
        for s in ("train", "eval")
        for i in range(3)
        if (s, i) not in bad
    }

    flip_byte(shard_file(spec, "train", 1))
    flip_byte(shard_file(spec, "eval", 0))
    shard_file(spec, "eval", 1).unlink()
    with pytest.raises(store.IncompleteStoreError) as bad_eval:
        stages.evaluate(spec, "model.layers.1", progress=False)
    assert "eval shard 0 (contexts 0..5) of model.layers.1 is corrupted" in str(bad_eval.value)
    assert "eval shard 1 (contexts 6..11) of model.layers.1 is corrupted or gone" in str(bad_eval.value)
    assert "train shard" not in str(bad_eval.value)  # evaluate checks the split it reads
    for name in ("config.json", "sae.safetensors"):
        (sae_dir / name).rename(tmp_path / name)  # so that train runs (and reads the store) again
    with pytest.raises(
        store.IncompleteStoreError, match=r"train shard 1 \(contexts 6..11\) of model.layers.1 is corrupted"
    ):
        stages.train(spec, "model.layers.1", progress=False)
    assert not stages.metrics_path(spec, "model.layers.1").exists()

    # `saeflow cache` checks the finished store again and recomputes exactly the bad shards
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict))
    assert main(["cache", str(path)]) == 0
    assert all(shard_file(spec, s, i).read_bytes() == raw for (s, i), raw in good.items())
    assert {k: shard_file(spec, *k).stat().st_mtime_ns for k in untouched} == untouched
    assert store.bad_shards(stages.store_url(spec)) == [] and done.is_done("cache", spec)
    for name in ("config.json", "sae.safetensors"):
        (tmp_path / name).rename(sae_dir / name)
    assert stages.evaluate(spec, "model.layers.1", progress=False) == clean


def test_verify_command_reports_bad_shards(tiny_model_dir, text_dir, tmp_path, capsys):
    import yaml

    from flows.cli import main

    spec_dict = tiny_spec(tiny_model_dir, text_dir, tmp_path / "work")
    spec = parse_spec(spec_dict)
    cache_all(spec)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict))
    assert main(["verify", str(path)]) == 0
    assert "every shard" in capsys.readouterr().out
    flip_byte(shard_file(spec, "eval", 0))
    assert main(["verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert "bad: eval shard 0 (contexts 0..5) of model.layers.1 is corrupted" in out and "train shard" not in out


# divergence and non-finite results ---------------------------------------------------------------------
def test_divergent_training_stops_and_never_checkpoints_a_non_finite_state():
    x = torch.randn(4096, 16)
    trainer = Trainer(SAEConfig(16, 64, 4), TrainConfig(batch_tokens=256, tokens=4096, lr=1e30, log_every=4))
    trainer.initialize(x[:1024])
    saved = []

    def checkpoint(trainers):
        saved.append(all(torch.isfinite(p).all() for p in trainers[0].sae.parameters()))

    with pytest.raises(NonFiniteLoss, match=r"non-finite between steps \d+ and \d+ \(lr 1e\+30\).*lower train.lr"):
        train_saes([trainer], x.split(256), progress=False, checkpoint=checkpoint, checkpoint_every_tokens=256)
    assert all(saved)  # every checkpoint written holds finite weights
    assert trainer.steps < 16  # stopped at the check after the first non-finite loss, not at the end


def test_non_finite_weights_are_never_saved(tmp_path):
    sae = TopKSAE(SAEConfig(8, 16, 2))
    sae.reset_parameters()
    with torch.no_grad():
        sae.W_dec[3, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite weights"):
        sae.save(tmp_path / "sae")
    assert not (tmp_path / "sae" / "sae.safetensors").exists()


@pytest.mark.parametrize("lr", [float("inf"), float("nan"), -1.0, 0.0])
def test_non_finite_or_non_positive_lr_is_refused(lr):
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        TrainConfig(lr=lr)
    with pytest.raises(SpecError, match="train.lr"):
        parse_spec(
            {
                "name": "x",
                "model": {"source": "m"},
                "hookpoints": ["h"],
                "sae": {"n_latents": 8, "k": 2},
                "train": {"lr": lr},
            }
        )


def test_non_finite_metrics_are_not_written_and_registration_refuses_them(tmp_path):
    with pytest.raises(done.NonFiniteError, match=r"normalized_mse=nan"):
        done.check_finite_metrics({"normalized_mse": float("nan"), "l0": 4.0}, "the evaluation")
    path = tmp_path / "metrics.json"
    path.write_text('{"normalized_mse": NaN}')
    with pytest.raises(done.NonFiniteError):
        done.read_metrics(path)

    from safetensors.torch import save_file

    from storage.registry import register_sae

    sae = TopKSAE(SAEConfig(8, 16, 2))
    sae.reset_parameters()
    sae.save(tmp_path / "sae")
    tensors = {k: v.clone() for k, v in sae.state_dict().items()}
    tensors["W_dec"][0, 0] = float("inf")
    save_file(tensors, tmp_path / "sae" / "sae.safetensors")
    config = json.loads((tmp_path / "sae" / "config.json").read_text())  # a consistent checksum: only the inf is wrong
    config["weights_sha256"] = hashlib.sha256((tmp_path / "sae" / "sae.safetensors").read_bytes()).hexdigest()
    (tmp_path / "sae" / "config.json").write_text(json.dumps(config))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(FloatingPointError, match="refusing to register .*W_dec"):
        register_sae(
            tmp_path / "sae",
            tracking_uri=uri,
            experiment="x",
            model_name="x",
            alias="candidate",
            params={},
            metrics={"normalized_mse": 0.1},
            tags={},
        )
    assert not (tmp_path / "mlflow.db").exists()  # refused before touching the registry


# no code execution from the work dir ------------------------------------------------------------------
def test_no_unpickling_path_in_the_product():
    pattern = re.compile(
        r"\b(pickle|cloudpickle|dill|joblib)\.load|torch\.load\(|allow_pickle\s*=\s*True|persist_result\s*=\s*True"
    )
    hits = [
        f"{p.relative_to(REPO)}:{i}"
        for d in ("flows", "sae", "storage")
        for p in (REPO / d).rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert hits == []


def test_pipeline_persists_no_task_results(prefect_harness, tiny_model_dir, text_dir, tmp_path):
    """Prefect result files name their own deserializer (pickle included): none may be written or read."""
    from flows import pipeline

    spec = parse_spec(tiny_spec(tiny_model_dir, text_dir, tmp_path / "work"))
    for name in ("cache_activations", "train_sae", "evaluate", "register", "cache_shard", "plan_cache", "verify_cache"):
        assert getattr(pipeline, name).persist_result is False, name
    pipeline.run_pipeline(spec, only=("cache",))
    pipeline.run_pipeline(spec, only=("cache",))
    written = [p for p in (tmp_path / "work").rglob("*") if p.is_file() and _is_prefect_result(p)]
    assert written == [] and not (tmp_path / "work" / "prefect-results").exists()


def _is_prefect_result(path: Path) -> bool:
    try:
        return "serializer" in json.loads(path.read_bytes()).get("metadata", {})
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False


# retries ----------------------------------------------------------------------------------------------
def test_only_transient_errors_are_retried(prefect_harness):
    from mlflow.exceptions import MlflowException, RestException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE
    from prefect import flow, task

    from flows.retry import retry_transient

    assert is_transient(ConnectionRefusedError()) and is_transient(TimeoutError())
    assert is_transient(MlflowException("server busy", error_code=TEMPORARILY_UNAVAILABLE))
    assert is_transient(RestException({"error_code": "INTERNAL_ERROR", "message": "server error"}))
    assert not is_transient(MlflowException("a client-side failure"))  # INTERNAL_ERROR by default
    assert is_transient(RuntimeError("wrapped")) is False
    try:
        try:
            raise ConnectionResetError("peer")
        except ConnectionResetError as e:
            raise RuntimeError("upload failed") from e
    except RuntimeError as wrapped:
        assert is_transient(wrapped)
    assert not is_transient(ValueError("bad value")) and not is_transient(MemoryError())
    assert not is_transient(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_transient(MlflowException("bad alias", error_code=INVALID_PARAMETER_VALUE))

    calls = {"bad": 0, "flaky": 0}

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_transient, persist_result=False)
    def bad():
        calls["bad"] += 1
        raise ValueError("train.lr is wrong")

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_transient, persist_result=False)
    def flaky():
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise ConnectionResetError("server went away")
        return "ok"

    @flow
    def both():
        assert flaky() == "ok"
        bad()

    with pytest.raises(ValueError, match="train.lr is wrong"):
        both()
    assert calls == {"bad": 1, "flaky": 3}


# tracking URI precedence and CLI errors -----------------------------------------------------------------
def test_tracking_uri_precedence(monkeypatch, tmp_path):
    base = {
        "name": "x",
        "model": {"source": "m"},
        "hookpoints": ["h"],
        "sae": {"n_latents": 8, "k": 2},
        "workdir": str(tmp_path),
    }
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert parse_spec(base).tracking_uri_and_source() == (f"sqlite:///{tmp_path / 'mlflow.db'}", "the embedded default")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert parse_spec(base).tracking_uri_and_source() == ("http://127.0.0.1:5999", "$MLFLOW_TRACKING_URI")
    spec = parse_spec({**base, "registry": {"tracking_uri": "http://127.0.0.1:6000"}})
    assert spec.tracking_uri_and_source() == ("http://127.0.0.1:6000", "registry.tracking_uri in the spec")


def run_cli(*args, cwd, env_extra=None):
    import os

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["pull", "runs:/abc/sae", "--out", "out", "--tracking-uri", "sqlite:///reg.db"],
            "model URI 'runs:/abc/sae': write models:/NAME@ALIAS",
        ),
        (
            ["pull", "models:/tiny@candidate", "--out", "out"],
            "no MLflow tracking URI: pass one (tracking_uri=..., --tracking-uri)",
        ),
        (
            ["pull", "models:/tiny@candidate", "--out", "out", "--tracking-uri", "sqlite:///typo.db"],
            "no such MLflow database file",
        ),
        (
            ["pull", "models:/nosuch@candidate", "--out", "out", "--tracking-uri", "sqlite:///reg.db"],
            "models:/nosuch@candidate is not registered",
        ),
    ],
)
def test_pull_errors_are_one_line_exit_2_and_leave_no_files(tmp_path, args, message):
    if "reg.db" in args[-1]:  # an existing registry without that model
        _register(tmp_path, "aaa", 0)
        (tmp_path / "mlflow.db").rename(tmp_path / "reg.db")
    done = run_cli(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in done.stderr
    assert (
        not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    )
    assert not (tmp_path / "typo.db").exists()


# registration: idempotent and all-or-nothing ----------------------------------------------------------
def _register(tmp_path, spec_hash: str, seed: int):
    from storage.registry import register_sae

    sae = TopKSAE(SAEConfig(8, 16, 2))
    sae.reset_parameters(generator=torch.Generator().manual_seed(seed))
    directory = sae.save(tmp_path / f"sae-{seed}")
    return register_sae(
        directory,
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        experiment="x",
        model_name="tiny",
        alias="candidate",
        params={},
        metrics={"normalized_mse": 0.1},
        tags={"spec_hash": spec_hash},
        artifact_root=tmp_path / "artifacts",
    )


def test_registration_is_found_again_after_the_alias_moves(tmp_path):
    from storage.registry import find_registered

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = _register(tmp_path, "aaa", 0)
    assert find_registered(uri, "tiny", "candidate", "aaa") == first
    _register(tmp_path, "bbb", 1)  # someone's other SAE takes the alias
    again = find_registered(uri, "tiny", "candidate", "aaa")
    assert again is not None and again.version == first.version and again.uri == "models:/tiny/1"
    assert find_registered(uri, "tiny", "candidate", "ccc") is None
    assert find_registered(uri, "tiny", "candidate", "aaa", weights_sha256="0" * 64) is None  # other weights


def test_a_tracking_server_that_is_down_is_an_error_not_absent(monkeypatch):
    import socket

    from storage.registry import find_registered

    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(Exception) as e:
        find_registered(f"http://127.0.0.1:{port}", "tiny", "candidate", "aaa")
    assert is_transient(e.value) or "Connection refused" in str(e.value) or "Max retries" in str(e.value)


def test_a_failed_registration_leaves_no_orphan_version(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from storage.registry import find_registered

    def unreachable(*_a, **_k):
        raise ConnectionError("tracking server went away")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", unreachable)
    with pytest.raises(ConnectionError):
        _register(tmp_path, "aaa", 0)
    monkeypatch.undo()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert MlflowClient(tracking_uri=uri).search_model_versions("name = 'tiny'") == []
    assert find_registered(uri, "tiny", "candidate", "aaa") is None
    assert _register(tmp_path, "aaa", 0).version == "2"  # the retry registers once, completely


def test_pulled_weights_are_checked_against_the_registered_sha256(tmp_path):
    from storage.registry import pull

    registered = _register(tmp_path, "aaa", 0)
    out = pull(registered.uri, tmp_path / "pulled", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert (out / "sae.safetensors").read_bytes() == (tmp_path / "sae-0" / "sae.safetensors").read_bytes()
    stored = next((tmp_path / "artifacts").rglob("sae.safetensors"))
    flip_byte(stored)
    with pytest.raises(OSError, match="does not match its registered sha256"):
        pull(registered.uri, tmp_path / "pulled-again", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not (tmp_path / "pulled-again").exists()


# two runs of one spec at once -------------------------------------------------------------------------
def test_two_concurrent_runs_of_one_spec_compute_each_shard_once(tiny_model_dir, text_dir, tmp_path):
    """Started together by one user (one HOME): each has a Prefect server of its own (they shared
    ~/.prefect/prefect.db), and one waits for the other's shards."""
    import os

    import yaml

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(tiny_model_dir, text_dir, tmp_path / "work")))
    (tmp_path / "home").mkdir()
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp")}
    for name in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_PROFILES_PATH"):
        env.pop(name, None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "cache", str(path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert not (tmp_path / "home" / ".prefect" / "prefect.db").exists()
    assert list((tmp_path / "tmp").iterdir()) == []  # each home is removed at exit
    assert [p.returncode for p in procs] == [0, 0], outs
    both = "\n".join(outs)
    assert both.count("computing") == 1 and "waiting for it to finish" in both, both
    assert "telemetry" not in both and "Warning" not in both and "Traceback" not in both, both  # quiet, offline
    spec = parse_spec(tiny_spec(tiny_model_dir, text_dir, tmp_path / "work"))
    assert done.is_done("cache", spec) and store.bad_shards(stages.store_url(spec)) == []


def test_an_unreachable_prefect_api_is_one_line_naming_it(tiny_model_dir, text_dir, tmp_path):
    import socket

    import yaml

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(tiny_model_dir, text_dir, tmp_path / "work")))
    done = run_cli("run", str(path), cwd=tmp_path, env_extra={"PREFECT_API_URL": f"http://127.0.0.1:{port}/api"})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert lines[-1] == (
        f"saeflow run: cannot reach the Prefect API at http://127.0.0.1:{port}/api: start that server "
        "(prefect server start) or unset PREFECT_API_URL to run with a temporary local one"
    )
    assert not (tmp_path / "work" / "activations").exists()


def test_a_killed_run_is_marked_crashed_by_the_next_run_of_its_spec(
    prefect_harness, tiny_model_dir, text_dir, tmp_path
):
    """The flow run of a process killed mid-run would stay Running on the server forever."""
    import os
    import signal
    import socket
    import time

    import yaml
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from flows.pipeline import run_pipeline

    spec_dict = tiny_spec(tiny_model_dir, text_dir, tmp_path / "work")
    spec_dict["data"].update(tokens=3000, shard_contexts=4)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict))
    spec = parse_spec(spec_dict)
    markers = Path(stages.store_url(spec)) / "_shards"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "cache", str(path)],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(markers.glob("*.json"))) < 3:
        assert proc.poll() is None, "the caching finished before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    tag = f"saeflow-run:{socket.gethostname()}:{spec.part_hash(*stages.CACHE_SECTIONS)}"

    def states() -> dict[str, str]:  # of this spec's flow runs (the test server is shared by the session)
        with get_client(sync_client=True) as client:
            return {str(r.id): r.state.type.value for r in client.read_flow_runs() if tag in r.tags}

    (killed,) = [i for i, s in states().items() if s == "RUNNING"]
    run_pipeline(spec, only=("cache",))
    after = states()
    assert after[killed] == "CRASHED" and sorted(after.values()) == ["COMPLETED", "CRASHED"]


def test_the_ui_hint_of_an_http_tracking_server_is_the_server(capsys, tmp_path):
    from flows.cli import _print_summary

    base = {
        "name": "x",
        "model": {"source": "m"},
        "hookpoints": ["h"],
        "sae": {"n_latents": 8, "k": 2},
        "workdir": str(tmp_path),
    }
    _print_summary(parse_spec({**base, "registry": {"tracking_uri": "http://127.0.0.1:5000"}}), [])
    out = capsys.readouterr().out
    assert "MLflow UI     http://127.0.0.1:5000   (the tracking server serves it)" in out
    assert "--backend-store-uri http" not in out and "(from registry.tracking_uri in the spec)" in out


def test_an_unreachable_dask_scheduler_fails_at_once_naming_the_field(tiny_model_dir, text_dir, tmp_path):
    import socket
    import time

    import yaml

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = tiny_spec(
        tiny_model_dir, text_dir, tmp_path / "work", orchestration={"dask_address": f"tcp://127.0.0.1:{port}"}
    )
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    start = time.monotonic()
    done = run_cli("cache", str(path), cwd=tmp_path)
    assert done.returncode == 2 and time.monotonic() - start < 25, done.stderr  # Dask alone waits 30 s
    assert done.stderr.strip().splitlines()[-1] == (
        f"saeflow cache: orchestration.dask_address: cannot reach the Dask scheduler at tcp://127.0.0.1:{port} "
        "(Connection refused): start it, or fix orchestration.dask_address in the spec"
    )
    assert not (tmp_path / "work" / "activations").exists()


def test_a_damaged_checkpoint_is_named_and_training_resumes_from_the_one_before(
    tiny_model_dir, text_dir, tmp_path, monkeypatch, caplog
):
    """Bytes of sae.W_dec overwritten in the newest checkpoint: the run names it, resumes from the
    previous one, and ends with the weights of an uninterrupted run."""
    from flows import training
    from storage.checkpoints import DamagedCheckpoint, load_checkpoint

    store_dir = tmp_path / "store"
    train = {"batch_tokens": 128, "tokens": 1500, "checkpoint_every_tokens": 256}
    straight = parse_spec(tiny_spec(tiny_model_dir, text_dir, tmp_path / "a", train=train))
    straight = straight.model_copy(update={"data": straight.data.model_copy(update={"store": str(store_dir)})})
    cache_all(straight)
    stages.train(straight, "model.layers.1", progress=False)
    reference = TopKSAE.load(stages.sae_dir(straight, "model.layers.1"))

    spec = straight.model_copy(update={"workdir": str(tmp_path / "b")})
    saved, count = training.save_and_publish_checkpoint, [0]

    class Killed(Exception):
        pass

    def checkpoint(work, rel, trainer):
        saved(work, rel, trainer)
        count[0] += 1
        if count[0] == 4:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(training, "save_and_publish_checkpoint", checkpoint)
        with pytest.raises(Killed):
            stages.train(spec, "model.layers.1", progress=False)
    ckpts = stages.sae_dir(spec, "model.layers.1") / "checkpoints"
    newest = ckpts / "step-000000008"
    raw = bytearray((newest / "state.safetensors").read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    offsets = json.loads(raw[8:header])["sae.W_dec"]["data_offsets"]
    raw[header + offsets[0] : header + offsets[0] + 64] = bytes(64)  # zeroes in the decoder
    (newest / "state.safetensors").write_bytes(bytes(raw))
    with pytest.raises(DamagedCheckpoint, match="step-000000008 is damaged: state.safetensors does not match"):
        load_checkpoint(ckpts, 8)

    caplog.set_level("INFO")
    stages.train(spec, "model.layers.1", progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(str(newest) in w and "not resuming from it" in w for w in warnings), warnings
    assert any("from checkpoints at step 6" in r.getMessage() for r in caplog.records)
    resumed = TopKSAE.load(stages.sae_dir(spec, "model.layers.1"))
    for name, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_changed_weights_are_retrained_and_never_registered_with_old_metrics(
    tiny_model_dir, text_dir, tmp_path, monkeypatch
):
    """64 bytes of sae.safetensors zeroed after the evaluation: registering refuses (the metrics
    measured other weights), the weights are named when loaded, and a new run trains them again
    and registers nothing new with the old metrics."""
    from mlflow import MlflowClient

    import flows.paths as flows_paths
    from sae.model import DamagedWeights

    spec = parse_spec(
        tiny_spec(
            tiny_model_dir, text_dir, tmp_path / "w", eval={"tokens": 300, "downstream_contexts": 0, "browser": False}
        )
    )
    hook = "model.layers.1"
    cache_all(spec)
    stages.train(spec, hook, progress=False)
    stages.evaluate(spec, hook, progress=False)
    weights = stages.sae_dir(spec, hook) / "sae.safetensors"
    hashes = []
    real = flows_paths.weights_intact
    monkeypatch.setattr(flows_paths, "weights_intact", lambda d: hashes.append(d) or real(d))
    flows_paths._intact_as_of.cache_clear()
    assert done.is_done("train", spec, hook) and done.is_done("train", spec, hook)
    assert len(hashes) == 1  # hashed once while the files stay as they are
    good = weights.read_bytes()
    raw = bytearray(good)
    raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)
    weights.write_bytes(bytes(raw))
    with pytest.raises(DamagedWeights, match=f"{re.escape(str(weights))} does not match the sha256 in its config.json"):
        TopKSAE.load(weights.parent)
    assert not done.is_done("train", spec, hook)
    with pytest.raises(ValueError, match="were not measured on the weights .* holds now: run `saeflow run SPEC`"):
        stages.register(spec, hook)
    assert (
        MlflowClient(tracking_uri=spec.tracking_uri()).search_model_versions(f"name = '{spec.model_name(hook, 0)}'")
        == []
    )

    weights.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(DamagedWeights, match="does not match"):
        TopKSAE.load(weights.parent)
    stages.train(spec, hook, progress=False)  # trains it again: the same bits on this CPU
    assert weights.read_bytes() == good
    assert done.is_done("evaluate", spec, hook, 0)  # the metrics measured exactly these weights
    stages.register(spec, hook)
    assert (
        len(
            MlflowClient(tracking_uri=spec.tracking_uri()).search_model_versions(f"name = '{spec.model_name(hook, 0)}'")
        )
        == 1
    )


def test_damaged_token_arrays_are_named_and_cache_plans_the_store_again(tiny_model_dir, text_dir, tmp_path, capsys):
    """The token ids of the eval split deleted: evaluate would score the LM on zeros (CE 13 instead of
    5). Every reader names the file, verify reports it, and cache plans the store again."""
    import yaml

    from flows.cli import main

    spec_dict, spec, clean = evaluated_once(tiny_model_dir, text_dir, tmp_path)
    root = Path(stages.store_url(spec))
    (root / "eval/tokens/c/0/0").unlink()
    flip_byte(root / "train/doc_index/c/1/0")
    named = f"the tokens of eval ({root}/eval/tokens/c/0/0) are corrupted or gone"
    with pytest.raises(store.IncompleteStoreError, match=re.escape(named)):
        stages.evaluate(spec, "model.layers.1", progress=False)
    with pytest.raises(store.IncompleteStoreError, match=re.escape(f"the doc_index of train ({root}/train/doc_index")):
        stages.cache_shard(spec, "train", 1)  # a shard is never computed from damaged token ids
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict))
    assert main(["verify", str(path)]) == 1
    assert f"bad: {named}" in capsys.readouterr().out
    assert main(["cache", str(path)]) == 0
    assert store.bad_shards(stages.store_url(spec)) == [] and done.is_done("cache", spec)
    assert stages.evaluate(spec, "model.layers.1", progress=False) == clean


def test_an_sae_on_which_no_latent_fires_gets_its_metrics(tiny_model_dir, text_dir, tmp_path):
    spec_dict = tiny_spec(tiny_model_dir, text_dir, tmp_path / "work", eval={"tokens": 300, "downstream_contexts": 8})
    spec = parse_spec(spec_dict)
    cache_all(spec)
    stages.train(spec, "model.layers.1", progress=False)
    folder = stages.sae_dir(spec, "model.layers.1")
    sae = TopKSAE.load(folder)
    with torch.no_grad():
        sae.W_enc.zero_()  # every pre-activation 0: nothing fires
        if sae.b_enc is not None:  # on by default: the sink latents' gates sit below 0, the rest at 0
            sae.b_enc.zero_()
    sae.save(folder, metadata=sae.metadata)
    metrics = stages.evaluate(spec, "model.layers.1", progress=False)
    assert metrics["dead_fraction"] == 1.0 and metrics["ablation_sparsity_samples"] == 0.0
    assert "ablation_sparsity" not in metrics and metrics["normalized_mse"] > 0.99


def test_work_dir_files_are_shared_as_the_umask_says(tiny_model_dir, text_dir, tmp_path):
    """A second user of a shared work dir reads what the first wrote (safetensors' own writer makes
    0600 files)."""
    import os

    from storage.checkpoints import save_checkpoint
    from storage.formats import export

    (tmp_path / "probe").touch()
    expected = (tmp_path / "probe").stat().st_mode & 0o777
    _, spec, _ = evaluated_once(tiny_model_dir, text_dir, tmp_path)
    sae = TopKSAE.load(stages.sae_dir(spec, "model.layers.1"))
    export(sae, "saelens", tmp_path / "work" / "saelens")
    plain = TopKSAE(SAEConfig(32, 64, 4, normalization="none"))
    export(plain, "sparsify", tmp_path / "work" / "sparsify")
    save_checkpoint(tmp_path / "work" / "checkpoints", {"w": torch.zeros(2)}, {"steps": 1})
    files = [Path(d) / f for d, _, names in os.walk(tmp_path / "work") for f in names]
    assert sum(f.suffix == ".safetensors" for f in files) >= 4  # the SAE, two exports, a checkpoint
    narrower = [f"{oct(f.stat().st_mode & 0o777)} {f}" for f in files if f.stat().st_mode & expected != expected]
    assert narrower == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: " + "[" * 5000 + "]" * 5000 + "\n", "nests deeper than Python can read"),
        ("name: x\nmodel: {source: m}\nhookpoints: [h]\nsae: {n_latents: 64}\nworkdir: ''\n", "workdir: is empty"),
    ],
)
def test_odd_spec_files_are_one_line_exit_2(tmp_path, capsys, text, message):
    from flows.cli import main

    (tmp_path / "s.yaml").write_text(text)
    assert main(["validate", str(tmp_path / "s.yaml")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("fmt", ["saeflow", "saelens", "sparsify"])
def test_a_config_claiming_more_weights_than_its_file_holds_is_refused_before_allocating(tmp_path, fmt):
    """A small SAE's config rewritten to claim 10^12 latents: the file's header is read first, so
    loading fails at once naming both files, instead of allocating (or failing to allocate) terabytes."""
    from storage.formats import FormatError, export

    sae = TopKSAE(SAEConfig(8, 16, 2, normalization="none"))
    sae.reset_parameters()
    folder = tmp_path / fmt
    if fmt == "saeflow":
        sae.save(folder)
    else:
        export(sae, fmt, folder)
    config = next(p for p in folder.iterdir() if p.suffix == ".json")
    text = config.read_text()
    for key in ('"n_latents": 16', '"d_sae": 16', '"num_latents": 16'):
        text = text.replace(key, key.replace("16", str(10**12)))
    config.write_text(text)
    with pytest.raises(
        (FormatError, ValueError), match=r"does not fit .*json|has shape \(16, 8\), but the config says"
    ):
        TopKSAE.from_pretrained(folder)


def test_pull_and_export_never_write_through_a_planted_symlink_and_leave_nothing_on_failure(tmp_path, monkeypatch):
    import shutil as sh

    from storage.formats import export
    from storage.registry import pull

    registered = _register(tmp_path, "aaa", 0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    written = ["pulled/config.json", "pulled/sae.safetensors", "exported/cfg.json", "exported/sae_weights.safetensors"]
    for f in written:  # links planted where each writes its files
        (tmp_path / f).parent.mkdir(exist_ok=True)
        (tmp_path / f).symlink_to(victim)
    pull(registered.uri, tmp_path / "pulled", uri)
    sae = TopKSAE.load(tmp_path / "pulled")
    export(sae, "saelens", tmp_path / "exported")
    assert victim.read_text() == "precious"
    assert all((tmp_path / f).is_file() and not (tmp_path / f).is_symlink() for f in written)
    assert torch.equal(TopKSAE.from_pretrained(tmp_path / "exported").W_dec, sae.W_dec)

    real = sh.copyfile

    def disk_full(src, dst, *a, **k):  # the weights go in, then the disk is full
        if ".full.partial-" in str(dst) and Path(dst).name == "config.json":
            raise OSError(28, "No space left on device")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(sh, "copyfile", disk_full)
    with pytest.raises(OSError, match="No space left"):
        pull(registered.uri, tmp_path / "full", uri)
    assert sorted(p.name for p in tmp_path.iterdir() if "full" in p.name) == []


def test_an_interrupted_registration_is_refused_everywhere_and_replaced_by_the_rerun(tmp_path, monkeypatch):
    """Killed after the alias moved, before the completion tag (a kill runs no cleanup): promote,
    pull, from_pretrained and the alias lookup refuse the version, ls marks it, and registering
    again replaces it instead of adding a duplicate."""
    import contextlib
    import io

    from mlflow import MlflowClient

    from flows.cli import main
    from storage import registry

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _register(tmp_path, "aaa", 0)
    real = MlflowClient.set_model_version_tag

    def killed(self, name, version, key, value):
        if key == registry.COMPLETE_TAG:
            raise KeyboardInterrupt
        return real(self, name, version, key, value)

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "set_model_version_tag", killed)
        patch.setattr(registry, "_delete_quietly", lambda *a: None)
        with pytest.raises(KeyboardInterrupt):
            _register(tmp_path, "bbb", 1)
    assert str(registry.model_version("models:/tiny@candidate").version) == "2"  # the alias had moved
    with pytest.raises(ValueError, match="version 2 of tiny is an interrupted registration: not promoted"):
        registry.promote(uri, "tiny", "2", "champion")
    with pytest.raises(registry.NotRegistered, match="is version 2, an interrupted registration"):
        registry.pull("models:/tiny@candidate", tmp_path / "pulled", uri)
    with pytest.raises(registry.NotRegistered, match="an interrupted registration"):
        TopKSAE.from_pretrained("models:/tiny@candidate", tracking_uri=uri)
    assert not (tmp_path / "pulled").exists()
    sha = hashlib.sha256((tmp_path / "sae-1" / "sae.safetensors").read_bytes()).hexdigest()
    assert registry.find_registered(uri, "tiny", "candidate", "bbb", sha) is None
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["ls", "--tracking-uri", uri]) == 0
    lines = out.getvalue().splitlines()
    assert any(line.strip().startswith("v2") and "INTERRUPTED" in line for line in lines), lines
    assert not any(line.strip().startswith("v1") and "INTERRUPTED" in line for line in lines)

    again = _register(tmp_path, "bbb", 1)
    versions = MlflowClient(tracking_uri=uri).search_model_versions("name = 'tiny'")
    assert sorted(int(v.version) for v in versions) == [1, int(again.version)]  # v2 replaced, not duplicated
    assert all(registry.is_complete(v) for v in versions)
    assert str(registry.model_version("models:/tiny@candidate").version) == again.version


def test_a_tracking_server_that_accepts_connections_and_never_answers_fails_in_seconds(
    prefect_harness, tiny_model_dir, text_dir, tmp_path
):
    import contextlib
    import io
    import socket
    import time

    import yaml

    from flows.cli import main

    with socket.socket() as silent:  # the kernel completes the handshakes; nothing ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        path = tmp_path / "spec.yaml"
        path.write_text(
            yaml.safe_dump(tiny_spec(tiny_model_dir, text_dir, tmp_path / "work", registry={"tracking_uri": uri}))
        )
        started = time.monotonic()
        with contextlib.redirect_stderr(io.StringIO()) as stderr:  # (not capsys: see test_registry.py)
            assert main(["run", str(path)]) == 2
        took = time.monotonic() - started
    err = stderr.getvalue().strip().splitlines()
    assert err[-1] == (
        f"saeflow run: the MLflow tracking server at {uri} (registry.tracking_uri in the spec) accepts connections "
        "but does not answer: start it, or fix its address"
    ), err
    assert took < 10, f"{took:.1f} s"
    assert not (tmp_path / "work" / "activations").exists()  # before any work


def test_a_tracking_server_that_is_down_mid_run_is_named_in_the_error_line(tmp_path, monkeypatch):
    """The line names the server, not "the tracking URI printed above" (which may not have been)."""
    import socket

    from flows.cli import _unreachable_server
    from storage.registry import list_models

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again below: nothing listens
    with pytest.raises(Exception) as e:
        list_models(uri)
    fix = "start it, or fix registry.tracking_uri / MLFLOW_TRACKING_URI"
    assert _unreachable_server(e.value) == f"cannot reach the MLflow tracking server at {uri}: {fix}"


def test_a_kill_while_a_checkpoint_is_written_resumes_from_the_one_before(tmp_path):
    """Killed after the tensors of a checkpoint were written and before its meta.json: the half-written
    folder is never taken for a checkpoint, and the run resumes from the previous one."""
    from storage import checkpoints

    class Killed(BaseException):
        pass

    state = {"w": torch.arange(4.0)}
    checkpoints.save_checkpoint(tmp_path, state, {"steps": 10})
    real = Path.write_text

    def killed(self, *args, **kwargs):
        if self.name == checkpoints.META_FILE:
            raise Killed
        return real(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "write_text", killed)
        with pytest.raises(Killed):
            checkpoints.save_checkpoint(tmp_path, {"w": torch.zeros(4)}, {"steps": 20})
    assert checkpoints.intact_steps(tmp_path) == [10]
    tensors, meta = checkpoints.load_checkpoint(tmp_path)
    assert meta == {"steps": 10} and torch.equal(tensors["w"], state["w"])
    checkpoints.save_checkpoint(tmp_path, {"w": torch.ones(4)}, {"steps": 20})  # the re-run writes it whole
    assert checkpoints.intact_steps(tmp_path) == [10, 20]


def test_a_failed_stage_is_reported_without_tracebacks(tiny_model_dir, text_dir, tmp_path):
    """Prefect logs a failed task's traceback; the CLI shows its message and its own last line only
    (--debug shows the traceback)."""
    import os

    import yaml

    spec_dict = tiny_spec(tiny_model_dir, text_dir, tmp_path / "work")
    cache_all(parse_spec(spec_dict))
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict))
    inject = {
        "SAEFLOW_FAIL_STAGE": "train",
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "inject"), str(REPO / "tests")]),
    }
    done = run_cli("train", str(path), cwd=tmp_path, env_extra=inject)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    last = (
        "saeflow train failed: SAEFLOW_FAIL_STAGE=train: failure injected at the start of the train stage  "
        "(--debug shows the traceback)"
    )
    assert last in done.stderr.strip().splitlines()[-2:]  # (then Prefect's own server may say it stops)
