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

from collections.abc import Callable

import torch

from sae.loss import AuxMode, DeadLatents, LossParts

WARMUP_STEPS = 2  # eager steps of a phase before its capture

DeviceStep = Callable[[torch.Tensor, DeadLatents], LossParts]


class StepGraphs:
    """Runs a trainer's device steps: eagerly while warming up a phase, then as a replayed graph.

    Two phases, each with its graph once warm: without AuxK (AuxMode.OFF: no latent dead) and with it
    over the mask of dead latents (AuxMode.MASKED). Both are kept: latents die and revive again and
    again. `step` is the trainer's device step; `zero_grad` drops the gradients before a capture."""

    captures = True  # the trainer gives it AuxK over the mask (fixed shapes), and autocast no weight cache

    def __init__(self, step: DeviceStep, zero_grad: Callable[[], None], device: torch.device):
        self.device_step, self.zero_grad, self.device = step, zero_grad, device
        self.warm = {False: 0, True: 0}  # eager steps run per phase (True: with AuxK)
        # per phase: (graph, its input buffer, its outputs)
        self.captured: dict[bool, tuple[torch.cuda.CUDAGraph, torch.Tensor, LossParts]] = {}

    def reset(self) -> None:
        """Forgets the graphs: they write tensors that a loaded checkpoint has just replaced."""
        self.warm = {False: 0, True: 0}
        self.captured = {}

    def __call__(self, batch: torch.Tensor, dead: DeadLatents) -> LossParts:
        if dead.mode is AuxMode.DEAD_ROWS:
            raise ValueError("a CUDA graph replays AuxK over the mask or no AuxK, not AuxK over counted rows")
        aux = dead.mode is AuxMode.MASKED
        if aux in self.captured and self.captured[aux][1].shape == batch.shape:
            graph, static, parts = self.captured[aux]
            static.copy_(batch, non_blocking=True)
            graph.replay()
            return parts
        on_device = batch.to(self.device, non_blocking=True)
        if self.warm[aux] < WARMUP_STEPS or aux in self.captured:  # warming up, or a batch of another shape
            self.warm[aux] += 1
            return self._eager(on_device, dead)
        return self._capture(on_device, dead)

    def _eager(self, batch: torch.Tensor, dead: DeadLatents) -> LossParts:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            parts = self.device_step(batch, dead)
        torch.cuda.current_stream().wait_stream(side)
        return parts

    def _capture(self, batch: torch.Tensor, dead: DeadLatents) -> LossParts:
        """Records this step (recording runs nothing), then replays it: the step is taken once."""
        static = batch.clone()
        graph = torch.cuda.CUDAGraph()
        self.zero_grad()  # the gradients are allocated inside the graph
        # thread_local: CUDA calls of other threads (a user's, a data loader's) may go on meanwhile
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            parts = self.device_step(static, dead)
        graph.replay()
        self.captured[dead.mode is AuxMode.MASKED] = (graph, static, parts)
        return parts
