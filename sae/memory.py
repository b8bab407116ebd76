"""How much memory one training process needs: the planner behind `saeflow plan-memory` and the
train.device_memory_gib check. Counts what a step holds at its peak, per rank of a grid of
`replicas` data-parallel copies x `shards` latent shards (sae/parallel.py)."""

from __future__ import annotations

from dataclasses import dataclass

FLOAT32 = 4


@dataclass(frozen=True)
class MemoryPlan:
    weights: int  # encoder and decoder rows of this shard, biases (float32)
    gradients: int
    optimizer: int  # schedule-free sign descent: one copy (z); Adam: two moments
    ema: int
    batch: int  # one batch's activations: inputs, pre-activations, their top-k and AuxK copies
    reader: int = 0  # the store reader's block of 16-bit rows, shuffled where training runs
    graphs: int = 0  # CUDA graphs' memory pools: a batch's temporaries per AuxK phase, held all run

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.ema + self.batch + self.reader + self.graphs

    @property
    def transient(self) -> int:
        """What SAEs trained together share rather than add up: a batch at a time and one reader."""
        return self.batch + self.reader

    def rows(self) -> list[tuple[str, int]]:
        return [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer),
            ("weight EMA", self.ema),
            ("one batch", self.batch),
            ("the reader's shuffle block", self.reader),
            ("captured steps (CUDA graphs)", self.graphs),
            ("total", self.total),
        ]


def plan_memory(
    d_in: int,
    n_latents: int,
    k: int,
    batch_tokens: int,
    replicas: int = 1,
    shards: int = 1,
    optimizer: str = "signum",
    ema: bool = False,
    bf16: bool = False,
    aux: bool = True,
    multi_topk: bool = False,
    cuda: bool = False,
    fused: bool = False,
    reader_bytes: int = 0,
    transcoder: bool = False,
    skip_connection: bool = False,
    layers: int = 1,
    graphs: bool = False,
) -> MemoryPlan:
    """aux: dead latents present (AuxK's masked copy of the pre-activations); cuda: the Triton weight
    gradients (no dense buffer; train.triton on CUDA); fused: train.fused_topk (no pre-activation matrix);
    reader_bytes: the shuffle block the store's reader keeps beside the step; transcoder: rows of input
    and target (twice as wide); skip_connection: a (d, d) W_skip beside the dictionary; layers: a
    cross-layer transcoder's (rows, decoder rows, b_pre and W_skip L times as wide; its encoder
    selects one layer's n / L latents at a time); graphs: the step replayed as CUDA graphs (each
    AuxK phase's graph keeps its own batch of temporaries for the whole run)."""
    n = n_latents // shards
    rows = batch_tokens // replicas
    width = d_in * layers  # a row of the input, of the target, of the decoder
    weights = (n * d_in + n * width + n + width + (width * d_in if skip_connection else 0)) * FLOAT32
    # autocast keeps a bf16 copy of the encoder for the matmul
    bf16_encoder = n * d_in * 2 if bf16 else 0
    pre_bytes = 2 if bf16 else FLOAT32
    kept = min(4 * k, n) if multi_topk else k
    # the pre-activations, and with AuxK their masked copy; the sparse gradient products are k wide;
    # on the CPU a weight gradient is assembled in one dense (n, d) buffer before it lands in .grad
    pre = 0 if fused else rows * (n // layers) * pre_bytes * (2 if aux else 1)
    row_floats = 8 if transcoder else 6  # the input, its normalised copy, reconstructions: a target adds two
    dense_grad = 0 if cuda else n * width * FLOAT32
    batch = pre + rows * width * FLOAT32 * row_floats + rows * kept * 8 * 4 + dense_grad
    return MemoryPlan(
        weights=weights + bf16_encoder,
        gradients=weights,
        optimizer=(1 if optimizer == "signum" else 2) * weights,
        ema=weights if ema else 0,
        batch=batch,
        reader=reader_bytes,
        graphs=2 * batch if graphs else 0,
    )


def pack_groups(plans: list[MemoryPlan], limit: int) -> list[list[int]]:
    """SAEs (by index) in groups that train together within `limit` bytes per device, first fit by
    decreasing size. Trained together, SAEs keep their weights, gradients and optimiser state side by
    side but take their steps one after the other, so a group needs the sum of the former and the
    largest batch and one reader. An SAE that alone exceeds the limit gets a group of its own
    (validation refuses it)."""

    def persistent(p: MemoryPlan) -> int:
        return p.total - p.transient

    groups: list[list[int]] = []
    for i in sorted(range(len(plans)), key=lambda i: -plans[i].total):
        for group in groups:
            members = [plans[j] for j in group] + [plans[i]]
            if sum(map(persistent, members)) + max(p.transient for p in members) <= limit:
                group.append(i)
                break
        else:
            groups.append([i])
    return [sorted(g) for g in sorted(groups)]
