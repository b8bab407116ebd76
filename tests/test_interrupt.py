"""Ctrl-C in a terminal (SIGINT to the process group): the run stops within seconds, training leaves
a checkpoint at the step it reached, the temporary Prefect server outlives the run's last report,
and the user reads one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from flows import stages
from flows.spec import parse_spec
from storage.checkpoints import intact_steps


@pytest.mark.parametrize("group", [True, False], ids=["process-group", "process-alone"])
def test_ctrl_c_stops_training_at_a_step_with_a_checkpoint_and_one_line(tiny_model_dir, text_dir, tmp_path, group):
    spec_dict = {
        "name": "tiny",
        "model": {"source": str(tiny_model_dir)},
        "data": {"source": str(text_dir), "context_length": 16, "tokens": 1500, "eval_fraction": 0.3},
        "hookpoints": ["model.layers.1"],
        "sae": {"n_latents": 64, "k": 4},
        "train": {"batch_tokens": 128, "tokens": 50_000_000, "checkpoint_every_tokens": 0},  # hours
        "eval": {"tokens": 300, "downstream_contexts": 0},
        "workdir": str(tmp_path / "work"),
    }
    spec = parse_spec(spec_dict)
    for split, index in stages.plan_cache(spec):
        stages.cache_shard(spec, split, index)
    stages.cache(spec)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict))
    for d in ("home", "tmp"):
        (tmp_path / d).mkdir()
    env = {**os.environ, "HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp")}
    for name in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_PROFILES_PATH"):
        env.pop(name, None)
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "train", str(path)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,  # its own process group, as a terminal gives it
        )
        deadline = time.monotonic() + 180
        while "train:" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(1.0)
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT) if group else os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
        took = time.monotonic() - sent
    text = log.read_text()
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip()]
    assert proc.returncode == 130, text[-3000:]
    assert lines[-1].startswith("saeflow train: interrupted;") and "run `saeflow train` again to resume" in lines[-1]
    assert "Traceback" not in text and "Connection refused" not in text, text[-3000:]
    assert took < 20, f"took {took:.1f} s to stop"
    print(f"stopped {took:.1f} s after SIGINT")
    steps = intact_steps(stages.sae_dir(spec, "model.layers.1") / "checkpoints")
    assert len(steps) == 1 and steps[0] > 0  # the step it reached (no periodic checkpoints in this spec)
    assert list((tmp_path / "tmp").iterdir()) == []  # the temporary server's home is gone
