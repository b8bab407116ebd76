"""The memory planner against measured peak memory (CPU, a fresh process per size), and the spec
check that refuses a grid which does not fit the stated device memory before anything starts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from sae.memory import plan_memory

MEASURE = """
import json, sys, torch
from sae.config import SAEConfig, TrainConfig
from sae.train import Trainer

def status(key):  # kB in /proc/self/status
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))

d, n, b, opt = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
x = torch.randn(2 * b, d)
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) from here on, not from the imports
t = Trainer(SAEConfig(d, n, 32), TrainConfig(batch_tokens=b, tokens=10**9, dead_tokens=b, aux_k=d // 2,
            optimizer=opt, geometric_median_samples=b))
t.initialize(x[:b])
for i in range(4):  # dead latents after the first step: AuxK's masked copy is held too
    t.step(x[(i % 2) * b : (i % 2 + 1) * b])
print(json.dumps(status("VmHWM") - base))
"""


@pytest.mark.parametrize("d, n, batch, optimizer", [(256, 65536, 1024, "signum"), (128, 131072, 512, "adam")])
def test_estimate_within_20_percent_of_measured_peak(d, n, batch, optimizer):
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(d), str(n), str(batch), optimizer],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    estimate = plan_memory(d, n, 32, batch, optimizer=optimizer).total
    assert 0.8 <= estimate / measured <= 1.2, (estimate / 2**20, measured / 2**20)


def test_sharding_divides_the_latent_state_and_replicas_divide_the_batch():
    one = plan_memory(768, 1 << 20, 32, 4096)
    four = plan_memory(768, 1 << 20, 32, 4096, replicas=1, shards=4)
    assert four.weights * 4 == pytest.approx(one.weights, rel=1e-4) and four.optimizer * 4 == pytest.approx(
        one.optimizer, rel=1e-4
    )
    assert plan_memory(768, 1 << 20, 32, 4096, replicas=2).batch < one.batch


def test_a_grid_that_does_not_fit_is_refused_before_anything_starts(tiny_model_dir, text_dir, tmp_path, capsys):
    from flows.cli import main

    spec = {
        "name": "big",
        "model": {"source": str(tiny_model_dir)},
        "data": {"source": str(text_dir)},
        "hookpoints": ["model.layers.1"],
        "sae": {"n_latents": 1 << 20, "k": 32},
        "train": {"device_memory_gib": 1, "device": "cpu", "batch_tokens": 256},
        "workdir": str(tmp_path / "work"),
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train.device_memory_gib=1: sae needs" in err and "GiB per device on a 1 x 1 grid" in err
    assert "raise train.latent_shards" in err
    spec["train"] = {**spec["train"], "devices": 4, "latent_shards": 4}
    path.write_text(yaml.safe_dump(spec))
    assert main(["validate", str(path)]) == 0  # a quarter of the latents per process fits
    assert not (tmp_path / "work").exists()


def test_pack_groups_fits_every_group_and_isolates_an_oversized_sae():
    from sae.memory import MemoryPlan, pack_groups

    def plan(persistent: int, batch: int) -> MemoryPlan:
        return MemoryPlan(weights=persistent, gradients=0, optimizer=0, ema=0, batch=batch)

    plans = [plan(40, 10), plan(30, 30), plan(20, 5), plan(200, 1), plan(10, 10)]
    groups = pack_groups(plans, limit=100)
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3, 4]  # each SAE exactly once
    assert [3] in groups  # alone over the limit: a group of its own
    for g in groups:
        if g != [3]:  # the persistent parts add up, the steps take turns: the largest batch counts once
            assert sum(plans[i].total - plans[i].batch for i in g) + max(plans[i].batch for i in g) <= 100
    assert len(groups) == 3  # 40+30+10 persistent + batch 30 = 110 > 100: not one group of four
    assert pack_groups(plans[:3], limit=10**6) == [[0, 1, 2]]  # no limit reached: one pass for all


def test_captured_steps_hold_a_batch_per_auxk_phase_for_the_whole_run():
    from sae.memory import MemoryPlan, pack_groups

    eager, graphed = (
        plan_memory(256, 4096, 32, 4096, cuda=True),
        plan_memory(256, 4096, 32, 4096, cuda=True, graphs=True),
    )
    assert graphed.graphs == 2 * eager.batch and graphed.total == eager.total + 2 * eager.batch
    assert graphed.transient == eager.transient  # the eager steps' batch still takes turns; the graphs' do not
    assert ("captured steps (CUDA graphs)", graphed.graphs) in graphed.rows()
    # two graphed SAEs whose weights and eager batch fit together, but not their graphs' pools
    plan = MemoryPlan(weights=30, gradients=0, optimizer=0, ema=0, batch=10, graphs=20)
    assert pack_groups([plan, plan], limit=100) == [[0], [1]]
    assert pack_groups([plan, plan], limit=110) == [[0, 1]]


def test_the_spec_plans_graphs_where_the_trainer_takes_them(tiny_model_dir, text_dir, tmp_path):
    from flows.spec import parse_spec

    def plan(n_latents: int, **train):
        raw = {
            "name": "g",
            "model": {"source": str(tiny_model_dir)},
            "data": {"source": str(text_dir)},
            "hookpoints": ["model.layers.1"],
            "sae": {"n_latents": n_latents, "k": 32},
            "train": {"batch_tokens": 256, **train},
            "workdir": str(tmp_path / "work"),
        }
        return parse_spec(raw).memory_plan(64, device="cuda")

    assert plan(4096).graphs > 0  # unset: small enough to gain
    assert plan(2**22).graphs == 0  # 2**28 weights: GPU-bound, no graphs by default
    assert plan(2**22, cuda_graph=True).graphs > 0
    assert plan(4096, cuda_graph=False).graphs == 0
    assert plan(4096, optimizer="adam").graphs == 0
