"""The train stage's lifecycle, written once for one process and for each rank of a grid:

    trainers -> fetch checkpoints -> agree on a step -> initialise or resume -> shuffled batches
             -> train_saes (checkpointing) -> write the SAEs

What differs between the two is a `Team`: how the processes that train the SAEs together agree,
which rows each reads and who writes. `Alone` is the one-process team; flows/distributed.py holds
the grid's.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from flows import interrupt
from flows.paths import CHECKPOINTS, SAE_MARKER, is_trained, sae_dir, sae_rel, store_options, store_url, train_parts
from flows.spec import RunSpec
from sae.config import SAEConfig
from sae.placement import OneProcess, Placement
from sae.train import Trainer, TrainResult, milestone_tokens, train_saes
from storage import activations as store
from storage import reading
from storage.checkpoints import META_FILE as CHECKPOINT_MARKER
from storage.checkpoints import intact_steps, load_checkpoint, save_checkpoint
from storage.window import TrainerSide, Window

log = logging.getLogger(__name__)

MILESTONE_ROWS = 4096  # held-out rows a sweep's milestone is scored on


class Team(Protocol):
    """The processes that train a hookpoint's SAEs together. `lead` speaks for them (progress, logs,
    the written SAEs); `writes_checkpoints` says whether this one saves its state; `latent_shards` how
    many parts each SAE is split into; `batch_part` which rows of each batch this one reads
    (index, of how many); `milestones` whether a sweep's SAEs can be scored during training."""

    lead: bool
    writes_checkpoints: bool
    latent_shards: int
    batch_part: tuple[int, int]
    milestones: bool

    def placement(self, cfg: SAEConfig) -> Placement: ...

    def checkpoints_rel(self, rel: str) -> str:
        """Where this process keeps the checkpoints of the SAE at `rel`."""
        ...

    def agree(self, step: int) -> int:
        """The step every process can resume from, given this one's."""
        ...

    def barrier(self) -> None: ...

    def whole(self, trainer: Trainer, result: TrainResult) -> TrainResult:
        """The result for the whole SAE (gathered from every process's part)."""
        ...


class Alone:
    """One process trains the SAEs whole."""

    lead: bool = True
    writes_checkpoints: bool = True
    latent_shards: int = 1
    batch_part: tuple[int, int] = (0, 1)
    milestones: bool = True

    def placement(self, cfg: SAEConfig) -> Placement:
        return OneProcess(cfg)

    def checkpoints_rel(self, rel: str) -> str:
        return f"{rel}/{CHECKPOINTS}"

    def agree(self, step: int) -> int:
        return step

    def barrier(self) -> None:
        return None

    def whole(self, trainer: Trainer, result: TrainResult) -> TrainResult:
        return result


def train_hookpoint(
    spec: RunSpec, hookpoint: str, indices: list[int], device: str, team: Team, progress: bool = True
) -> list[str]:
    """Trains the SAEs `indices` of one hookpoint from one pass over its activations (those already
    trained are skipped); checkpoints every train.checkpoint_every_tokens and resumes from the last
    checkpoint all of them share. Returns where every SAE of the hookpoint is."""
    work = spec.work
    locations = [work.location(sae_rel(spec, hookpoint, i)) for i in range(len(spec.sae))]
    todo = [i for i in indices if not is_trained(spec, hookpoint, [i])]
    for i in todo:
        if team.lead and work.exists(f"{sae_rel(spec, hookpoint, i)}/{SAE_MARKER}"):
            log.warning(
                "the SAE at %s is damaged (its weights do not match their checksum): training it again", locations[i]
            )
    if not todo:
        if team.lead:
            log.info("SAEs for %s already trained at %s", hookpoint, ", ".join(locations))
        return locations
    # verify: a missing or corrupted shard stops here, naming it, before any training
    group = store.open_store(store_url(spec), store_options(spec), verify=team.lead)
    team.barrier()  # the lead checked every shard of the store
    acts = store.activations(group, "train", spec.site(hookpoint))
    window = Window.of(store_url(spec), store_options(spec))
    order = reading.chunk_order(
        acts,
        spec.train.batch_tokens,
        spec.train.seed,
        reading.chunks_in(acts, spec.train.shuffle_buffer_mb),
        team.batch_part,
        window.group_chunks if window else None,
    )
    windowed = TrainerSide(window, order, team.lead)
    tokens = windowed.pass_tokens(acts.shape[0])  # a window is read once
    tcfgs = {i: spec.train_config(tokens, device, i) for i in todo}
    budget = tcfgs[todo[0]].tokens or tokens
    if window and budget > tokens:
        raise ValueError(
            f"data.window_shards: one pass over the train split yields {tokens} tokens in whole batches, fewer "
            f"than the {budget} the SAEs train on: raise data.tokens to about "
            f"{math.ceil(spec.data.tokens * budget / tokens)}, or train fewer tokens"
        )
    trainers = {}
    for i in todo:
        cfg = spec.sae_config(spec.d_model_of(acts.shape[1]), i)
        trainers[i] = Trainer(cfg, tcfgs[i], team.placement(cfg))
    ckpt_rels = {i: team.checkpoints_rel(sae_rel(spec, hookpoint, i)) for i in todo}
    for i in todo:
        refuse_other_grids(work, sae_rel(spec, hookpoint, i), team.latent_shards)
        if work.remote:  # checkpoints live in the work dir: a run on another machine resumes from them
            work.fetch(ckpt_rels[i])
    # damaged checkpoints are named and passed over: the newest intact one every SAE has
    common = set.intersection(*(set(intact_steps(work.local(ckpt_rels[i]))) for i in todo))
    step = team.agree(max(common, default=0))
    first = tcfgs[todo[0]]
    if step:
        for i, trainer in trainers.items():
            state = load_checkpoint(work.local(ckpt_rels[i]), step)
            if state is None:  # listed above, gone since: another process is pruning the same folder
                raise RuntimeError(f"the checkpoint at step {step} in {work.location(ckpt_rels[i])} went missing")
            trainer.load_state_dict(*state)
        if team.lead:
            log.info("resuming %s from checkpoints at step %d", hookpoint, step)
    windowed.release_covered(step)  # where caching resumes: this run's group on
    if not step:
        windowed.wait_initial()
        sample = reading.sample_rows(
            acts, first.geometric_median_samples, seed=first.seed, chunks=windowed.initial_chunks()
        )
        for trainer in trainers.values():
            trainer.initialize(sample)  # the whole SAE (identical on every process), then this one's part
    batches = reading.prefetch(
        reading.batches_in_order(
            acts,
            order,
            start_batch=trainers[todo[0]].steps,
            readers=spec.train.readers or reading.DEFAULT_READERS,
            device=device,
            wait=windowed.waiter(),
        )
    )

    def checkpoint(_trainers):
        if team.writes_checkpoints:
            for i, trainer in trainers.items():
                save_and_publish_checkpoint(work, ckpt_rels[i], trainer)
        team.barrier()
        windowed.release_covered(trainers[todo[0]].steps)

    milestones, score = [], None
    if spec.sweep is not None and spec.sweep.milestones and team.milestones:  # a sweep's loss-vs-tokens curves
        from sae.evaluate import held_out_metrics

        held_acts = store.activations(group, "eval", spec.site(hookpoint))
        held = next(reading.iter_rows(held_acts, MILESTONE_ROWS, stop=MILESTONE_ROWS))
        milestones = milestone_tokens(first.tokens or 0, spec.sweep.milestones, first.batch_tokens)
        score = functools.partial(held_out_metrics, rows=held)
    with interrupt.stoppable():
        results = train_saes(
            list(trainers.values()),
            batches,
            progress and team.lead,
            checkpoint,
            spec.train.checkpoint_every_tokens,
            milestones=milestones,
            evaluate=score,
            checkpoint_at_tokens=windowed.checkpoint_tokens(),
            stop=interrupt.requested,
        )
    for (i, trainer), result in zip(trainers.items(), results):
        whole = team.whole(trainer, result)
        if team.lead:
            write_sae(
                spec,
                hookpoint,
                i,
                whole,
                tcfgs[i].lr_for(whole.sae.cfg),
                trainer.milestones,
            )
    team.barrier()
    windowed.release_all()
    return locations


def save_and_publish_checkpoint(work, rel: str, trainer: Trainer) -> None:
    """Saves a trainer's state under `rel`; a remote work dir gets it too, and loses what was pruned here."""
    saved = save_checkpoint(work.local(rel), *trainer.state_dict())
    if work.remote:
        work.publish(f"{rel}/{saved.name}", marker=CHECKPOINT_MARKER)
        for name in work.listdir(rel):
            if not (work.local(rel) / name).exists():
                work.remove(f"{rel}/{name}")


def refuse_other_grids(work, rel: str, shards: int) -> None:
    """Checkpoints of another number of latent shards cannot resume this run: say so, never mix them."""
    local = work.local(f"{rel}/{CHECKPOINTS}")
    names = set(work.listdir(f"{rel}/{CHECKPOINTS}")) | ({p.name for p in local.iterdir()} if local.is_dir() else set())
    other = sorted(
        {int(m.group(1)) for n in names if (m := re.fullmatch(r"shard-\d+-of-(\d+)", n)) and int(m.group(1)) != shards}
    )
    single = shards > 1 and any(n.startswith("step-") for n in names)
    if other or single:
        was = f"{other[0]} latent shards" if other else "one process"
        raise ValueError(
            f"the checkpoints in {work.location(rel + '/' + CHECKPOINTS)} come from a run with {was}: "
            f"resume with that grid (train.latent_shards), or delete them to start over with {shards}"
        )


def write_sae(
    spec: RunSpec, hookpoint: str, index: int, result: TrainResult, lr: float, milestones: Sequence[dict] = ()
) -> None:
    """Writes a trained SAE (and its history) into its folder, publishes it, drops its checkpoints."""
    lm_dir = spec.converted_model_dir()
    meta = {
        "model": spec.model.source,
        "hookpoint": hookpoint,
        "first_position": int(spec.data.drop_first_position),
        "train_tokens": result.tokens,
        "train_steps": result.steps,
        "train_dead_fraction": result.dead_fraction,
        "lr": lr,
        "spec_hash": spec.part_hash(*train_parts(index)),
        "store_url": store_url(spec),
        # the hub commit of the model the activations came from (exports pass it on)
        "model_revision": store.open_group_for_status(store_url(spec), store_options(spec)).attrs.get("model_revision")
        or None,
        "lm": str(lm_dir) if (lm_dir / "config.json").exists() else spec.model.source,
    }
    out, rel = sae_dir(spec, hookpoint, index), sae_rel(spec, hookpoint, index)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "train_history.json", {"history": result.history, "milestones": list(milestones)})
    result.sae.save(out, metadata=meta)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    spec.work.publish(rel, marker=SAE_MARKER)
    spec.work.remove(f"{rel}/{CHECKPOINTS}")
    log.info("SAE %d for %s written to %s", index, hookpoint, spec.work.location(rel))


def write_json(path: Path, data: dict) -> None:
    """Written whole, then renamed into place."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False))
    os.replace(tmp, path)
