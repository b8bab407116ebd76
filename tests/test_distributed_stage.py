"""The train stage on a grid of CPU processes (torch.distributed.run, gloo), from the command line:
`saeflow run` with train.devices 2 registers one ordinary SAE, a skip-transcoder trains data-parallel,
a distributed run killed with SIGKILL after its first checkpoints resumes to the same weights as an
uninterrupted one, and two
nodes (two `saeflow train` processes with disks of their own, meeting at a c10d rendezvous and
sharing an object store) train the SAE that two processes of one node train."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch
import yaml
from servers import BIN

from flows import stages
from flows.spec import parse_spec
from sae.model import TopKSAE

pytestmark = pytest.mark.heavy  # make test-heavy (CI runs it after make test)

HOOK = "model.layers.1"


def spec_dict(tiny_model_dir, text_dir, tmp_path, name, devices, shards, **train):
    return {
        "name": name,
        "model": {"source": str(tiny_model_dir)},
        "data": {
            "source": str(text_dir),
            "context_length": 16,
            "tokens": 3000,
            "eval_fraction": 0.2,
            "shard_contexts": 8,
            "store": str(tmp_path / "store"),
        },
        "hookpoints": [HOOK],
        "sae": {"n_latents": 64, "k": 4, "dead_tokens": 500, "aux_k": 8},
        "train": {"batch_tokens": 128, "devices": devices, "latent_shards": shards, **train},
        "eval": {"tokens": 300, "downstream_contexts": 4, "browser": False, "ablation_contexts": 0},
        "workdir": str(tmp_path / name),
    }


def cli(args, tmp_path, wait=True, **env_vars):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), **env_vars}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [str(BIN / "saeflow"), *args],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
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
    """Two SAEs, one per process, each reading the batches itself: the same SAEs as one process trains.
    Both runs use one thread per process: with another thread count the float rounding differs, and
    a TopK selection that flips on it moves the weights by more than rounding (seen: 2e-3)."""
    saes = [{"n_latents": 64, "k": 4, "dead_tokens": 500}, {"n_latents": 128, "k": 8, "dead_tokens": 500}]
    train = {"optimizer": "adam", "lr": 3e-3}
    spread = {
        **spec_dict(tiny_model_dir, text_dir, tmp_path, "spread", devices=2, shards=1, sae_placement="spread", **train),
        "sae": saes,
    }
    alone = {**spec_dict(tiny_model_dir, text_dir, tmp_path, "alone", devices=1, shards=1, **train), "sae": saes}
    cli(["cache", write(tmp_path, alone)], tmp_path)
    one_thread = {"OMP_NUM_THREADS": "1"}
    assert "on a 2-process (SAEs spread) grid" in cli(["train", write(tmp_path, spread)], tmp_path, **one_thread)
    cli(["train", write(tmp_path, alone)], tmp_path, **one_thread)
    for index in (0, 1):
        a = TopKSAE.load(stages.sae_dir(parse_spec(spread), HOOK, index)).state_dict()
        b = TopKSAE.load(stages.sae_dir(parse_spec(alone), HOOK, index)).state_dict()
        for name, value in a.items():
            assert torch.allclose(value, b[name], rtol=1e-5, atol=1e-6), (index, name, (value - b[name]).abs().max())


def test_two_nodes_meet_at_a_rendezvous_and_train_what_one_node_trains(
    tiny_model_dir, text_dir, s3_server, tmp_path, monkeypatch
):
    """Each node: its own scratch disk and Prefect home, the spec with train.nodes 2 and the first
    node's rendezvous endpoint; what they share is the object store (work dir and activations)."""
    from servers import free_port

    s3 = {"workdir_options": s3_server["options"]}
    train = {"optimizer": "adam", "lr": 3e-3, "checkpoint_every_tokens": 1024}
    nodes = {
        **spec_dict(
            tiny_model_dir,
            text_dir,
            tmp_path,
            "nodes",
            devices=1,
            shards=1,
            nodes=2,
            rdzv_endpoint=f"127.0.0.1:{free_port()}",
            **train,
        ),
        **s3,
        "workdir": "s3://saeflow/nodes",
    }
    one = {
        **spec_dict(tiny_model_dir, text_dir, tmp_path, "one", devices=2, shards=1, **train),
        **s3,
        "workdir": "s3://saeflow/one-node",
    }
    for d in (nodes, one):
        d["data"].update(store="s3://saeflow/multi-node-store", store_options=s3_server["options"])
    cli(["cache", write(tmp_path, one)], tmp_path, SAEFLOW_SCRATCH=str(tmp_path / "node-0"))
    # torch.distributed.run reads --local-addr from PET_LOCAL_ADDR: both nodes on loopback. One thread
    # a process in both runs, as torchrun gives two processes of one node: with two threads a node's
    # matmuls sum in another order, and Adam carries the last-bit difference (2.8e-6 after 24 steps)
    local = {"PET_LOCAL_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    procs = [
        cli(
            ["train", write(tmp_path, nodes)],
            tmp_path / f"node-{i}",
            wait=False,
            **local,
            SAEFLOW_SCRATCH=str(tmp_path / f"node-{i}"),
        )
        for i in (0, 1)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(o[-3000:] for o in outs)
    assert all("on a 2 x 1 grid" in o for o in outs)
    cli(["train", write(tmp_path, one)], tmp_path, SAEFLOW_SCRATCH=str(tmp_path / "node-0"), **local)

    monkeypatch.setenv("SAEFLOW_SCRATCH", str(tmp_path / "reader"))  # a third machine reads the object store
    a, b = (TopKSAE.load(stages.fetch_sae(parse_spec(d), HOOK)) for d in (nodes, one))
    assert a.metadata["train_tokens"] == b.metadata["train_tokens"] == 3072
    for name, value in a.state_dict().items():
        assert torch.allclose(value, b.state_dict()[name], rtol=1e-5, atol=1e-6), (
            name,
            (value - b.state_dict()[name]).abs().max(),
        )


def test_a_skip_transcoder_trains_data_parallel(tiny_model_dir, text_dir, tmp_path):
    """A skip-transcoder on two data-parallel processes (each half of every batch of [input | output]
    rows, gradients averaged, W_skip among them) trains on every token and predicts the held-out MLP
    outputs about as well as one process does (a data-parallel run splits the rows otherwise than one
    process reads them, so the weights differ for SAEs too)."""
    mlp = "model.layers.1.mlp"
    tc = {"n_latents": 64, "k": 4, "dead_tokens": 500, "aux_k": 8, "transcoder": True, "skip_connection": True}
    train = {"optimizer": "adam", "lr": 3e-3}
    runs = {}
    for name, devices in (("tc-dp2", 2), ("tc-one", 1)):
        d = {**spec_dict(tiny_model_dir, text_dir, tmp_path, name, devices=devices, shards=1, **train), "sae": tc}
        runs[name] = d = {**d, "hookpoints": [mlp]}
        if devices == 1:
            cli(["cache", write(tmp_path, d)], tmp_path)
    one_thread = {"OMP_NUM_THREADS": "1"}
    assert "on a 2 x 1 grid" in cli(["train", write(tmp_path, runs["tc-dp2"])], tmp_path, **one_thread)
    cli(["train", write(tmp_path, runs["tc-one"])], tmp_path, **one_thread)
    from storage import activations as store

    spec = parse_spec(runs["tc-one"])
    held = torch.from_numpy(
        store.activations(store.open_store(stages.store_url(spec)), "eval", spec.site(mlp))[:300].astype("float32")
    )
    fvu = {}
    for name in runs:
        tc = TopKSAE.load(stages.sae_dir(parse_spec(runs[name]), mlp))
        assert tc.cfg.transcoder and tc.cfg.skip_connection and tc.metadata["train_tokens"] == 3072
        assert tc.W_skip is not None and tc.W_skip.abs().max() > 0  # the skip map trained on both ranks' rows
        with torch.no_grad():
            y = held[:, 32:]
            fvu[name] = ((tc.predict(held[:, :32]) - y) ** 2).sum().item() / ((y - y.mean(0)) ** 2).sum().item()
    assert max(fvu.values()) < 0.9  # both predict far better than the mean output
    assert fvu["tc-dp2"] < 1.2 * fvu["tc-one"] and fvu["tc-one"] < 1.2 * fvu["tc-dp2"], fvu
