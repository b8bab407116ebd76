"""The train stage on a grid of processes (train.devices x train.nodes, train.latent_shards): launched
with torch.distributed.run, one rank per device; each rank reads its own rows of every global batch
from the activation store, trains its shard (sae/parallel.py), and checkpoints it; rank 0 gathers and
writes the one ordinary SAE that evaluation and registration see.

    python -m flows.distributed SPEC_JSON HOOKPOINT      (what each rank runs; the stage launches them)
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from flows.paths import CHECKPOINTS, train_parts
from flows.spec import RunSpec, parse_spec, safe_name
from flows.training import Alone, train_hookpoint
from sae.config import SAEConfig
from sae.lm import resolve_device
from sae.parallel import Grid, GridShard, Parallel, leave, settle
from sae.train import Trainer, TrainResult

log = logging.getLogger("flows.distributed")  # not __name__: the ranks run this module as __main__


def launch(spec: RunSpec, hookpoint: str) -> None:
    """Runs the grid's ranks on this node (and waits for them); other nodes run the same command."""
    t = spec.train
    key = spec.part_hash(*train_parts(0))
    spec_file = spec.root / "locks" / f"distributed-{key}-{safe_name(hookpoint)}.json"
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    # written whole, then renamed: nodes sharing a disk never read each other's half-written file
    tmp = spec_file.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(spec.model_dump_json())
    os.replace(tmp, spec_file)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={t.devices}", f"--nnodes={t.nodes}"]
    if t.nodes > 1:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={t.rdzv_endpoint}", f"--rdzv-id=saeflow-{key}"]
    else:
        cmd += ["--standalone"]
    cmd += ["-m", "flows.distributed", str(spec_file), hookpoint]
    grid = (
        f"{t.devices * t.nodes // t.latent_shards} x {t.latent_shards}"
        if t.sae_placement == "grid"
        else f"{t.devices * t.nodes}-process (SAEs spread)"
    )
    log.info("training %s on a %s grid (data-parallel replicas x latent shards): %s", hookpoint, grid, " ".join(cmd))
    # each CPU rank a share of the cores (torch.distributed.run would otherwise set 1, with a warning)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // t.devices))),
    }
    done = subprocess.run(cmd, env=env)
    if done.returncode:
        raise RuntimeError(
            f"distributed training of {hookpoint} on a {grid} grid failed (exit {done.returncode}); "
            "the ranks' errors are above"
        )


def _die_with_launcher() -> None:
    """torch.distributed.run starts each rank in a session of its own, so a launcher killed with
    SIGKILL would leave its ranks training on: on Linux, a rank gets SIGKILL when its parent dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher was gone before the request took effect
        os._exit(1)


def main(argv: list[str] | None = None) -> None:
    _die_with_launcher()
    spec_file, hookpoint = argv or sys.argv[1:]
    spec = parse_spec(json.loads(Path(spec_file).read_text()))
    device = resolve_device(spec.train.device)
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # the ranks are plain processes (no Prefect logger): rank 0 speaks for the grid, in saeflow's own
    # words (the storage libraries' INFO lines, e.g. botocore finding credentials, stay quiet)
    logging.basicConfig(
        level=logging.WARNING, format=f"%(asctime)s rank {dist.get_rank()}: %(message)s", datefmt="%H:%M:%S"
    )
    for package in ("flows", "storage", "sae"):
        logging.getLogger(package).setLevel(logging.INFO if dist.get_rank() == 0 else logging.WARNING)
    try:
        run_rank(spec, hookpoint, device)
        settle()
    finally:
        dist.destroy_process_group()
    leave()  # without interpreter teardown: gloo's race with it (sae.parallel.leave)


def run_rank(spec: RunSpec, hookpoint: str, device: torch.device) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    if spec.train.sae_placement == "spread":  # this process's SAEs, whole, on the whole batches
        train_hookpoint(
            spec,
            hookpoint,
            [i for i in range(len(spec.sae)) if i % world == rank],
            str(device),
            Alone(),
            progress=rank == 0,
        )
        return
    S = spec.train.latent_shards
    train_hookpoint(spec, hookpoint, list(range(len(spec.sae))), str(device), GridRank(Parallel(Grid(world // S, S))))


class GridRank:
    """This rank's part in training a hookpoint's SAEs on the grid (flows.training.Team): rank 0 speaks
    and writes the gathered SAEs; the first data-parallel replica of each shard writes its checkpoints
    (the replicas hold the same state)."""

    milestones = False  # a sweep's milestones score whole SAEs

    def __init__(self, parallel: Parallel):
        self.parallel = parallel
        self.lead = dist.get_rank() == 0
        self.writes_checkpoints = parallel.data_index == 0
        self.latent_shards = parallel.grid.latents
        self.batch_part = (parallel.data_index, parallel.grid.data)

    def placement(self, cfg: SAEConfig) -> GridShard:
        return GridShard(self.parallel, cfg)

    def checkpoints_rel(self, rel: str) -> str:
        return f"{rel}/{CHECKPOINTS}/shard-{self.parallel.shard}-of-{self.latent_shards}"

    def agree(self, step: int) -> int:
        agreed = torch.tensor(step, device=self.parallel.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        return int(agreed)

    def barrier(self) -> None:
        dist.barrier()

    def whole(self, trainer: Trainer, result: TrainResult) -> TrainResult:
        full = self.parallel.gather_sae(result.sae, trainer.whole_cfg.k)
        if self.latent_shards > 1:  # a shard's final_sae could not finish it (sae.train.Trainer.finish)
            trainer.finish(full)
        counters = torch.cat(self.parallel.gather_shards(trainer.tracker.tokens_since_fired))
        dead = float((counters >= trainer.tracker.dead_tokens).float().mean())
        return replace(result, sae=full, dead_fraction=dead)


if __name__ == "__main__":
    main()
