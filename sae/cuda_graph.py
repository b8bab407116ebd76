"""The training step as a CUDA graph: captured once per AuxK phase, then replayed (train.cuda_graph).

Why: at small sizes the step is host-bound. On an H100 at d 256, 4096 latents, batch 4096, a step
was 0.7 ms of GPU work inside 3-4 ms of host time (Python, autograd, some hundred kernel launches).
A graph replays the recorded kernels with one launch. `Trainer.device_step` is capturable because it
never syncs with the host (in a graph AuxK picks its configured number of latents, zero beyond the
dead ones; the dead-latent counters and the non-finite flag stay on the device), its shapes are
fixed, and the optimizer reads each step's lr from device memory (ScheduleFreeSignSGD.prepare writes
it before each replay). The host reads one number per step, outside the graph: whether any latent
is dead, which picks the graph with AuxK or the one without.

The first steps of each phase (without AuxK, and with it) run eagerly on a side stream, as
PyTorch asks before a capture (lazy initialisation: library workspaces, Triton compilation, the
optimizer's state); they are ordinary training steps. A batch of another shape runs eagerly.
"""

from __future__ import annotations

import os

import torch

from sae.config import cuda_graph_blockers
from sae.train import LossParts, Trainer

WARMUP_STEPS = 2  # eager steps of a phase before its capture


def unsupported(trainer: Trainer) -> list[str]:
    """What keeps this trainer's step from being captured (empty: nothing)."""
    from sae import optim

    tcfg = trainer.tcfg
    problems = cuda_graph_blockers(tcfg.device, tcfg.resolved_optimizer(), trainer.sae.cfg.activation,
                                   1 if trainer.parallel is None else 2)
    if os.environ.get("SAEFLOW_FUSED_TOPK") == "1" and trainer.bf16:
        # sae/kernels.py's fused path gathers the dead latents for AuxK: a host sync, a shape per step
        problems.append("SAEFLOW_FUSED_TOPK=1 (its AuxK gathers the dead latents, a host sync)")
    if not problems and not optim._fused(list(trainer.sae.parameters())):
        problems.append("no Triton (the optimizer's one-pass kernel is what reads the lr on the device)")
    return problems


class StepGraphs:
    """Runs a trainer's device steps: eagerly while warming up a phase, then as a replayed graph.

    Two phases, each with its graph once warm: without AuxK (n_dead 0: no latent dead) and with it
    over the mask of dead latents (n_dead None). Both are kept: latents die and revive again and again."""

    def __init__(self, trainer: Trainer):
        problems = unsupported(trainer)
        if problems:
            raise ValueError(f"train.cuda_graph: not with {'; '.join(problems)}: set it to false")
        self.trainer = trainer
        self.warm = {False: 0, True: 0}  # eager steps run per phase (True: with AuxK)
        # per phase: (graph, its input buffer, its outputs)
        self.captured: dict[bool, tuple[torch.cuda.CUDAGraph, torch.Tensor, LossParts]] = {}

    def step(self, batch: torch.Tensor, n_dead: int | None) -> LossParts:
        if self.trainer.parallel is not None:  # sharded after construction
            raise ValueError("train.cuda_graph: not on a grid of processes: set it to false")
        if n_dead not in (0, None):
            raise ValueError(f"a CUDA graph replays AuxK over the mask (n_dead None) or no AuxK (0), not n_dead {n_dead}")
        aux = n_dead is None
        if aux in self.captured and self.captured[aux][1].shape == batch.shape:
            graph, static, parts = self.captured[aux]
            static.copy_(batch, non_blocking=True)
            graph.replay()
            return parts
        on_device = batch.to(self.trainer.device, non_blocking=True)
        if self.warm[aux] < WARMUP_STEPS or aux in self.captured:  # warming up, or a batch of another shape
            self.warm[aux] += 1
            return self._eager(on_device, n_dead)
        return self._capture(on_device, n_dead)

    def _eager(self, batch: torch.Tensor, n_dead: int | None) -> LossParts:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            parts = self.trainer.device_step(batch, n_dead)
        torch.cuda.current_stream().wait_stream(side)
        return parts

    def _capture(self, batch: torch.Tensor, n_dead: int | None) -> LossParts:
        """Records this step (recording runs nothing), then replays it: the step is taken once."""
        static = batch.clone()
        graph = torch.cuda.CUDAGraph()
        self.trainer.opt.zero_grad(set_to_none=True)  # the gradients are allocated inside the graph
        # thread_local: CUDA calls of other threads (a user's, a data loader's) may go on meanwhile
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            parts = self.trainer.device_step(static, n_dead)
        graph.replay()
        self.captured[n_dead is None] = (graph, static, parts)
        return parts
