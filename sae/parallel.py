"""Training over a grid of processes: data parallel x latents sharded (torch.distributed; gloo on
CPU, NCCL on GPUs).

Rank r sits at (d, s) = divmod(r, S) of a D x S grid. The D ranks of one shard index s see different
rows of each global batch and average their gradients; the S ranks of one data index d see the same
rows and each hold n/S of the latents (encoder rows, decoder rows, their optimiser state and
dead-latent counters). Every rank of a shard group computes the same loss:

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

from dataclasses import dataclass

import torch
import torch.distributed as dist

from sae.kernels import BatchTopKEncode, mask_indices, ragged_decode, sparse_decode, topk_encode
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
            raise ValueError(f"a {grid.data} x {grid.latents} grid needs {grid.size} processes, "
                             f"the world has {dist.get_world_size()}")
        self.grid = grid
        self.k = 0  # the whole model's k (set by shard_trainer)
        self.rank = dist.get_rank()
        # NCCL moves CUDA tensors only
        self.device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
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
    def shard_of(self, full: TopKSAE) -> TopKSAE:
        """This rank's latents of a full SAE (b_pre and the normalisation are replicated)."""
        n, S = full.cfg.n_latents, self.grid.latents
        if n % S:
            raise ValueError(f"n_latents={n} does not split into {S} equal shards: use a multiple of {S}")
        rows = slice(self.shard * (n // S), (self.shard + 1) * (n // S))
        part = TopKSAE(_replace(full.cfg, n_latents=n // S, k=min(full.cfg.k, n // S)))
        state = full.state_dict()
        for name in ("W_enc", "W_dec", "b_enc"):
            if state.get(name) is not None:
                state[name] = state[name][rows]
        part.load_state_dict(state)
        part.metadata = dict(full.metadata)
        return part.to(full.W_dec.device)

    def gather_sae(self, part: TopKSAE, k: int) -> TopKSAE:
        """The whole SAE from every rank's shard (on every rank of the shard group)."""
        full = TopKSAE(_replace(part.cfg, n_latents=part.cfg.n_latents * self.grid.latents, k=k))
        state = part.state_dict()
        for name in ("W_enc", "W_dec", "b_enc"):
            if state.get(name) is not None:
                state[name] = torch.cat(self.gather_shards(state[name].detach()))
        full.load_state_dict(state)
        full.metadata = dict(part.metadata)
        return full

    def loss(self, sae: TopKSAE, x_norm: torch.Tensor, mse_scale: float, tcfg, dead: torch.Tensor | None):
        """sae_loss over the sharded latents (same value on every shard of a data index)."""
        from sae.train import LossParts, _sq_err

        n_local = sae.cfg.n_latents
        n = n_local * self.grid.latents
        k = self.k
        k_wide = min(4 * k, n) if tcfg.multi_topk else k
        local_dead = dead.sum() if dead is not None else torch.zeros((), dtype=torch.long, device=x_norm.device)
        # this shard's dead latents and all shards': one host sync
        n_here, n_dead = torch.stack([local_dead, self.sum_over_shards(local_dead.clone())]).tolist()
        aux_k = min(tcfg.resolved_aux_k(sae.cfg.d_in), n_dead)
        x_in = _EnterShards.apply(x_norm - sae.b_pre, self)
        if sae.cfg.activation == "batchtopk":
            return self._batch_topk_loss(sae, x_in, x_norm, mse_scale, tcfg, dead, aux_k)
        # the same candidate widths on every shard (gathered side by side); a shard with fewer dead
        # latents than aux_k offers zeros, which contribute nothing. AuxK multiplies the dead rows alone.
        values, indices, aux_values, aux_indices = topk_encode(
            x_in, sae.W_enc, sae.b_enc, min(k_wide, n_local), min(aux_k, n_local), dead if aux_k else None,
            mask_indices(dead, n_here) if aux_k else None)
        wide = self._select(values, k_wide)  # (B, candidates) masks of this shard's winners
        main = self._select(values, k)

        def decode(mask, v, idx):
            return _SumShards.apply(sparse_decode(v * mask, idx, sae.W_dec), self)

        recon = decode(main, values, indices) + sae.b_pre
        mse = _sq_err(x_norm, recon, mse_scale)
        loss = mse
        if k_wide > k:
            loss = loss + _sq_err(x_norm, decode(wide, values, indices) + sae.b_pre, mse_scale) / 8
        aux = torch.zeros((), device=x_norm.device)
        if aux_k > 0:
            aux = self._aux_loss(sae, aux_values, aux_indices, aux_k, x_norm, recon, mse_scale)
            loss = loss + tcfg.aux_coef * aux
        # this shard's part of the main code, for its dead-latent counters
        return LossParts(loss, mse.detach(), aux.detach(), (values * main).detach(), indices)

    def _batch_topk_loss(self, sae: TopKSAE, x_in, x_norm, mse_scale: float, tcfg, dead, aux_k: int):
        """BatchTopK over the global batch: the k·B largest pre-activations of all rows of all replicas
        and all shards' latents. Each rank offers its own block's k·B largest (the global set's part in
        any block is among them), the k·B-th largest of all offers is the threshold, and each rank
        keeps its candidates at or above it. AuxK as for TopK (per row, over the dead latents)."""
        from sae.train import LossParts, _sq_err

        rows_here = x_norm.shape[0]
        count = self.k * rows_here * self.grid.data

        def keep(candidates: torch.Tensor) -> int:  # candidates: this rank's, descending
            every = torch.cat(self.gather_all(candidates))
            threshold = every.topk(min(count, every.numel())).values[-1]
            return int((candidates >= threshold).sum())

        rows, cols, values = BatchTopKEncode.apply(x_in, sae.W_enc, sae.b_enc, count, keep)
        recon = _SumShards.apply(ragged_decode(rows, cols, values, sae.W_dec, rows_here), self) + sae.b_pre
        mse = _sq_err(x_norm, recon, mse_scale)
        loss, aux = mse, torch.zeros((), device=x_norm.device)
        if aux_k > 0:
            _, _, aux_values, aux_indices = topk_encode(x_in, sae.W_enc, sae.b_enc, 1, min(aux_k, sae.cfg.n_latents), dead)
            aux = self._aux_loss(sae, aux_values, aux_indices, aux_k, x_norm, recon, mse_scale)
            loss = loss + tcfg.aux_coef * aux
        return LossParts(loss, mse.detach(), aux.detach(), values.detach(), cols)

    def _aux_loss(self, sae: TopKSAE, aux_values, aux_indices, aux_k: int, x_norm, recon, mse_scale: float):
        """AuxK over the global dead latents: the top aux_k of every shard's dead candidates model the
        live latents' residual (§A.2)."""
        from sae.train import _sq_err

        partial = sparse_decode(aux_values * self._select(aux_values, aux_k), aux_indices, sae.W_dec)
        return torch.nan_to_num(_sq_err(x_norm - recon.detach(), _SumShards.apply(partial, self), mse_scale), nan=0.0)

    def _select(self, values: torch.Tensor, k: int) -> torch.Tensor:
        """1.0 where this shard's candidate is among the global top k of all shards' candidates (every
        rank of the group gathers the same candidates in the same order, so all choose alike)."""
        every = torch.cat(self.gather_shards(values.detach()), dim=1)  # (B, S * width), shard-major
        top = every.topk(min(k, every.shape[1]), dim=1).indices
        chosen = torch.zeros_like(every).scatter_(1, top, 1.0)
        width = values.shape[1]
        return chosen[:, self.shard * width : (self.shard + 1) * width]


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


def _replace(cfg, **changes):
    from dataclasses import replace

    return replace(cfg, **changes)


def shard_trainer(trainer, parallel: Parallel) -> None:
    """Turns an initialised full-size Trainer (identical on every rank) into this rank's part: its
    shard of the SAE, an optimiser over the shard (same lr as the whole), its dead-latent counters."""
    from sae.train import DeadLatentTracker, make_optimizer

    full = trainer.sae
    parallel.k = full.cfg.k
    trainer.sae = parallel.shard_of(full)
    trainer.opt = make_optimizer(trainer.sae, trainer.tcfg, trainer.base_lr)
    old = trainer.tracker
    n_local = trainer.sae.cfg.n_latents
    trainer.tracker = DeadLatentTracker(
        old.tokens_since_fired[parallel.shard * n_local : (parallel.shard + 1) * n_local].clone(),
        old.dead_tokens, old.threshold)
    trainer.ema = {name: torch.zeros_like(p) for name, p in trainer.sae.named_parameters()} if trainer.ema else {}
    trainer.parallel = parallel


def rank_rows(batch: torch.Tensor, parallel: Parallel) -> torch.Tensor:
    """This rank's rows of a global batch (the data-parallel replicas split it evenly)."""
    D = parallel.grid.data
    if batch.shape[0] % D:
        raise ValueError(f"a batch of {batch.shape[0]} rows does not split over {D} data-parallel replicas")
    per = batch.shape[0] // D
    return batch[parallel.data_index * per : (parallel.data_index + 1) * per]
