"""Training throughput on a grid of processes (sae/parallel.py): tokens/s per data-parallel x
latent-shard grid, against the plain single-process step, on CPU (gloo) or GPUs (NCCL, one per rank).
A grid with more ranks than GPUs shares them over gloo (NCCL refuses two ranks on one device): its
collectives go through the host, so on one GPU the number bounds the sharding overhead from above.

    python benchmarks/distributed_throughput.py [--grids 1x1,2x1,1x2,2x2] [--d 256 --n 16384 --batch 2048]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def setup(args, device: str, placement=None):
    """The benchmark's data and an initialised trainer (of the whole SAE, or of this rank's shard)."""
    from sae.config import SAEConfig, TrainConfig
    from sae.train import Trainer

    x = torch.randn(2 * args.batch, args.d, generator=torch.Generator().manual_seed(0)).to(device)
    cfg = SAEConfig(args.d, args.n, args.k)
    trainer = Trainer(
        cfg,
        TrainConfig(batch_tokens=args.batch, tokens=10**12, dead_tokens=10**9, device=device),
        placement(cfg) if placement else None,
    )
    trainer.initialize(x)
    return x, trainer


def timed(steps: int, step, cuda: bool) -> float:
    """Seconds for `steps` calls of step(i) after two warm-up calls."""
    for i in range(2):
        step(i)
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    if cuda:
        torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()
    return time.perf_counter() - start


def rank_main(rank: int, grid, port: int, args, results) -> None:
    from sae.parallel import Grid, GridShard, Parallel, rank_rows, settle

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // grid[0] // grid[1]))
    dist.init_process_group(
        backend(grid), init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=grid[0] * grid[1]
    )
    parallel = Parallel(Grid(*grid))
    x, trainer = setup(
        args, f"cuda:{torch.cuda.current_device()}" if cuda else "cpu", lambda cfg: GridShard(parallel, cfg)
    )
    batches = [rank_rows(x[i * args.batch : (i + 1) * args.batch], parallel) for i in range(2)]
    seconds = timed(args.steps, lambda i: trainer.step(batches[i % 2]), cuda)
    if rank == 0:
        results.put(args.batch * args.steps / seconds)
    settle()
    dist.destroy_process_group()


def backend(grid) -> str:
    return "nccl" if torch.cuda.is_available() and grid[0] * grid[1] <= torch.cuda.device_count() else "gloo"


def single(args) -> float:
    cuda = torch.cuda.is_available()
    x, trainer = setup(args, "cuda" if cuda else "cpu")
    batches = [x[i * args.batch : (i + 1) * args.batch] for i in range(2)]
    return args.batch * args.steps / timed(args.steps, lambda i: trainer.step(batches[i % 2]), cuda)


def main() -> None:
    from servers import free_port

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grids", default="1x1,2x1,1x2,2x2")
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores"
    print(f"{where}; d {args.d}, n {args.n}, k {args.k}, global batch {args.batch}, {args.steps} steps")
    base = single(args)
    print(f"{'grid (replicas x shards)':<26} {'backend':>8} {'tokens/s':>10} {'vs 1 process':>13}")
    print(f"{'single process':<26} {'-':>8} {base:>10.0f} {1.0:>12.2f}x")
    ctx = mp.get_context("spawn")
    for spec in args.grids.split(","):
        grid = tuple(int(v) for v in spec.split("x"))
        results = ctx.Queue()
        mp.start_processes(
            rank_main,
            args=(grid, free_port(), args, results),
            nprocs=grid[0] * grid[1],
            join=True,
            start_method="spawn",
        )
        rate = results.get()
        print(f"{spec:<26} {backend(grid):>8} {rate:>10.0f} {rate / base:>12.2f}x")


if __name__ == "__main__":
    main()
