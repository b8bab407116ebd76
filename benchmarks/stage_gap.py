"""Where `train_saes` loses to the bare training step (issue 27: on an H200 it ran at half of
`train_throughput.py`'s tokens/s at d 768 / 32768 latents in bf16, on the CPU the two agree).

    python benchmarks/stage_gap.py [--d 768] [--latents 32768] [--batch 4096] [--steps 300] [--profile 20]

One run, one device: the trainer as `data_path.py` builds it (a run's budget, so the lr decays,
before the dead-latent window) and as `train_throughput.py` builds it (an endless budget, in the
AuxK phase with no latent dead), each driven by a plain loop of `Trainer.step` and by `train_saes`
over the same in-memory batches, then the same trainers with one difference each. Ends with the
profile of a few steps of the slowest through `train_saes` (kernels by device time, operators by host time).
"""

from __future__ import annotations

import argparse
import itertools
import warnings

import torch
from data_path import train_rate
from torch.profiler import ProfilerActivity, profile
from train_throughput import time_steps

from sae.config import SAEConfig, TrainConfig
from sae.train import Trainer, train_saes


def build(d: int, latents: int, batch: int, device: str, steps: int, *, endless: bool, aux_phase: bool) -> Trainer:
    """A trainer with `steps` to go (or an endless budget), before or in the AuxK phase, none dead."""
    dead_tokens = 10**9
    start = dead_tokens if aux_phase else TrainConfig(batch_tokens=batch, device=device).dead_window(latents, 32)
    tokens = 10**12 if endless else start + steps * batch
    tcfg = TrainConfig(batch_tokens=batch, tokens=tokens, device=device, dead_tokens=dead_tokens)
    t = Trainer(SAEConfig(d, latents, 32), tcfg)
    t.initialize(torch.randn(4 * batch, d, device=device))
    t.tokens = start
    return t


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--latents", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--profile", type=int, default=20, help="steps profiled (0: none)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    d, n, b, steps, device = args.d, args.latents, args.batch, args.steps, args.device
    batches = list(torch.randn(4 * b, d, device=device).split(b))
    variants = {
        "data_path's trainer": dict(endless=False, aux_phase=False),
        "  with an endless budget (constant lr)": dict(endless=True, aux_phase=False),
        "  in the AuxK phase (the dead-mask sync)": dict(endless=False, aux_phase=True),
        "train_throughput's trainer": dict(endless=True, aux_phase=True),
    }
    print(f"{'trainer':<42} {'step loop':>12} {'train_saes':>12} {'ratio':>6}  (tokens/s; d {d}, n {n}, batch {b})")
    slowest = (float("inf"), "")
    warnings.filterwarnings("ignore", "the activations ran out")  # the endless budgets end with the batches
    for name, how in variants.items():
        t = build(d, n, b, device, steps + 4, **how)  # time_steps warms up with 4 steps
        loop = time_steps(lambda i, t=t: t.step(batches[i % len(batches)]), steps, device)["steps_per_s"] * b
        fed = itertools.islice(itertools.cycle(batches), steps + 3)
        stage = train_rate(build(d, n, b, device, steps + 3, **how), fed, device)
        print(f"{name:<42} {loop:>12,.0f} {stage:>12,.0f} {stage / loop:>6.2f}", flush=True)
        slowest = min(slowest, (stage, name))
    if args.profile:
        name = slowest[1]
        t = build(d, n, b, device, args.profile + 5, **variants[name])
        train_saes([t], itertools.islice(itertools.cycle(batches), 5), progress=False)
        sync(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            train_saes([t], itertools.islice(itertools.cycle(batches), args.profile), progress=False)
            sync(device)
        print(f"\nprofile of {args.profile} steps of {name.strip()} through train_saes")
        averages = prof.key_averages()
        if device == "cuda":
            print(averages.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
        print(averages.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
