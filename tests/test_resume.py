"""Checkpoints: a run interrupted at any point and resumed ends with the same weights, bit for bit."""

import numpy as np
import pytest
import torch
import zarr

from sae.config import SAEConfig, TrainConfig
from sae.train import Trainer, train_sae, train_saes
from storage.checkpoints import load_checkpoint, save_checkpoint
from storage.reading import sample_rows, shuffled_batches


class Killed(Exception):
    pass


@pytest.fixture
def acts(tmp_path):
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((3000, 16)) * rng.uniform(0.5, 2, 16)).astype(np.float16)
    arr = zarr.create_array(str(tmp_path / "acts"), shape=data.shape, dtype="float16", chunks=(256, 16))
    arr[:] = data
    return arr


def run(acts, ckpt_dir, kill_at_step=None):
    cfg = SAEConfig(16, 64, 4)
    tcfg = TrainConfig(batch_tokens=100, tokens=6000, lr=1e-2, dead_tokens=300, aux_k=8, multi_topk=True, log_every=7)
    restored = load_checkpoint(ckpt_dir)
    trainer = None
    if restored:
        trainer = Trainer(cfg, tcfg)
        trainer.load_state_dict(*restored)
    batches = shuffled_batches(acts, 100, seed=5, buffer_chunks=2, start_batch=trainer.steps if trainer else 0)

    def checkpoint(t):
        save_checkpoint(ckpt_dir, *t.state_dict())
        if kill_at_step is not None and t.steps >= kill_at_step:
            raise Killed

    return train_sae(
        cfg,
        tcfg,
        batches,
        None if trainer else sample_rows(acts, 1000, seed=5),
        progress=False,
        trainer=trainer,
        checkpoint=checkpoint,
        checkpoint_every_tokens=700,
    )


def test_resume_is_bitwise_equal(acts, tmp_path):
    reference = run(acts, tmp_path / "uninterrupted")
    ckpt = tmp_path / "interrupted"
    with pytest.raises(Killed):
        run(acts, ckpt, kill_at_step=20)
    with pytest.raises(Killed):
        run(acts, ckpt, kill_at_step=45)  # killed a second time, after resuming once
    resumed = run(acts, ckpt)
    assert resumed.steps == reference.steps
    for name, value in reference.sae.state_dict().items():
        assert torch.equal(value, resumed.sae.state_dict()[name]), name
    assert resumed.history == reference.history
    assert resumed.dead_fraction == reference.dead_fraction


def test_checkpoint_writes_are_atomic_and_pruned(acts, tmp_path):
    ckpt = tmp_path / "c"
    with pytest.raises(Killed):
        run(acts, ckpt, kill_at_step=40)
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["step-000000035", "step-000000042"]  # the last two, no temporary left behind
    (ckpt / "step-000000042" / "meta.json").unlink()  # a checkpoint that lost a file is skipped
    assert load_checkpoint(ckpt)[1]["steps"] == 35


def test_one_pass_for_several_saes_equals_separate_runs(acts):
    def trainer(n, k):
        t = Trainer(SAEConfig(16, n, k), TrainConfig(batch_tokens=100, tokens=2000, lr=1e-2, dead_tokens=300, aux_k=8))
        t.initialize(sample_rows(acts, 1000, seed=5))
        return t

    def batches():
        return shuffled_batches(acts, 100, seed=5, buffer_chunks=2)

    together = train_saes([trainer(64, 4), trainer(32, 2)], batches(), progress=False)
    alone = [train_saes([trainer(n, k)], batches(), progress=False)[0] for n, k in ((64, 4), (32, 2))]
    for a, b in zip(together, alone):
        for name, value in a.sae.state_dict().items():
            assert torch.equal(value, b.sae.state_dict()[name]), name
