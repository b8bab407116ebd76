"""The train stage on a grid of CPU processes (torch.distributed.run, gloo), from the command line:
`saeflow run` with train.devices 2 registers one ordinary SAE, and a distributed run killed with
SIGKILL after its first checkpoints resumes to the same weights as an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch
import yaml

from flows import stages
from flows.spec import parse_spec
from sae.model import TopKSAE

from servers import BIN

HOOK = "model.layers.1"


def spec_dict(tiny_model_dir, text_dir, tmp_path, name, devices, shards, **train):
    return {
        "name": name,
        "model": {"source": str(tiny_model_dir)},
        "data": {"source": str(text_dir), "context_length": 16, "tokens": 3000, "eval_fraction": 0.2,
                 "shard_contexts": 8, "store": str(tmp_path / "store")},
        "hookpoints": [HOOK],
        "sae": {"n_latents": 64, "k": 4, "dead_tokens": 500, "aux_k": 8},
        "train": {"batch_tokens": 128, "devices": devices, "latent_shards": shards, **train},
        "eval": {"tokens": 300, "downstream_contexts": 4, "browser": False, "ablation_contexts": 0},
        "workdir": str(tmp_path / name),
    }


def cli(args, tmp_path, wait=True):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([str(BIN / "saeflow"), *args], env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def write(tmp_path, d) -> str:
    path = tmp_path / f"{d['name']}.yaml"
    path.write_text(yaml.safe_dump(d))
    return str(path)


def test_saeflow_run_on_two_processes_registers_one_sae(tiny_model_dir, text_dir, tmp_path):
    from storage.registry import list_versions

    d = spec_dict(tiny_model_dir, text_dir, tmp_path, "dp2", devices=2, shards=1)
    out = cli(["run", write(tmp_path, d)], tmp_path)
    assert "on a 2 x 1 grid" in out
    spec = parse_spec(d)
    sae = TopKSAE.load(stages.sae_dir(spec, HOOK))
    assert sae.cfg.n_latents == 64 and sae.metadata["train_tokens"] == 3072  # one SAE, every token of the run
    assert [v["version"] for v in list_versions(spec.tracking_uri(), "dp2")] == [1]


def test_a_killed_latent_sharded_run_resumes_to_the_same_weights(tiny_model_dir, text_dir, tmp_path):
    train = {"checkpoint_every_tokens": 512, "optimizer": "adam", "lr": 3e-3}
    straight = spec_dict(tiny_model_dir, text_dir, tmp_path, "straight", devices=2, shards=2, **train)
    killed = spec_dict(tiny_model_dir, text_dir, tmp_path, "killed", devices=2, shards=2, **train)
    cli(["cache", write(tmp_path, straight)], tmp_path)  # one store for both (data.store)
    spec = parse_spec(killed)
    checkpoints = stages.sae_dir(spec, HOOK) / "checkpoints"
    proc = cli(["train", write(tmp_path, killed)], tmp_path, wait=False)
    deadline = time.monotonic() + 300
    while not (len(list(checkpoints.glob("shard-*-of-2/step-*/meta.json"))) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-4000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait()
    assert not (stages.sae_dir(spec, HOOK) / "config.json").exists()
    assert "resuming model.layers.1 from checkpoints" in cli(["train", write(tmp_path, killed)], tmp_path)
    cli(["train", write(tmp_path, straight)], tmp_path)
    a = TopKSAE.load(stages.sae_dir(spec, HOOK)).state_dict()
    b = TopKSAE.load(stages.sae_dir(parse_spec(straight), HOOK)).state_dict()
    for name, value in a.items():
        assert torch.equal(value, b[name]), name


def test_saes_spread_over_processes_train_as_in_one_process(tiny_model_dir, text_dir, tmp_path):
    """Two SAEs, one per process, each reading the batches itself: the same SAEs as one process trains
    (up to the float rounding of a different thread count)."""
    saes = [{"n_latents": 64, "k": 4, "dead_tokens": 500}, {"n_latents": 128, "k": 8, "dead_tokens": 500}]
    train = {"optimizer": "adam", "lr": 3e-3}
    spread = {**spec_dict(tiny_model_dir, text_dir, tmp_path, "spread", devices=2, shards=1, sae_placement="spread",
                          **train), "sae": saes}
    alone = {**spec_dict(tiny_model_dir, text_dir, tmp_path, "alone", devices=1, shards=1, **train), "sae": saes}
    cli(["cache", write(tmp_path, alone)], tmp_path)
    assert "on a 2-process (SAEs spread) grid" in cli(["train", write(tmp_path, spread)], tmp_path)
    cli(["train", write(tmp_path, alone)], tmp_path)
    for index in (0, 1):
        a = TopKSAE.load(stages.sae_dir(parse_spec(spread), HOOK, index)).state_dict()
        b = TopKSAE.load(stages.sae_dir(parse_spec(alone), HOOK, index)).state_dict()
        for name, value in a.items():
            assert torch.allclose(value, b[name], rtol=1e-3, atol=1e-4), (index, name, (value - b[name]).abs().max())
