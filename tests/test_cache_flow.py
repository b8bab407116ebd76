"""The real CLI and Prefect flow in subprocesses: caching fanned out over a Dask LocalCluster, caching
and training killed with SIGKILL midway then resumed; each must equal an uninterrupted run bit for bit."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from flows import stages
from flows.spec import parse_spec

ARRAYS = ("tokens", "doc_index", "doc_position", "documents", "acts/model.layers.1")


def spec_dict(model_dir, text_dir, workdir, **extra):
    return {
        "name": "tiny",
        "model": {"source": str(model_dir)},
        "data": {
            "source": str(text_dir),
            "context_length": 16,
            "tokens": 3000,
            "eval_fraction": 0.3,
            "shard_contexts": 6,
            "batch_contexts": 4,
        },
        "hookpoints": ["model.layers.1"],
        "sae": {"n_latents": 64, "k": 4},
        "eval": {"tokens": 300, "downstream_contexts": 4},
        "train": {"batch_tokens": 256},
        "workdir": str(workdir),
        **extra,
    }


@pytest.fixture(scope="module")
def reference_store(tiny_model_dir, text_dir, tmp_path_factory):
    """The same store computed in this process, shard after shard, without Prefect."""
    spec = parse_spec(spec_dict(tiny_model_dir, text_dir, tmp_path_factory.mktemp("reference")))
    for split, index in stages.plan_cache(spec):
        stages.cache_shard(spec, split, index)
    return zarr.open_group(stages.cache(spec), mode="r")


def cli(spec: dict, tmp_path: Path, **popen):
    path = tmp_path / f"spec-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "flows.cli", "cache", str(path)]
    return subprocess.Popen(cmd, env=env, start_new_session=True, **popen)


def assert_same(store_url: str, reference: zarr.Group):
    group = zarr.open_group(store_url, mode="r")
    assert group.attrs["complete"]
    for split in ("train", "eval"):
        for name in ARRAYS:
            got, want = group[f"{split}/{name}"][:], reference[f"{split}/{name}"][:]
            assert got.dtype == want.dtype and np.array_equal(got, want), f"{split}/{name}"
    assert group.attrs["stats"] == reference.attrs["stats"]


def test_dask_local_cluster_equals_single_process(tiny_model_dir, text_dir, tmp_path, reference_store):
    spec = spec_dict(tiny_model_dir, text_dir, tmp_path / "work", orchestration={"dask_workers": 2})
    proc = cli(spec, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "Creating a new Dask cluster with `distributed.deploy.local.LocalCluster`" in out
    assert_same(stages.store_url(parse_spec(spec)), reference_store)


def test_sigkill_midway_then_resume_is_bitwise_equal(tiny_model_dir, text_dir, tmp_path, reference_store):
    spec = spec_dict(tiny_model_dir, text_dir, tmp_path / "work")
    url = stages.store_url(parse_spec(spec))
    markers = Path(url) / "_shards"
    proc = cli(spec, tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(markers.glob("*.json"))) < 5:
        assert proc.poll() is None, "the caching finished before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the Prefect server it started
    proc.wait()
    done = len(list(markers.glob("*.json")))
    total = sum(stages.store.layout_of(zarr.open_group(url, mode="r"), s).n_shards for s in ("train", "eval"))
    assert 5 <= done < total
    assert not stages.store.is_complete(url)

    resumed = cli(spec, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    assert f"{total - done} shards to compute" in out or f"computing {total - done} activation shards" in out
    assert_same(url, reference_store)


def test_training_sigkilled_then_resumed_is_bitwise_equal(tiny_model_dir, text_dir, tmp_path):
    import torch

    from sae.model import TopKSAE

    train = {"batch_tokens": 64, "tokens": 60_000, "checkpoint_every_tokens": 3200, "lr": 3e-3}
    sae = {"n_latents": 64, "k": 4, "dead_tokens": 3000, "aux_k": 16}
    killed = spec_dict(tiny_model_dir, text_dir, tmp_path / "killed", train=train, sae=sae)
    straight = spec_dict(tiny_model_dir, text_dir, tmp_path / "straight", train=train, sae=sae)
    spec = parse_spec(killed)
    ckpt = stages.sae_dir(spec, "model.layers.1") / "checkpoints"

    def run(spec_dict, kill=False):
        path = tmp_path / f"spec-{time.monotonic_ns()}.yaml"
        path.write_text(yaml.safe_dump(spec_dict))
        env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
        env.pop("PREFECT_API_URL", None)
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "train", str(path)],
            env=env,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if kill:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not list(ckpt.glob("step-*/meta.json")):
                assert proc.poll() is None, proc.stdout.read()[-3000:]
                time.sleep(0.02)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        return out

    # both runs need the activations: cache them first (quick), then train
    for d in (killed, straight):
        p = parse_spec(d)
        for split, index in stages.plan_cache(p):
            stages.cache_shard(p, split, index)
        stages.cache(p)
    run(killed, kill=True)
    assert list(ckpt.glob("step-*")) and not (stages.sae_dir(spec, "model.layers.1") / "config.json").exists()
    assert "resuming model.layers.1 from checkpoints" in run(killed)
    run(straight)
    a = TopKSAE.load(stages.sae_dir(spec, "model.layers.1"))
    b = TopKSAE.load(stages.sae_dir(parse_spec(straight), "model.layers.1"))
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), name


def test_a_new_eval_setting_caches_the_held_out_split_again_and_nothing_else(tiny_model_dir, text_dir, tmp_path):
    """The train split and the SAEs are keyed by what they hold: a new eval.tokens re-plans and
    computes the held-out split only; every train shard file stays as it was, and the store ends equal
    to one planned with the new settings from scratch."""
    from flows import done
    from flows.status import spec_status
    from storage import activations as store

    before = parse_spec(spec_dict(tiny_model_dir, text_dir, tmp_path / "w"))
    for split, index in stages.plan_cache(before):
        stages.cache_shard(before, split, index)
    url = stages.cache(before)
    fs, root = store.filesystem(url, None)
    train_files = {
        p: (os.stat(p).st_mtime_ns, Path(p).read_bytes()) for p in fs.glob(f"{root}/train/**") if Path(p).is_file()
    }
    assert len(train_files) > 5
    after = parse_spec(
        spec_dict(tiny_model_dir, text_dir, tmp_path / "w", eval={"tokens": 600, "downstream_contexts": 4})
    )
    assert stages.store_url(after) == url and stages.sae_rel(after, "model.layers.1") == stages.sae_rel(
        before, "model.layers.1"
    )
    assert stages.eval_rel(after, "model.layers.1") != stages.eval_rel(before, "model.layers.1")
    assert not done.is_done("cache", after) and spec_status(after)["cache"]["state"] == "stale"
    todo = stages.plan_cache(after)
    assert todo and {split for split, _ in todo} == {"eval"}
    for split, index in todo:
        stages.cache_shard(after, split, index)
    stages.cache(after)
    assert done.is_done("cache", after) and not done.is_done("cache", before)
    assert all((os.stat(p).st_mtime_ns, Path(p).read_bytes()) == kept for p, kept in train_files.items())
    group = zarr.open_group(url, mode="r")
    assert group["eval/tokens"].shape[0] == 600 // 15 + (600 % 15 > 0)  # contexts of 15 kept positions
    fresh = parse_spec(
        spec_dict(tiny_model_dir, text_dir, tmp_path / "fresh", eval={"tokens": 600, "downstream_contexts": 4})
    )
    for split, index in stages.plan_cache(fresh):
        stages.cache_shard(fresh, split, index)
    assert_same(url, zarr.open_group(stages.cache(fresh), mode="r"))
