"""data.window_shards: caching and training at once, at most W train shards on disk, each deleted once a
checkpoint covers it; a killed run resumes with the same batches and ends with the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from flows import stages
from flows.spec import SpecError, parse_spec
from sae.model import TopKSAE
from storage import activations as store
from storage import reading
from storage.shuffle import ChunkOrder
from storage.window import Window

HOOK = "model.layers.1"


def spec_dict(tiny_model_dir, text_dir, workdir, window=4, **train):
    return {
        "name": "tiny",
        "model": {"source": str(tiny_model_dir)},
        "data": {
            "source": str(text_dir),
            "context_length": 16,
            "tokens": 4000,
            "eval_fraction": 0.3,
            "shard_contexts": 24,
            "batch_contexts": 8,
            "window_shards": window,
        },
        "hookpoints": [HOOK],
        "sae": {"n_latents": 64, "k": 4, "dead_tokens": 500},
        "train": {"batch_tokens": 128, "shuffle_buffer_mb": 1, "checkpoint_every_tokens": 0, **train},
        "eval": {"tokens": 300, "downstream_contexts": 4, "browser": False, "ablation_contexts": 0},
        "workdir": str(workdir),
    }


def test_group_order_reads_each_group_whole_before_the_next_and_resumes_in_place():
    order = ChunkOrder(10_000, 100, 100, 3, seed=1, group_chunks=20)  # 100 chunks: 5 groups of 20
    blocks = list(order.blocks())
    seen = [int(c) for b in blocks for c in b.chunks]
    assert sorted(seen) == list(range(100))  # one pass, every chunk once
    groups = [b.group for b in blocks]
    assert groups == sorted(groups) and set(groups) == set(range(5))
    for b in blocks:
        assert {int(c) // 20 for c in b.chunks} == {b.group}
    ends = order.group_ends()
    assert ends == list(np.cumsum([sum(b.batches for b in blocks if b.group == g) for g in range(5)]))
    assert ends[-1] == 100  # whole chunks of whole batches: nothing sits out
    resumed = next(order.blocks(start_batch=ends[1] + 2))
    assert resumed.group == 2 and resumed.skip == 2
    other = [int(c) for b in ChunkOrder(10_000, 100, 100, 3, seed=2, group_chunks=20).blocks() for c in b.chunks]
    assert other != seen


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"window_shards": 1}, "data.window_shards: 1 holds fewer than two shards: use at least 2"),
        (
            {"window_shards": 4, "tokens": 1000},
            "data.window_shards=4 reads each cached token once, but the SAEs train on 2000 tokens, more than "
            "data.tokens=1000: raise data.tokens, or train fewer tokens",
        ),
    ],
)
def test_bad_windows_are_refused_in_one_line(data, message, tmp_path, capsys):
    import yaml

    from flows.cli import main

    spec = {"name": "x", "model": {"source": "m"}, "data": data, "sae": {"n_latents": 64}, "hookpoints": ["h"]}
    spec["train"] = {"tokens": 2000, "batch_tokens": 100}
    with pytest.raises(SpecError) as e:
        parse_spec(spec)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    assert main(["validate", str(tmp_path / "s.yaml")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_one_window_streams_one_hookpoint():
    spec = {"name": "x", "model": {"source": "m"}, "data": {"window_shards": 2}, "sae": {"n_latents": 64}}
    with pytest.raises(SpecError, match="streams one hookpoint's activations once: give one hookpoint"):
        parse_spec({**spec, "hookpoints": ["a", "b"]})


class Killed(Exception):
    pass


def run(spec, kill_after_checkpoints: int | None = None, watch: list | None = None):
    """Caches and trains the spec through the flow; optionally dies after some checkpoints (as a kill
    would: nothing after them runs). `watch` collects the train shards on disk after every shard
    cached and every checkpoint."""
    from flows import training
    from flows.pipeline import pipeline

    saved, cache_shard = training.save_and_publish_checkpoint, stages.cache_shard
    count = [0]

    def look():
        if watch is not None:
            watch.append(Window.of(stages.store_url(spec)).on_disk())  # pyright: ignore[reportOptionalMemberAccess]

    def checkpoint(work, rel, trainer):
        saved(work, rel, trainer)
        count[0] += 1
        look()
        if kill_after_checkpoints is not None and count[0] >= kill_after_checkpoints:
            raise Killed

    def cache(spec, split, index):
        cache_shard(spec, split, index)
        look()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "save_and_publish_checkpoint", checkpoint)
        patch.setattr(stages, "cache_shard", cache)
        pipeline(spec, only=["cache", "train"])


def test_a_killed_windowed_run_resumes_and_ends_with_the_same_weights(
    prefect_harness, tiny_model_dir, text_dir, tmp_path
):
    straight = parse_spec(spec_dict(tiny_model_dir, text_dir, tmp_path / "straight"))
    watched: list = []
    run(straight, watch=watched)
    window = Window.of(stages.store_url(straight))
    assert window is not None and window.n_shards >= 6  # several groups of two shards
    assert len(watched) > window.n_shards and all(len(on_disk) <= 4 for on_disk in watched)  # the window
    assert max(map(len, watched)) == 4  # caching ran ahead of the trainer
    assert window.on_disk() == []  # all consumed and deleted once the SAE is written
    reference = TopKSAE.load(stages.sae_dir(straight, HOOK))

    killed = parse_spec(spec_dict(tiny_model_dir, text_dir, tmp_path / "killed"))
    with pytest.raises(Killed):
        run(killed, kill_after_checkpoints=2)
    kept = Window.of(stages.store_url(killed)).on_disk()  # pyright: ignore[reportOptionalMemberAccess]
    assert kept and min(kept) >= 2  # the first group is gone, the one being read is not
    run(killed)
    resumed = TopKSAE.load(stages.sae_dir(killed, HOOK))
    for name, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_windowed_batches_equal_the_same_order_over_a_whole_store(tiny_model_dir, text_dir, tmp_path):
    """What the window trains on is the data a whole cache holds, in the group order."""
    whole = spec_dict(tiny_model_dir, text_dir, tmp_path / "whole", window=None)
    spec = parse_spec(whole)
    for split, index in stages.plan_cache(spec):
        stages.cache_shard(spec, split, index)
    acts = store.activations(zarr.open_group(stages.cache(spec), mode="r"), "train", HOOK)
    windowed = parse_spec(spec_dict(tiny_model_dir, text_dir, tmp_path / "win"))
    stages.plan_cache(windowed)
    window = Window.of(stages.store_url(windowed))
    assert window is not None
    for index in range(window.n_shards):
        stages.cache_shard(windowed, "train", index)
    streamed = store.activations(zarr.open_group(stages.store_url(windowed), mode="r"), "train", HOOK)
    kwargs = dict(batch_rows=128, seed=0, buffer_chunks=2, group_chunks=window.group_chunks)
    ours = list(reading.shuffled_batches(streamed, wait=lambda b: window.wait(window.shards_of(b)), **kwargs))
    plain = list(reading.shuffled_batches(acts, **kwargs))
    assert len(ours) == len(plain) > 0
    assert all(torch.equal(a, b) for a, b in zip(ours, plain))


def test_plan_prints_the_windows_disk_need_and_what_does_not_fit(
    tiny_model_dir, text_dir, tmp_path, capsys, monkeypatch
):
    import re
    import shutil
    from collections import namedtuple

    import yaml

    from flows.cli import main
    from sae.lm import load_config

    base = spec_dict(tiny_model_dir, text_dir, tmp_path / "w", window=6)
    base["train"] = {"batch_tokens": 128}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    args = [
        "plan",
        str(tmp_path / "base.yaml"),
        "--budget-flops",
        "1e14",
        "--k",
        "8",
        "--out",
        str(tmp_path / "p.yaml"),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    d = load_config(str(tiny_model_dir)).hidden_size
    shard = 24 * 15 * d * 2  # 24 contexts of 15 kept positions, float16
    found = re.search(r"window of 6 shards of ([\d.]+) kB: ([\d.]+) (\w+) on disk at most \(", printed)
    assert found, printed
    assert abs(float(found.group(1)) * 1e3 / shard - 1) < 0.01
    held = -(-300 // 15) * 15 * d * 2
    scale = {"GB": 1e9, "MB": 1e6, "kB": 1e3}[found.group(3)]
    assert abs(float(found.group(2)) * scale / (6 * shard + held) - 1) < 0.01

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**6, 10**6 - 1000, 1000))
    assert main(args) == 0
    assert "DOES NOT FIT: 1.0 kB free there, lower data.window_shards" in capsys.readouterr().out


def test_a_damaged_or_stopped_shard_is_never_read(tiny_model_dir, text_dir, tmp_path):
    from pathlib import Path

    from storage.window import CachingStopped

    spec = parse_spec(spec_dict(tiny_model_dir, text_dir, tmp_path / "w"))
    stages.plan_cache(spec)
    window = Window.of(stages.store_url(spec))
    assert window is not None
    session = window.open_session()
    assert window.to_cache(session) is None  # no trainer has said where it starts
    window.release(0)
    assert window.to_cache(session) == [0, 1, 2, 3]
    stages.cache_shard(spec, "train", 0)
    window.wait([0], timeout=1)
    shard = Path(stages.store_url(spec)) / "train/acts/model.layers.1/c/0/0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(TimeoutError, match="train shard 0 was not cached within 0 s"):
        window.wait([0], timeout=0.3, poll=0.05)
    assert window.to_cache(session) == [0, 1, 2, 3]  # the damaged shard is cached again
    stages.cache_shard(spec, "train", 0)
    window.wait([0], timeout=1)
    window.stop("caching train shard 1 failed: disk full")
    with pytest.raises(CachingStopped, match="caching stopped: caching train shard 1 failed: disk full"):
        window.wait([1], timeout=5, poll=0.05)
