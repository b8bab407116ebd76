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
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from flows import stages
from flows.spec import RunSpec, parse_spec, safe_name
from storage import activations as store

log = logging.getLogger("flows.distributed")  # not __name__: the ranks run this module as __main__


def launch(spec: RunSpec, hookpoint: str) -> None:
    """Runs the grid's ranks on this node (and waits for them); other nodes run the same command."""
    t = spec.train
    key = spec.part_hash(*stages.train_parts(0))
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
    grid = (f"{t.devices * t.nodes // t.latent_shards} x {t.latent_shards}" if t.sae_placement == "grid"
            else f"{t.devices * t.nodes}-process (SAEs spread)")
    log.info("training %s on a %s grid (data-parallel replicas x latent shards): %s", hookpoint, grid, " ".join(cmd))
    # each CPU rank a share of the cores (torch.distributed.run would otherwise set 1, with a warning)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // t.devices)))}
    done = subprocess.run(cmd, env=env)
    if done.returncode:
        raise RuntimeError(f"distributed training of {hookpoint} on a {grid} grid failed (exit {done.returncode}); "
                           "the ranks' errors are above")


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
    from sae.lm import resolve_device

    device = resolve_device(spec.train.device)
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # the ranks are plain processes (no Prefect logger): rank 0 speaks for the grid, in saeflow's own
    # words (the storage libraries' INFO lines, e.g. botocore finding credentials, stay quiet)
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s rank {dist.get_rank()}: %(message)s",
                        datefmt="%H:%M:%S")
    for package in ("flows", "storage", "sae"):
        logging.getLogger(package).setLevel(logging.INFO if dist.get_rank() == 0 else logging.WARNING)
    try:
        run_rank(spec, hookpoint, device)
    finally:
        dist.destroy_process_group()


def run_rank(spec: RunSpec, hookpoint: str, device: torch.device) -> None:
    if spec.train.sae_placement == "spread":  # this process's SAEs, whole, on the whole batches
        rank, world = dist.get_rank(), dist.get_world_size()
        stages.train_here(spec, hookpoint, progress=rank == 0, device=str(device),
                          only=[i for i in range(len(spec.sae)) if i % world == rank])
        dist.barrier()
        return
    from sae.parallel import Grid, Parallel, shard_trainer
    from sae.train import Trainer, TrainResult, train_saes
    from storage.checkpoints import META_FILE, load_checkpoint, save_checkpoint, steps_available

    S = spec.train.latent_shards
    parallel = Parallel(Grid(dist.get_world_size() // S, S))
    lead = dist.get_rank() == 0
    work = spec.work
    todo = [i for i in range(len(spec.sae)) if not stages.is_done("train", spec, hookpoint, i)]
    group = store.open_store(stages.store_url(spec), stages.store_options(spec), verify=lead)
    dist.barrier()  # rank 0 checked every shard of the store
    acts = store.activations(group, "train", hookpoint)
    tcfgs = {i: spec.train_config(acts.shape[0], str(device), i) for i in todo}
    trainers = {i: Trainer(spec.sae_config(acts.shape[1], i), tcfgs[i]) for i in todo}
    rels = {i: f"{stages.sae_rel(spec, hookpoint, i)}/checkpoints/shard-{parallel.shard}-of-{S}" for i in todo}
    for i in todo:
        _refuse_other_grids(stages.sae_dir(spec, hookpoint, i) / "checkpoints", work, stages.sae_rel(spec, hookpoint, i), S)
        if work.remote:
            work.fetch(rels[i])
    # resume where every rank has its shard's checkpoint
    steps = set.intersection(*(set(steps_available(work.local(rels[i]))) for i in todo))
    agreed = torch.tensor(max(steps, default=0), device=parallel.device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    first = tcfgs[todo[0]]
    if not agreed:
        sample = store.sample_rows(acts, first.geometric_median_samples, seed=first.seed)
    for i, trainer in trainers.items():
        if not agreed:
            trainer.initialize(sample)  # the whole SAE, identical on every rank, then this rank's shard
        shard_trainer(trainer, parallel)
        if agreed:
            trainer.load_state_dict(*load_checkpoint(work.local(rels[i]), int(agreed)))
    if agreed and lead:
        log.info("resuming %s from checkpoints at step %d", hookpoint, int(agreed))
    start = trainers[todo[0]].steps
    batches = store.prefetch(store.shuffled_batches(acts, first.batch_tokens, seed=first.seed, start_batch=start,
                                                    part=(parallel.data_index, parallel.grid.data)))

    def checkpoint(_trainers):
        if parallel.data_index == 0:  # the replicas of a shard hold the same state: one writes it
            for i, trainer in trainers.items():
                saved = save_checkpoint(work.local(rels[i]), *trainer.state_dict())
                work.publish(f"{rels[i]}/{saved.name}", marker=META_FILE)
        dist.barrier()

    results = train_saes(list(trainers.values()), batches, lead, checkpoint, spec.train.checkpoint_every_tokens)
    for i, result in zip(trainers, results):
        full = parallel.gather_sae(result.sae, parallel.k)
        counters = torch.cat(parallel.gather_shards(trainers[i].tracker.tokens_since_fired))
        dead = float((counters >= trainers[i].tracker.dead_tokens).float().mean())
        if lead:
            stages.write_sae(spec, hookpoint, i, replace(result, sae=full, dead_fraction=dead), tcfgs[i])
    dist.barrier()


def _refuse_other_grids(local: Path, work, rel: str, shards: int) -> None:
    """Checkpoints of another number of latent shards cannot resume this run: say so, never mix them."""
    names = set(work.listdir(f"{rel}/checkpoints")) | ({p.name for p in local.iterdir()} if local.is_dir() else set())
    other = sorted({int(m.group(1)) for n in names if (m := re.fullmatch(r"shard-\d+-of-(\d+)", n)) and int(m.group(1)) != shards})
    single = any(n.startswith("step-") for n in names)
    if other or single:
        was = f"{other[0]} latent shards" if other else "one process"
        raise ValueError(f"the checkpoints in {work.location(rel + '/checkpoints')} come from a run with {was}: resume "
                         f"with that grid (train.latent_shards), or delete them to start over with {shards}")


if __name__ == "__main__":
    main()
