"""Training over a grid of processes: data parallel x latents sharded (torch.distributed; gloo on
CPU, NCCL on GPUs).

Rank r sits at (d, s) = divmod(r, S) of a D x S grid. The D ranks of one shard index s see different
rows of each global batch and average their gradients; the S ranks of one data index d see the same
rows and each hold n/S of the latents (encoder rows, decoder rows, their optimiser state and
dead-latent counters). Every rank of a shard group computes the same loss, sae/loss.py's, through
the hooks of `GridShard`:

- TopK over all latents: each shard takes its local top k (the global top k is among the union of
  the local ones), the candidates are gathered, and the global top k is taken over them;
- the reconstruction is the sum of the shards' partial decodes (an all-reduce) plus b_pre;
- AuxK takes the top aux_k among the dead latents of every shard the same way;
- BatchTopK keeps the k·B largest pre-activations of the global batch: every rank offers its own
  block's k·B largest, and all keep what reaches the k·B-th largest offer (the same threshold
  everywhere); its inference threshold is the minimum over every rank's smallest kept value.

Two autograd functions carry the gradients across shards, as in Megatron-LM: the encoder's input
enters every shard (backward: sum the shards' input gradients), and the partial decodes are summed
(backward: each shard's partial gets the gradient of the whole). The result equals the unsharded
step up to float rounding (tests/test_parallel.py).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from sae.config import SAEConfig
from sae.model import TopKSAE


@dataclass(frozen=True)
class Grid:
    data: int = 1  # data-parallel replicas
    latents: int = 1  # shards of the latents

    @property
    def size(self) -> int:
        return self.data * self.latents

    def coords(self, rank: int) -> tuple[int, int]:
        return divmod(rank, self.latents)


class Parallel:
    """One rank's place in the grid and its two process groups (call on every rank: new_group is
    collective)."""

    def __init__(self, grid: Grid):
        if dist.get_world_size() != grid.size:
            raise ValueError(
                f"a {grid.data} x {grid.latents} grid needs {grid.size} processes, "
                f"the world has {dist.get_world_size()}"
            )
        self.grid = grid
        self.rank = dist.get_rank()
        # NCCL moves CUDA tensors only
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        )
        self.data_index, self.shard = grid.coords(self.rank)
        self.shard_group = self.data_group = None
        for d in range(grid.data):  # ranks sharing rows: one per shard
            group = dist.new_group([d * grid.latents + s for s in range(grid.latents)])
            if d == self.data_index:
                self.shard_group = group
        for s in range(grid.latents):  # ranks holding one shard: one per data index
            group = dist.new_group([d * grid.latents + s for d in range(grid.data)])
            if s == self.shard:
                self.data_group = group

    # collectives ----------------------------------------------------------------------------------
    # gloo moves host memory: a CUDA tensor under gloo (ranks sharing one GPU, where NCCL refuses
    # two ranks per device) goes through the host and back
    def _all_reduce(self, t: torch.Tensor, group) -> torch.Tensor:
        if t.device == self.device:
            dist.all_reduce(t, group=group)
            return t
        staged = t.to(self.device)
        dist.all_reduce(staged, group=group)
        return t.copy_(staged)

    def sum_over_shards(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, self.shard_group) if self.grid.latents > 1 else t

    def sum_over_data(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, self.data_group) if self.grid.data > 1 else t

    def _all_gather(self, t: torch.Tensor, group, size: int) -> list[torch.Tensor]:
        parts = [torch.empty_like(t, device=self.device) for _ in range(size)]
        dist.all_gather(parts, t.contiguous().to(self.device), group=group)
        return [part.to(t.device) for part in parts]

    def gather_shards(self, t: torch.Tensor) -> list[torch.Tensor]:
        return self._all_gather(t, self.shard_group, self.grid.latents) if self.grid.latents > 1 else [t]

    def gather_data(self, t: torch.Tensor) -> list[torch.Tensor]:
        """t from every rank holding this rank's shard (the other rows of the batch), in rank order."""
        return self._all_gather(t, self.data_group, self.grid.data) if self.grid.data > 1 else [t]

    def gather_all(self, t: torch.Tensor) -> list[torch.Tensor]:
        """t from every rank of the grid (one shape on every rank)."""
        return self._all_gather(t, None, self.grid.size) if self.grid.size > 1 else [t]

    def min_over_all(self, t: torch.Tensor) -> torch.Tensor:
        if self.grid.size == 1:
            return t
        staged = t.to(self.device)
        dist.all_reduce(staged, op=dist.ReduceOp.MIN)
        return t.copy_(staged)

    def average_gradients(self, sae: TopKSAE) -> None:
        """Mean over the data-parallel replicas: the gradient of the global batch's mean loss."""
        if self.grid.data == 1:
            return
        for p in sae.parameters():
            if p.grad is not None:
                self._all_reduce(p.grad, self.data_group).div_(self.grid.data)

    # the model ------------------------------------------------------------------------------------
    def gather_sae(self, part: TopKSAE, k: int) -> TopKSAE:
        """The whole SAE from every rank's shard (on every rank of the shard group)."""
        full = TopKSAE(replace(part.cfg, n_latents=part.cfg.n_latents * self.grid.latents, k=k), fill=False)
        state = part.state_dict()
        for name in ("W_enc", "W_dec", "b_enc"):
            if state.get(name) is not None:
                state[name] = torch.cat(self.gather_shards(state[name].detach()))
        full.load_state_dict(state)
        full.metadata = dict(part.metadata)
        return full

    def select(self, values: torch.Tensor, k: int) -> torch.Tensor:
        """1.0 where this shard's candidate is among the global top k of all shards' candidates (every
        rank of the group gathers the same candidates in the same order, so all choose alike)."""
        every = torch.cat(self.gather_shards(values.detach()), dim=1)  # (B, S * width), shard-major
        top = every.topk(min(k, every.shape[1]), dim=1).indices
        chosen = torch.zeros_like(every).scatter_(1, top, 1.0)
        width = values.shape[1]
        return chosen[:, self.shard * width : (self.shard + 1) * width]


class GridShard:
    """One SAE's latents on the grid: this rank's shard, and the hooks through which the loss
    (sae.loss.Latents) and the trainer (sae.placement.Placement) see the whole SAE."""

    def __init__(self, parallel: Parallel, cfg: SAEConfig):
        n, S = cfg.n_latents, parallel.grid.latents
        if n % S:
            raise ValueError(f"n_latents={n} does not split into {S} equal shards: use a multiple of {S}")
        if S > 1 and cfg.cross_layer:
            raise ValueError("a cross-layer transcoder keeps its latents in one process: use one latent shard")
        self.parallel = parallel
        self.n_latents, self.k = n, cfg.k
        self.replicas, self.processes = parallel.grid.data, parallel.grid.size
        self.rows = slice(parallel.shard * (n // S), (parallel.shard + 1) * (n // S))

    def part(self, full: TopKSAE) -> TopKSAE:
        """This rank's latents of a full SAE (b_pre and the normalisation are replicated)."""
        n_here = self.rows.stop - self.rows.start
        part = TopKSAE(replace(full.cfg, n_latents=n_here, k=min(full.cfg.k, n_here)), fill=False)
        state = full.state_dict()
        for name in ("W_enc", "W_dec", "b_enc"):
            if state.get(name) is not None:
                state[name] = state[name][self.rows]
        part.load_state_dict(state)
        part.metadata = dict(full.metadata)
        return part.to(full.W_dec.device)

    # the loss's hooks -----------------------------------------------------------------------------
    def enter(self, x: torch.Tensor) -> torch.Tensor:
        return _EnterShards.apply(x, self.parallel)

    def top(self, values: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return values * self.parallel.select(values, k), indices

    def sum(self, partial: torch.Tensor) -> torch.Tensor:
        return _SumShards.apply(partial, self.parallel)

    def batch_keep(self, count: int):
        def keep(candidates: torch.Tensor) -> int:  # this rank's candidates, descending
            every = torch.cat(self.parallel.gather_all(candidates))
            threshold = every.topk(min(count, every.numel())).values[-1]
            return int((candidates >= threshold).sum())

        return keep

    # the trainer's hooks --------------------------------------------------------------------------
    def count_dead(self, mask: torch.Tensor) -> tuple[int, int]:
        here = mask.sum()
        return tuple(torch.stack([here, self.parallel.sum_over_shards(here.clone())]).tolist())

    def average_gradients(self, sae: TopKSAE) -> None:
        self.parallel.average_gradients(sae)

    def sum_over_data(self, t: torch.Tensor) -> torch.Tensor:
        return self.parallel.sum_over_data(t)

    def sum_over_shards(self, t: torch.Tensor) -> torch.Tensor:
        return self.parallel.sum_over_shards(t)

    def min_over_all(self, t: torch.Tensor) -> torch.Tensor:
        return self.parallel.min_over_all(t)

    def rows_over_data(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.parallel.gather_data(t))


class _EnterShards(torch.autograd.Function):
    """The encoder input goes to every shard: identity forward, backward sums the shards' gradients."""

    @staticmethod
    def forward(ctx, x, parallel):
        ctx.parallel = parallel
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return ctx.parallel.sum_over_shards(grad.contiguous()), None


class _SumShards(torch.autograd.Function):
    """The shards' partial decodes summed: all-reduce forward, each partial gets the whole's gradient."""

    @staticmethod
    def forward(ctx, partial, parallel):
        return parallel.sum_over_shards(partial.clone())

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def rank_rows(batch: torch.Tensor, parallel: Parallel) -> torch.Tensor:
    """This rank's rows of a global batch (the data-parallel replicas split it evenly)."""
    D = parallel.grid.data
    if batch.shape[0] % D:
        raise ValueError(f"a batch of {batch.shape[0]} rows does not split over {D} data-parallel replicas")
    per = batch.shape[0] // D
    return batch[parallel.data_index * per : (parallel.data_index + 1) * per]


def settle() -> None:
    """Call on every rank once its last collective is done, before the process groups go: gloo's worker
    threads release a finished collective's tensors just after the caller wakes, which takes the GIL
    when the caller already let go of them; a process that reaches interpreter exit first aborts
    ("terminate called without an active exception", pytorch/pytorch#179291). A barrier's wait frees
    the GIL for them."""
    dist.barrier()


def leave() -> None:
    """Ends a rank that is done, its process groups destroyed, without interpreter teardown.

    settle() narrows, but does not close, the race of gloo's worker threads with teardown: a rank
    that had trained and written everything still aborted at exit, once failing a two-node run and
    now and then a test's spawned rank. Logs and streams are flushed first."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
