"""A clean `saeflow run` prints only saeflow's lines: every line of a demo-sized run on the tiny model
(its own temporary Prefect server, the embedded MLflow) has one of the shapes below; no INFO line of
MLflow, no library progress bar, no task line without its task's name; the summary ends with each
stage's wall time. A second run names each Cached stage."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from test_spec import base, write

TIME = r"\d\d:\d\d:\d\d "
ALLOWED = [
    TIME + r"(flows|storage|sae)\.[\w.]+: \S.*",  # saeflow's own loggers
    TIME + r"prefect\.flow_runs: (Beginning flow run '[\w-]+' for flow 'saeflow-pipeline'|computing \d+ activation "
    r"shards|training .*)",
    TIME + r"prefect\.task_runs: [a-z_]+-[0-9a-f]+: Finished in state Cached\('its outputs exist', type=COMPLETED\)",
    r"(cache (train|eval) shard \d+|train|eval|eval LM loss|probe loss): .*",  # saeflow's progress bars
    r"saeflow: [\w-]+",  # the summary
    r"  (SAE|hookpoint|SAE files|report|registered) +\S.*",
    r"  [a-z_0-9]+ +-?[\d.e+-]+",  # a metric
    r"  wall time     cache [\d.]+ s, train [\d.]+ s, evaluate [\d.]+ s, register [\d.]+ s",
    r"  (tracking URI|MLflow UI|pull) +\S.*",
]


def run_saeflow(path, tmp_path) -> list[str]:
    env = {**os.environ, "HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp")}
    for name in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_PROFILES_PATH", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(path)], env=env, capture_output=True, text=True, timeout=600
    )
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-3000:]
    return [line for line in text.replace("\r", "\n").splitlines() if line.strip()]


def test_a_clean_run_prints_only_saeflows_lines(tiny_model_dir, text_dir, tmp_path):
    for d in ("home", "tmp"):
        (tmp_path / d).mkdir()
    spec = base(tiny_model_dir, text_dir, tmp_path, name="tiny-demo", eval__tokens=300, eval__downstream_contexts=4)
    path = write(tmp_path, spec)
    first = run_saeflow(path, tmp_path)
    strange = [line for line in first if not any(re.fullmatch(shape, line) for shape in ALLOWED)]
    assert not strange, strange
    assert any(line.startswith("  wall time") for line in first)
    assert any("registered models:/tiny-demo@candidate" in line for line in first)
    again = run_saeflow(path, tmp_path)
    strange = [line for line in again if not any(re.fullmatch(shape, line) for shape in ALLOWED)]
    assert not strange, strange
    cached = [line for line in again if "Cached" in line]
    assert [re.search(r"task_runs: ([a-z_]+)-", line).group(1) for line in cached] == [  # type: ignore[union-attr]
        "cache_activations",
        "train_sae",
        "evaluate",
        "register",
    ]
