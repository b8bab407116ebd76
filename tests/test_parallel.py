"""Distributed training on CPU (gloo): data parallel, latents sharded, and both, against the plain
single-process trainer on the same global batches."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from servers import free_port

from sae.config import SAEConfig, TrainConfig
from sae.parallel import Grid, GridShard, Parallel, leave, rank_rows, settle
from sae.train import Trainer

D, N, K, BATCH, STEPS = 16, 64, 4, 64, 10


def configs(optimizer: str, multi_topk: bool):
    # dead after 2 steps: AuxK is active with dead latents present for most of the run
    activation = "batchtopk" if optimizer.endswith("+batchtopk") else "topk"
    # a cross-layer skip-transcoder over two layers of D / 2, reading and predicting rows of data(...)
    crossing = optimizer.endswith("+cross_layer")
    # decoder rows from data: the encoder's step scale is its mean row norm over every shard
    from_data = optimizer.endswith("+data")
    optimizer = optimizer.removesuffix("+batchtopk").removesuffix("+cross_layer").removesuffix("+data")
    if crossing:
        sae_cfg = SAEConfig(D // 4, N, K, transcoder=True, skip_connection=True, cross_layer=2)
    else:
        sae_cfg = SAEConfig(D, N, K, encoder_bias=True, activation=activation)
    return sae_cfg, TrainConfig(
        batch_tokens=BATCH,
        tokens=BATCH * STEPS,
        dead_tokens=2 * BATCH,
        aux_k=8,
        multi_topk=multi_topk,
        optimizer=optimizer,
        lr=3e-3 if optimizer == "adam" else None,
        decoder_init="data" if from_data else "random",
    )


def data() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(48, D, generator=g)
    codes = torch.rand(BATCH * STEPS, 48, generator=g) * (torch.rand(BATCH * STEPS, 48, generator=g) < 0.1)
    return codes @ basis + 0.05 * torch.randn(BATCH * STEPS, D, generator=g)


def single(optimizer: str, multi_topk: bool):
    x = data()
    trainer = Trainer(*configs(optimizer, multi_topk))
    trainer.initialize(x)
    for i in range(STEPS):
        trainer.step(x[i * BATCH : (i + 1) * BATCH])
    return trainer.final_sae(), trainer.tracker.tokens_since_fired


def _rank(rank: int, grid: Grid, port: int, optimizer: str, multi_topk: bool, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=grid.size)
    try:
        x = data()
        parallel = Parallel(grid)
        sae_cfg, tcfg = configs(optimizer, multi_topk)
        trainer = Trainer(sae_cfg, tcfg, GridShard(parallel, sae_cfg))
        trainer.initialize(x)  # the whole SAE, identical on every rank, then this rank's shard of it
        for i in range(STEPS):
            trainer.step(rank_rows(x[i * BATCH : (i + 1) * BATCH], parallel))
        full = parallel.gather_sae(trainer.final_sae(), K)
        counters = torch.cat(parallel.gather_shards(trainer.tracker.tokens_since_fired))
        if rank == 0:
            save_file({**{k: v.contiguous() for k, v in full.state_dict().items()}, "counters": counters}, out)
        settle()
    finally:
        dist.destroy_process_group()
    leave()  # as the product's ranks end (an error above reaches mp.spawn as raised)


@pytest.mark.parametrize(
    "data_parallel, shards, optimizer, multi_topk",
    [
        (2, 1, "signum", False),
        (1, 2, "signum", True),
        (1, 4, "adam", True),
        (2, 2, "signum", True),
        # BatchTopK: the k·B largest of the global batch, and its inference threshold, on every grid shape
        (2, 1, "signum+batchtopk", False),
        (1, 2, "adam+batchtopk", False),
        (2, 2, "signum+batchtopk", False),
        (2, 2, "signum+data", False),
        # a cross-layer transcoder's latents stay in one process: data parallel only
        (2, 1, "signum+cross_layer", False),
    ],
)
def test_grid_training_equals_the_single_process_run(tmp_path, data_parallel, shards, optimizer, multi_topk):
    grid = Grid(data_parallel, shards)
    out = tmp_path / "grid.safetensors"
    mp.spawn(_rank, args=(grid, free_port(), optimizer, multi_topk, str(out)), nprocs=grid.size, join=True)
    got = load_file(out)
    reference, counters = single(optimizer, multi_topk)
    if "batchtopk" in optimizer:
        assert reference.threshold > 0  # the inference threshold was learnt, and is compared below
    assert torch.equal(got.pop("counters"), counters)  # the same latents fired, step by step
    for name, value in reference.state_dict().items():
        assert torch.allclose(got[name], value, rtol=1e-4, atol=1e-5), (name, (got[name] - value).abs().max())
