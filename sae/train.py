"""Training loop for TopK SAEs: the recipe of Gao et al. 2024 (§2.3, §A), one readable loop."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from sae import kernels
from sae.config import SAEConfig, TrainConfig, cuda_graph_blockers, fused_topk_blockers, graphs_by_default
from sae.cuda_graph import DeviceStep, StepGraphs
from sae.data import Activations, batch_stream, head_sample, open_activations
from sae.geometric_median import geometric_median
from sae.kernels import sparse_decode
from sae.loss import NO_DEAD, AuxMode, DeadLatents, DeadLatentTracker, LossParts, matryoshka_open, sae_loss
from sae.model import TopKSAE
from sae.optim import ScheduleFreeSignSGD, project_rows_
from sae.placement import OneProcess, Placement
from sae.resample import Restarts, resample_due, restarts_for
from sae.sinks import NO_SINK_ROWS, SinkRows, refit_sink_decoders


class Stopped(KeyboardInterrupt):
    """Training was asked to stop (Ctrl-C): it stopped after a step, with a checkpoint there."""


class NonFiniteLoss(FloatingPointError):
    """Training diverged: the run stops, and nothing after the last finite loss is saved."""


@torch.no_grad()
def init_from_sample(
    sae: TopKSAE,
    sample: torch.Tensor,
    use_geometric_median: bool = True,
    scale_encoder: bool = True,
    decoder_rows_from: torch.Generator | None = None,
) -> tuple[float, SinkRows]:
    """Sets the data-dependent constants from a raw sample of training rows; returns the MSE scale
    and an SAE's sink latents with the sample's sink rows (sae.sinks: the end of the run refits them).

    The MSE scale is 1 / E||y - mean(y)||^2 on the sample (y: the target, an SAE's input), fixed for
    the whole run: the paper normalises the loss once, never per batch. A transcoder's encoder bias
    starts at -W_enc m (m: its input's geometric median), so that its encoder reads centred inputs
    as an SAE's does. With `decoder_rows_from`, the latents start at sample rows (pairs) drawn by
    that generator (decoder_rows_from_data) before the encoder is scaled; an SAE's attention sinks
    are judged on its raw rows, where they are massive (standardised, they are not).
    """
    x_raw, y_raw = sae.split(sample)
    if sae.cfg.normalization == "dataset_scale":
        sae.input_scale.copy_(_unit_scales(x_raw, sae.cfg))
        if sae.cfg.transcoder:
            sae.target_scale.copy_(target_scales(y_raw, sae.cfg))
    x, _ = sae.normalize(x_raw)
    y = sae.normalize_target(y_raw)[0] if sae.cfg.transcoder else x  # an SAE's target is its input
    centre = None  # a transcoder's input's geometric median: its encoder bias reads x - centre
    if use_geometric_median:
        sae.b_pre.copy_(geometric_median(y))
        if sae.cfg.transcoder and sae.b_enc is not None:
            centre = geometric_median(x)
    sinks, sink_rows = NO_SINKS, NO_SINK_ROWS
    if decoder_rows_from is not None:
        raw_sinks = None if sae.cfg.transcoder else massive_rows(x_raw)
        sinks = decoder_rows_from_data(sae, x, decoder_rows_from, y if sae.cfg.transcoder else None, centre, raw_sinks)
        if raw_sinks is not None:
            sink_rows = SinkRows(sinks.latents.cpu(), x[raw_sinks].float().cpu())
    if centre is not None and sae.b_enc is not None:
        sae.b_enc.copy_(-(sae.preactivations(centre[None])[0] if sae.cfg.cross_layer else sae.W_enc @ centre))
    if scale_encoder:
        scale_encoder_least_squares(sae, x, y)
    size_sink_latents(sae, sinks)
    return 1.0 / (y - y.mean(0)).pow(2).sum(-1).mean().item(), sink_rows


# The cosine bounds data-initialised rows are kept below, tightest first (spread_rows; docs/method.md).
# An SAE's: the steep planted regime lost 0.7's lead where frequent features crowd its rows.
SAE_DISTINCT_COS = (0.5, 0.6, 0.7)
TRANSCODER_DISTINCT_COS = (0.7,)  # its pairs' bound: the ladder left more dead (docs/method.md)
SINK_GATE = 0.5  # a sink latent fires on rows that project at least half as far as its own pair's input


@dataclass(frozen=True)
class SinkLatents:
    """Latents started at a sample pair whose target is massive (an attention sink's MLP output, norm
    over MASSIVE_NORM x the median), with the norms of what each one's pair reads (x - centre) and
    writes (y - b_pre) in the normalised space, on the sample's device."""

    latents: torch.Tensor
    reads: torch.Tensor
    writes: torch.Tensor

    @staticmethod
    def cat(parts: Sequence[SinkLatents]) -> SinkLatents:
        return SinkLatents(*(torch.cat([getattr(p, f) for p in parts]) for f in ("latents", "reads", "writes")))


NO_SINKS = SinkLatents(torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0))


@torch.no_grad()
def decoder_rows_from_data(
    sae: TopKSAE,
    x_norm: torch.Tensor,
    generator: torch.Generator,
    target: torch.Tensor | None = None,
    centre: torch.Tensor | None = None,
    sink_rows: torch.Tensor | None = None,
) -> SinkLatents:
    """An SAE's decoder rows, and its tied encoder rows, set to the unit directions of centred sample
    rows (x - b_pre) taken in an order drawn by `generator`, as spread as the sample allows
    (spread_rows under SAE_DISTINCT_COS), the `sink_rows` (massive in the raw space) first; latents
    beyond the distinct rows found keep their random rows. A transcoder's
    latent starts at a sample pair instead: its encoder row reads its input's direction (x - centre,
    the input's geometric median, the point its encoder bias reads from), its decoder row writes its
    target's (y - b_pre), distinct under TRANSCODER_DISTINCT_COS; the pairs whose target is massive
    come first, so that each distinct sink
    gets a latent (size_sink_latents sizes them once the encoder is scaled); a cross-layer
    transcoder's block l, from a draw of its own, reads x_l and writes y_l .. y_L, its sinks those of
    y_l. Returns the sink latents (TrainConfig.decoder_init "data").

    Why: in a run of few optimizer steps the SAE stays close to its init, and random directions
    reconstruct little of real activations. Why distinct: a latent started next to another one
    (cosine over 0.7) competes with it for the same top-k places, and on SmolLM2 half of such pairs
    ended dead after a few steps; drawing distinct rows also lowered the held-out nMSE*."""
    cfg = sae.cfg
    if not cfg.cross_layer:
        pairs = _drawn_pairs(sae, x_norm, generator, target, centre, sink_rows=sink_rows)
        return _start_at_pairs(sae, slice(0, cfg.n_latents), *pairs)
    # a cross-layer transcoder's block l: pairs of (x_l, y_l .. y_L), its own draw of the sample, so
    # that two blocks do not start at one token's pattern on the layers both write
    L, d, m = cfg.layers(), cfg.d_in, cfg.n_latents // cfg.layers()
    sinks = []
    for layer in range(L):
        own = slice(layer * d, (layer + 1) * d)
        reads, writes, massive = _drawn_pairs(sae, x_norm, generator, target, centre, own)
        writes[:, : layer * d] = 0.0  # nothing on the earlier layers (TopKSAE._writes)
        sinks.append(_start_at_pairs(sae, slice(layer * m, (layer + 1) * m), reads[:, own], writes, massive))
    return SinkLatents.cat(sinks)


def _drawn_pairs(
    sae: TopKSAE,
    x_norm: torch.Tensor,
    generator: torch.Generator,
    target: torch.Tensor | None,
    centre: torch.Tensor | None,
    own: slice = slice(None),
    sink_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(what encoder rows read, what decoder rows write, which are sinks) of the sample's rows in an
    order drawn by `generator`, the sinks first, each part in the draw's order: for an SAE its centred
    inputs both, the sinks its `sink_rows`; for a transcoder its input less its centre and target less
    b_pre, the sinks the pairs whose target (its `own` columns) is massive."""
    order = torch.randperm(len(x_norm), generator=generator).to(x_norm.device)
    if target is None:
        reads = writes = x_norm[order] - sae.b_pre
        massive = torch.zeros_like(order, dtype=torch.bool) if sink_rows is None else sink_rows.to(order.device)[order]
    else:
        reads, writes = x_norm[order] - (0.0 if centre is None else centre), target[order] - sae.b_pre
        massive = massive_rows(writes[:, own])
    first = torch.argsort((~massive).to(torch.int8), stable=True)  # the sinks first, each part in the draw's order
    return reads[first], writes[first], massive[first]


def _start_at_pairs(
    sae: TopKSAE, latents: slice, reads: torch.Tensor, writes: torch.Tensor, massive: torch.Tensor
) -> SinkLatents:
    """The latents' first rows set to the unit directions of the distinct pairs (reads within
    the ladder's bounds of an earlier one skipped: spread_rows); returns those started at a massive target."""
    read_norms = reads.norm(dim=1, keepdim=True).clamp_min(1e-12)
    ladder = TRANSCODER_DISTINCT_COS if sae.cfg.transcoder else SAE_DISTINCT_COS
    kept = spread_rows(reads / read_norms, latents.stop - latents.start, ladder)
    writes = writes[kept]
    write_norms = writes.norm(dim=1, keepdim=True).clamp_min(1e-12)
    rows = slice(latents.start, latents.start + len(kept))
    sae.W_dec[rows] = writes / write_norms
    sae.W_enc[rows] = reads[kept] / read_norms[kept]
    sink = massive[kept]
    positions = torch.nonzero(sink).flatten()
    return SinkLatents(positions + latents.start, read_norms[kept][sink, 0], write_norms[sink, 0])


@torch.no_grad()
def size_sink_latents(sae: TopKSAE, sinks: SinkLatents) -> None:
    """Sizes each sink latent so that on its own pair's input its code is half its target's norm:
    the encoder row's norm set to |y - b_pre| / |x - centre| (its bias scaled with it), then its bias
    lowered by SINK_GATE x that code, so that it stays silent on rows projecting less than half as far.

    Why: an attention sink's MLP output is hundreds of times an ordinary row's (SmolLM2's MLP 11:
    norm up to 24,000 against a median of 29, 99.7% of the output's variance). At the least-squares
    scale a latent started at such a pair needs a code that sign steps take thousands of steps to
    reach, so the sink rows went unpredicted (one-layer transcoder FVU 0.52 at layer 11 after 200k
    tokens, against 0.011 sized; docs/dictionaries.md). Ordinary rows, unlike a sink's, project far
    below the gate. An SAE standardises each row, so its sinks (SmolLM2's residual stream: a few
    identical rows at 38-171x the median norm, 76-98% of the raw variance) weigh in training as any
    row does, but their error, scaled back, decides its plain nMSE: at batches of 16384 and 100k
    tokens 0.19 at layer 20 without a gated latent of their own, 0.06 with one (docs/method.md). An
    SAE without an encoder bias cannot gate them: its sink latents stay ordinary data rows."""
    if not len(sinks.latents) or sae.b_enc is None:
        return
    i = sinks.latents
    factor = sinks.writes / sinks.reads / sae.W_enc[i].norm(dim=1).clamp_min(1e-12)
    sae.W_enc[i] *= factor[:, None]
    sae.b_enc[i] *= factor
    sae.b_enc[i] -= SINK_GATE * sinks.writes


def spread_rows(unit_rows: torch.Tensor, most: int, ladder: Sequence[float], block: int = 2048) -> torch.Tensor:
    """The positions of up to `most` unit rows, as spread as the rows allow: the distinct_rows below
    the ladder's first cosine bound, then, while fewer than `most` are kept, those of the remaining
    rows below the next bound to every row kept, and so on.

    Why a ladder: one bound either leaves latents without a row (at cosine 0.5 SmolLM2's layer 12
    holds 2,546 such rows of 32,768 for 4,096 latents, and the random rest died: 37% dead) or lets
    the rows crowd the directions frequent features share (the steep planted regime at 0.7: 55% dead,
    nMSE 0.0388 against 0.0300 from the ladder; docs/method.md)."""
    kept = torch.zeros(0, dtype=torch.long, device=unit_rows.device)
    for max_cos in ladder:
        kept = distinct_rows(unit_rows, most, max_cos, block, kept)
        if len(kept) == most:
            break
    return kept


def distinct_rows(
    unit_rows: torch.Tensor, most: int, max_cos: float, block: int = 2048, kept: torch.Tensor | None = None
) -> torch.Tensor:
    """The positions of up to `most` of the unit rows, greedily in their order, each below `max_cos`
    cosine to every row kept before it. Within a block a row goes when any earlier row of the block
    that is far enough from the rows kept before the block is too close, kept or not: a few more rows
    dropped than a one-by-one pass drops, for matrix products. Rows in `kept` (positions kept
    already) count as kept before every block: at cosine 1 to themselves, they are not taken again."""
    if kept is None:
        kept = torch.zeros(0, dtype=torch.long, device=unit_rows.device)
    for start in range(0, len(unit_rows), block):
        here = torch.arange(start, min(start + block, len(unit_rows)), device=unit_rows.device)
        if len(kept):
            here = here[(unit_rows[here] @ unit_rows[kept].T).amax(1) < max_cos]
        rows = unit_rows[here]
        here = here[~((rows @ rows.T).tril(-1) >= max_cos).any(1)]
        kept = torch.cat([kept, here])[:most]
        if len(kept) == most:
            break
    return kept


@torch.no_grad()
def encoder_step_scale(sae: TopKSAE, place: Placement) -> float:
    """The factor on the encoder's sign step under decoder_init "data": min(1, the mean norm of its
    rows over the whole SAE), so that a step moves the encoder by no larger a fraction of its norm
    than it moves the unit decoder rows.

    Why: the least-squares scale leaves data-initialised encoder rows at ~0.06-0.08 norm (k rows
    aligned with the input overshoot it), whose coordinates are a sixth of the lr: the first full
    sign step replaced the encoder and killed 18% of the latents on SmolLM2 at batches of 16384, and
    a quarter of the lr still 18%. Scaled, 0.2-0.6% die (docs/method.md). Fixed at the init's
    scale, the encoder cannot grow in longer runs; uncapped, its growth compounds (40% dead after
    400 steps)."""
    norm_sum = place.sum_over_shards(sae.W_enc.float().norm(dim=1).sum())
    return min(1.0, norm_sum.item() / place.n_latents)  # the placement's n_latents: the whole SAE's


def _unit_scales(rows: torch.Tensor, cfg: SAEConfig) -> torch.Tensor:
    """The scalar s with E||s x||^2 = d on the rows; one per layer for a cross-layer transcoder."""
    if not cfg.cross_layer:
        return torch.tensor(math.sqrt(cfg.d_in / rows.float().pow(2).sum(-1).mean().item()))
    per_layer = rows.float().unflatten(-1, (cfg.layers(), cfg.d_in)).pow(2).sum(-1).mean(0)
    return (cfg.d_in / per_layer.double()).sqrt()


def target_scales(targets: torch.Tensor, cfg: SAEConfig) -> torch.Tensor:
    """A transcoder's target scale: the geometric mean of the unit scale of all rows and that of the
    rows that are not massive (attention sinks' MLP outputs), per layer; the unit scale where none is.

    Where nine sink rows hold 99.7% of the variance (SmolLM2's MLP 11) the unit scale shrinks the
    other rows to 1/27 of unit norm: steps sized for unit data then move their latents too far, and
    half of a cross-layer transcoder's layer-11 block died by 200k tokens. Scaled by the other rows
    alone, each sink row is ~800x a unit row and predicted less exactly, compounding when spliced.
    The geometric mean keeps most of both: dead 13.3% -> 2.1%, dCE 0.084 -> 0.057 at 200k, layer
    10's FVU 0.104 -> 0.115 (cross_layer_quality.py; docs/dictionaries.md).
    """
    layers = targets.unflatten(-1, (cfg.layers(), cfg.d_in)) if cfg.cross_layer else targets[:, None]
    units = _unit_scales(targets, cfg).double().reshape(-1)
    # the typical rows' unit scale is unit / share, so the geometric mean is unit / sqrt(share)
    shares = [typical_share(y) for y in layers.unbind(1)]
    out = torch.tensor([u.item() / math.sqrt(share) for u, share in zip(units, shares)], dtype=torch.float64)
    return out if cfg.cross_layer else out[0]


@torch.no_grad()
def scale_encoder_least_squares(sae: TopKSAE, x_norm: torch.Tensor, target: torch.Tensor | None = None) -> float:
    """Scales the tied encoder by the c minimising sum ||x - b_pre - c * D^T z(x)||^2 on the sample
    (a transcoder's target y for x; its encoder bias is scaled with it).

    With encoder rows equal to the unit decoder rows, each of the k kept latents reads its full
    projection on the input, and the k decoder rows add up to a reconstruction whose norm is about
    (1 + k * 2 ln(n/k) / d) times the input's, largely in wrong directions: the first steps then
    reconstruct worse than predicting b_pre, and Adam spends a short run shrinking the encoder. The
    selection is invariant to c > 0 (no bias yet, or one scaled with the encoder), so the
    least-squares c is exact and closed-form.
    """
    dot = norm2 = 0.0
    rows = max(1, min(4096, 2**28 // sae.cfg.n_latents))  # a (rows x n_latents) float32 matmul: at most 1 GiB
    residual = (x_norm if target is None else target) - sae.b_pre
    for x_in, want in zip(sae.encoder_input(x_norm).split(rows), residual.split(rows)):
        values, indices, _, _ = sae.select(x_in, sae.cfg.k)
        recon = sparse_decode(values, indices, sae.W_dec)
        dot += (want * recon).sum().item()
        norm2 += recon.pow(2).sum().item()
    c = min(max(dot / max(norm2, 1e-30), 1e-3), 1.0)
    sae.W_enc.mul_(c)
    if sae.cfg.transcoder and sae.b_enc is not None:
        sae.b_enc.mul_(c)
    return c


@torch.no_grad()
def project_decoder_grad(sae: TopKSAE) -> None:
    """Removes from each decoder row's gradient its component along the row (§A.1, unit norm)."""
    if sae.W_dec.grad is None:
        return
    project_rows_(sae.W_dec.grad, sae.W_dec)


@torch.no_grad()
def renormalize_decoder(sae: TopKSAE) -> None:
    sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def fold_decoder_norms(sae: TopKSAE) -> None:
    """Unit decoder rows, each row's norm multiplied into its encoder row (and encoder bias)."""
    norms = sae.W_dec.norm(dim=1).clamp_min(1e-12)
    sae.W_dec.div_(norms[:, None])
    sae.W_enc.mul_(norms[:, None])
    if sae.b_enc is not None:
        sae.b_enc.mul_(norms)


def make_optimizer(sae: TopKSAE, tcfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    if tcfg.resolved_optimizer() == "signum":
        # under decoder_init "data" the encoder's step follows its scale (encoder_step_scale, set by Trainer.step)
        own = ("W_enc", "b_enc") if tcfg.resolved_decoder_init(sae.cfg) == "data" else ()
        rest = [p for name, p in sae.named_parameters() if name not in ("W_dec", "W_skip", *own)]
        # the optimizer projects the decoder gradient in its own pass, unless clipping must see it first
        decoder = {"params": [sae.W_dec], "unit_rows": True, "project_rows": not tcfg.grad_clip}
        groups = [decoder, {"params": rest}]
        if own:
            encoder = [p for name, p in sae.named_parameters() if name in own]
            groups.append({"params": encoder, "lr_scale": 1.0, "encoder": True})
        if sae.W_skip is not None:  # its lr scales are set from the data (skip_lr_scale) by Trainer.initialize
            layers = sae.cfg.layers()
            groups.append(
                {"params": [sae.W_skip], **({"block_lr_scales": [1.0] * layers} if layers > 1 else {"lr_scale": 1.0})}
            )
        return ScheduleFreeSignSGD(groups, lr=lr, momentum=tcfg.momentum, triton=tcfg.triton)
    # fused: one kernel per step for all parameters (CPU and CUDA), same update rule
    return torch.optim.Adam(sae.parameters(), lr=lr, betas=tcfg.betas, eps=tcfg.eps, fused=True)


MASSIVE_NORM = 10  # a row whose norm exceeds 10x the median is massive (attention sinks), as nMSE* counts them


def skip_lr_scale(targets: torch.Tensor) -> float:
    """What a skip-transcoder's W_skip lr is multiplied by under sign descent: sqrt(E||y||^2 over the
    rows that are not massive / E||y||^2 over all rows), 1 where none is massive.

    A sign step moves W_skip's output by about lr * ||x||_1, whatever the gradient, and the lr is sized
    for the target's dataset scale. Where a few massive rows set that scale (SmolLM2's MLP 11: nine
    attention-sink rows, 99.7% of the variance) the other rows are 1/27 of it, the skip's steps swamp
    them (predicted worse than their mean) and replacing the MLP cost 0.397 nats; at this scale 0.004
    less than exact, and unchanged where no row is massive (docs/dictionaries.md)."""
    return typical_share(targets)


def typical_share(rows: torch.Tensor) -> float:
    """sqrt(E||r||^2 over the rows that are not massive / E||r||^2 over all rows): 1 where none is."""
    norm2 = rows.float().pow(2).sum(-1)
    typical = ~massive_rows(rows)
    return math.sqrt(norm2[typical].mean().item() / max(norm2.mean().item(), 1e-30))


def massive_rows(rows: torch.Tensor) -> torch.Tensor:
    """The rows whose norm is over MASSIVE_NORM x the median."""
    norms = rows.float().norm(dim=-1)
    return norms > MASSIVE_NORM * norms.median()


def lr_factor(tcfg: TrainConfig, tokens_seen: int) -> float:
    """The schedule at the step that starts after `tokens_seen` tokens: linear warmup, then decay
    (to zero at the end of the run, reached by the step after the last one)."""
    warmup, decay = tcfg.warmup_tokens(), tcfg.decay()
    if tokens_seen < warmup:
        return (tokens_seen + tcfg.batch_tokens) / warmup
    if decay == "constant":
        return 1.0
    span = max(tcfg.budget() - warmup, 1)
    progress = min((tokens_seen - warmup) / span, 1.0)
    if decay == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class TrainResult:
    sae: TopKSAE
    tokens: int
    steps: int
    dead_fraction: float  # by the trainer's token counter
    history: list[dict] = field(default_factory=list)


class EagerSteps:
    """Runs each device step as it comes (sae/cuda_graph.StepGraphs replays captured ones instead)."""

    captures = False

    def __init__(self, step: DeviceStep, device: torch.device):
        self.device_step, self.device = step, device

    def __call__(self, batch: torch.Tensor, dead: DeadLatents) -> LossParts:
        return self.device_step(batch.to(self.device, non_blocking=True), dead)

    def reset(self) -> None:
        return None


class Trainer:
    """All state of one training run: SAE, optimizer, dead-latent counters, progress, loss scale.

    The loop consumes no randomness after initialisation, so (state_dict, data cursor = steps) is a
    complete checkpoint: resuming from it reproduces an uninterrupted run bit for bit on CPU.

    `placement` says where the SAE lives: whole in this process (default) or one shard of a grid
    (sae.parallel.GridShard); train.cuda_graph replays the device step as a CUDA graph
    (sae/cuda_graph.py). Both are chosen here, when the trainer is built.
    """

    def __init__(self, sae_cfg: SAEConfig, tcfg: TrainConfig, placement: Placement | None = None):
        if tcfg.tokens is None:
            raise ValueError(
                "TrainConfig.tokens: a trainer needs its token budget (train_sae derives it from the data)"
            )
        if sae_cfg.activation == "jumprelu":
            raise ValueError(
                "activation jumprelu: saeflow trains topk and batchtopk SAEs (jumprelu is for dictionaries "
                "imported from SAELens): use activation topk"
            )
        self.tcfg, self.whole_cfg = tcfg, sae_cfg
        self.place = placement or OneProcess(sae_cfg)
        self.device = torch.device(tcfg.device)
        self.bf16 = tcfg.bf16()
        if tcfg.fused_topk and (problems := fused_topk_blockers(tcfg.device, tcfg.precision, tcfg.triton, sae_cfg.k)):
            raise ValueError(f"train.fused_topk: not with {'; '.join(problems)}: set it to false")
        self.kernels = kernels.KernelChoice(tcfg.triton, tcfg.fused_topk)
        if tcfg.multi_topk and sae_cfg.cross_layer:
            raise ValueError("train.multi_topk: a cross-layer transcoder keeps k / L per layer: set it to false")
        self.sae = self.place.part(self._seeded_sae())
        lr = tcfg.lr_for(sae_cfg)
        self.opt = make_optimizer(self.sae, tcfg, lr)
        self.base_lr = lr
        self.encoder_lr_ratio = tcfg.encoder_lr_ratio(sae_cfg)
        self.tracker = DeadLatentTracker(
            torch.zeros(self.sae.cfg.n_latents, dtype=torch.long, device=self.device),
            tcfg.dead_window(sae_cfg.n_latents, sae_cfg.k, sae_cfg.transcoder),
            tcfg.fire_threshold,
        )
        if tcfg.matryoshka_ramp and not sae_cfg.matryoshka:
            raise ValueError("train.matryoshka_ramp: only for a Matryoshka SAE (sae.matryoshka: [groups]): set it to 0")
        self.open_latents: int | None = None  # a Matryoshka ramp's open latents this step (None: all)
        self.resampling = tcfg.resolved_resample_dead(sae_cfg)
        if self.resampling and self.sae.cfg.n_latents != sae_cfg.n_latents:
            raise ValueError("train.resample_dead: not with latent shards (a restart draws rows for all latents)")
        self.ema = {n: torch.zeros_like(p) for n, p in self.sae.named_parameters()} if tcfg.ema_decay else {}
        self.mse_scale = 1.0
        self.sinks = NO_SINK_ROWS  # an SAE's sink latents and rows, from initialize
        self.steps = 0
        self.tokens = 0
        self.history: list[dict] = []
        self.milestones: list[dict] = []  # held-out metrics at token milestones (train_saes' evaluate)
        # set on the device at every step, read (a host sync) only at log and checkpoint time
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self.checked_steps = 0
        self.runner = self._runner()

    def _seeded_sae(self) -> TopKSAE:
        """The whole SAE at its seeded random initialisation, on the device."""
        return TopKSAE(self.whole_cfg, generator=torch.Generator().manual_seed(self.tcfg.seed)).to(self.device)

    def _runner(self) -> EagerSteps | StepGraphs:
        t = self.tcfg
        wanted = graphs_by_default(self.whole_cfg, t, self.place.processes) if t.cuda_graph is None else t.cuda_graph
        if not wanted:
            return EagerSteps(self.device_step, self.device)
        problems = cuda_graph_blockers(
            t.device, t.resolved_optimizer(), self.sae.cfg.activation, self.place.processes, t.fused_topk, t.triton
        )
        if not problems and not (isinstance(self.opt, ScheduleFreeSignSGD) and self.opt.reads_lr_on_device()):
            problems.append(
                "the optimizer's foreach form (no Triton, or a cross-layer skip's per-layer lr: the one-pass "
                "kernel is what reads the lr on the device)"
            )
        if t.matryoshka_ramp:
            problems.append("matryoshka_ramp (the selection widens during the run)")
        if problems and t.cuda_graph is None:
            return EagerSteps(self.device_step, self.device)
        if problems:
            raise ValueError(f"train.cuda_graph: not with {'; '.join(problems)}: set it to false")
        return StepGraphs(self.device_step, lambda: self.opt.zero_grad(set_to_none=True), self.device)

    def initialize(self, sample: torch.Tensor) -> None:
        """The data-dependent initialisation, on the whole SAE (on a grid, identical on every rank)."""
        sample = sample[: self.tcfg.geometric_median_samples].to(self.device)
        whole = self.sae if self.place.processes == 1 else self._seeded_sae()
        from_data = self.tcfg.resolved_decoder_init(self.whole_cfg) == "data"
        rows_from = torch.Generator().manual_seed(self.tcfg.seed) if from_data else None
        self.mse_scale, self.sinks = init_from_sample(
            whole, sample, scale_encoder=self.tcfg.scaled_encoder_init(), decoder_rows_from=rows_from
        )
        targets = whole.split(sample)[1]
        for group in self.opt.param_groups:  # a skip-transcoder's W_skip (make_optimizer)
            if "lr_scale" in group and not group.get("encoder"):  # (the encoder's is set each step)
                group["lr_scale"] = skip_lr_scale(targets)
            if "block_lr_scales" in group:  # a cross-layer one's: each layer's block by its own targets
                group["block_lr_scales"] = [skip_lr_scale(y) for y in targets.chunk(len(group["block_lr_scales"]), -1)]
        if whole is not self.sae:
            self.sae.load_state_dict(self.place.part(whole).state_dict())

    @property
    def done(self) -> bool:
        return self.tokens >= self.tcfg.budget()

    def step(self, batch: torch.Tensor) -> LossParts:
        for group in self.opt.param_groups:
            if group.get("encoder"):
                group["lr_scale"] = encoder_step_scale(self.sae, self.place) * self.encoder_lr_ratio
            group["lr"] = self.base_lr * lr_factor(self.tcfg, self.tokens) * group.get("lr_scale", 1.0)
        if self.tcfg.matryoshka_ramp:
            self.open_latents = matryoshka_open(
                self.sae.cfg.prefix_ends(), self.tcfg.matryoshka_ramp, self.tokens / self.tcfg.budget()
            )
        if isinstance(self.opt, ScheduleFreeSignSGD):
            self.opt.prepare()  # the host half of the optimizer step (device_step applies it)
        with torch.enable_grad():  # also when the caller holds torch.no_grad() (as around an evaluation)
            parts = self.runner(batch, self.dead_latents())
        self.tokens += self.rows(batch)
        self.steps += 1
        if self.resampling and resample_due(self.steps):
            self.resample(batch)
        return parts

    @torch.no_grad()
    def resample(self, batch: torch.Tensor) -> None:
        """The dead latents restarted at pairs of this step's batch (sae/resample.py): every rank of a
        data-parallel grid draws from the whole batch with one generator, seeded by the step, so the
        rows agree across ranks and a resumed run draws what an uninterrupted one drew."""
        dead = self.tracker.dead_mask()
        if not bool(dead.any()):
            return
        x, y = self.sae.split(batch.to(self.device))
        x_norm = self.place.rows_over_data(self.sae.normalize(x)[0])
        target = self.place.rows_over_data(self.sae.normalize_target(y)[0]) if self.sae.cfg.transcoder else x_norm
        drawn = torch.Generator().manual_seed(self.tcfg.seed * 1_000_003 + self.steps)
        self.restart(restarts_for(self.sae, x_norm, target, dead, drawn))

    @torch.no_grad()
    def restart(self, new: Restarts) -> None:
        """The latents' rows set to `new` in the weights, the optimizer's state and the EMA, and their
        dead-latent counters reset."""
        rows = new.latents
        for name, value in (("W_enc", new.W_enc), ("b_enc", new.b_enc), ("W_dec", new.W_dec)):
            param = getattr(self.sae, name)
            if param is None:
                continue
            param[rows] = value
            if isinstance(self.opt, ScheduleFreeSignSGD):
                self.opt.restart_rows(param, rows)
            if self.ema:  # its bias-corrected value starts at the new rows
                self.ema[name][rows] = value * (1 - (self.tcfg.ema_decay or 0.0) ** self.steps)
        self.tracker.tokens_since_fired[rows] = 0

    def rows(self, batch: torch.Tensor) -> int:
        """Tokens a step on `batch` trains on: the global batch on a data-parallel grid."""
        return batch.shape[0] * self.place.replicas

    def dead_latents(self) -> DeadLatents:
        """The dead latents for this step's AuxK.

        Counting them is one host sync per step (sparsify's step takes one too). It pays: AuxK over
        few dead latents multiplies their rows alone, and none is run while none is dead. A CUDA
        graph replays one of two fixed shapes instead: no AuxK, or AuxK over the mask."""
        if self.tokens < self.tracker.dead_tokens:  # no latent can be dead yet
            return NO_DEAD
        mask = self.tracker.dead_mask()
        if self.runner.captures:
            return DeadLatents(AuxMode.MASKED, mask) if bool(mask.any()) else NO_DEAD
        here, everywhere = self.place.count_dead(mask)
        return DeadLatents(AuxMode.DEAD_ROWS, mask, here, everywhere) if everywhere else NO_DEAD

    def dead_count(self) -> int:
        """How many latents of the whole SAE this step's AuxK counts as dead."""
        return self.dead_latents().everywhere

    def device_step(self, batch: torch.Tensor, dead: DeadLatents) -> LossParts:
        """One training step's device work on a batch already on the device: no host sync and no
        host state changed, so that sae/cuda_graph.py can capture it (the optimizer's host half,
        `prepare`, runs in `step` before it)."""
        sae, tcfg = self.sae, self.tcfg
        x, y = sae.split(batch)
        x_norm, _ = sae.normalize(x)
        target = sae.normalize_target(y)[0] if sae.cfg.transcoder else None
        # autocast's cache of cast weights would outlive a captured graph's memory: off when graphed
        with (
            torch.autocast(
                self.device.type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=not self.runner.captures
            ),
            kernels.using(self.kernels),
        ):
            parts = sae_loss(sae, x_norm, self.mse_scale, tcfg, dead, self.place, target, self.open_latents)
        self.nonfinite |= ~torch.isfinite(parts.loss.detach())
        self.opt.zero_grad(set_to_none=True)
        parts.loss.backward()
        sae.restrict_decoder_grad()
        self.place.average_gradients(sae)
        if not self.opt.param_groups[0].get("project_rows"):  # else the optimizer's step does it
            project_decoder_grad(sae)
        if tcfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), tcfg.grad_clip)
        if isinstance(self.opt, ScheduleFreeSignSGD):
            self.opt.apply()
        else:
            self.opt.step()
            renormalize_decoder(sae)  # schedule-free keeps z's rows at unit norm; y and x are its mixtures
        self.tracker.update(parts.values, parts.indices, self.rows(batch), self.place.sum_over_data)
        if self.open_latents is not None:  # latents not yet open are not dead: AuxK leaves them be
            self.tracker.tokens_since_fired[self.open_latents :] = 0
        if sae.cfg.activation == "batchtopk":
            self._update_threshold(parts.values)
        if self.ema:
            with torch.no_grad():
                for name, p in sae.named_parameters():
                    self.ema[name].lerp_(p, 1 - (tcfg.ema_decay or 0.0))
        return parts

    @torch.no_grad()
    def _update_threshold(self, kept: torch.Tensor) -> None:
        """Moving average (0.9: it follows the drift of training) of the smallest positive activation
        BatchTopK kept in each batch (of the global batch, the same on every rank); inference keeps
        what exceeds it."""
        smallest = self.place.min_over_all(torch.where(kept > 0, kept, torch.inf).min())  # inf: nothing kept
        t = self.sae.threshold
        moved = torch.where(t == 0, smallest, 0.9 * t + 0.1 * smallest)
        t.copy_(torch.where(smallest.isfinite(), moved, t))

    @torch.no_grad()
    def _copy_with(self, weight: Callable[[str], torch.Tensor]) -> TopKSAE:
        """A copy of the SAE whose parameters are weight(name), computed one at a time (at most one
        parameter's temporary beside the copy: the end of a run is no memory peak)."""
        with torch.device(self.device):
            out = TopKSAE(self.sae.cfg, fill=False)
        out.load_state_dict(self.sae.state_dict())
        for name, p in out.named_parameters():
            p.copy_(weight(name))
        return out

    def check_finite(self) -> None:
        """Raises NonFiniteLoss if any loss since the last check was NaN or infinite."""
        if bool(self.nonfinite):
            lr = self.base_lr
            raise NonFiniteLoss(
                f"the training loss became non-finite between steps {self.checked_steps} and {self.steps} (lr {lr:g}): "
                "the run stopped and keeps only its last finite checkpoint; lower train.lr (or leave it at auto)"
            )
        self.checked_steps = self.steps

    def ema_sae(self) -> TopKSAE:
        """A copy of the SAE holding the bias-corrected EMA of the weights (ema / (1 - decay^steps))."""
        correction = 1 - (self.tcfg.ema_decay or 0.0) ** self.steps
        return self._copy_with(lambda name: self.ema[name] / correction)

    @torch.no_grad()
    def averaged_sae(self) -> TopKSAE:
        """Schedule-free: a copy holding the averaged weights x, decoder rows back at unit norm (each
        row's norm moved into its encoder row: a latent's contribution is unchanged)."""
        opt = self.opt
        if not isinstance(opt, ScheduleFreeSignSGD):
            raise ValueError("averaged weights come from the schedule-free optimizer; this run uses Adam")
        params = dict(self.sae.named_parameters())
        out = self._copy_with(lambda name: opt.averaged(params[name]))
        fold_decoder_norms(out)
        return out

    def final_sae(self) -> TopKSAE:
        """The trained SAE, a copy: the EMA or averaged weights (else the weights as they are), its
        sink latents refit (sae.sinks) where this process holds every latent (a latent-sharded
        grid refits the gathered SAE: finish)."""
        if self.ema:
            out = self.ema_sae()
        elif isinstance(self.opt, ScheduleFreeSignSGD):
            out = self.averaged_sae()
        else:
            params = dict(self.sae.named_parameters())
            out = self._copy_with(lambda name: params[name])
        if self.sae.cfg.n_latents == self.whole_cfg.n_latents:
            self.finish(out)
        return out.cpu()

    def finish(self, whole: TopKSAE) -> None:
        """In place, on the whole SAE: the last step of a run (its sink latents' decoder rows by
        least squares on the sample's sink rows)."""
        refit_sink_decoders(whole, self.sinks)

    def log(self, parts: LossParts) -> None:
        self.history.append(
            {
                "step": self.steps,
                "tokens": self.tokens,
                "loss": parts.loss.item(),
                "mse": parts.mse.item(),
                "aux": parts.aux.item(),
                "dead_fraction": self.dead_fraction(),
            }
        )

    def dead_fraction(self) -> float:
        return self.tracker.dead_mask().float().mean().item()

    # checkpoints: tensors (for safetensors) and plain JSON-able metadata ---------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"sae.{k}": v for k, v in self.sae.state_dict().items()}
        opt = self.opt.state_dict()
        for i, state in opt["state"].items():
            for key, value in state.items():
                tensors[f"opt.{i}.{key}"] = torch.as_tensor(value)
        tensors["tracker.tokens_since_fired"] = self.tracker.tokens_since_fired
        tensors.update({f"ema.{k}": v for k, v in self.ema.items()})
        tensors.update({"sinks.latents": self.sinks.latents, "sinks.rows": self.sinks.rows})
        meta = {
            "steps": self.steps,
            "tokens": self.tokens,
            "mse_scale": self.mse_scale,
            "history": self.history,
            "milestones": self.milestones,
            "opt_param_groups": opt["param_groups"],
        }
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, i, name = key.split(".", 2)
                state.setdefault(int(i), {})[name] = value.to(self.device) if name != "step" else value
        saved, here = len(meta["opt_param_groups"]), len(self.opt.param_groups)
        if saved != here:  # torch's own message names neither cause nor fix
            raise ValueError(
                f"checkpoint: its optimizer has {saved} parameter groups, this trainer's {here}: it was saved "
                "under other training settings (an SAE or a one-layer transcoder from before its sample-row init: "
                "resume it with TrainConfig(decoder_init='random'))"
            )
        self.opt.load_state_dict({"state": state, "param_groups": meta["opt_param_groups"]})
        self.tracker.tokens_since_fired = tensors["tracker.tokens_since_fired"].to(self.device)
        for name in self.ema:
            self.ema[name] = tensors[f"ema.{name}"].to(self.device)
        if "sinks.latents" in tensors:  # checkpoints from before the sink refit have none: no refit
            self.sinks = SinkRows(tensors["sinks.latents"], tensors["sinks.rows"])
        self.steps, self.tokens = meta["steps"], meta["tokens"]
        self.mse_scale, self.history = meta["mse_scale"], list(meta["history"])
        self.milestones = list(meta.get("milestones", []))
        self.runner.reset()  # a captured graph would go on updating the tensors just replaced


def milestone_tokens(tokens: int, count: int, batch_tokens: int) -> list[int]:
    """tokens / 2^count, ..., tokens / 4, tokens / 2 (at least one batch, each once): where a sweep
    measures its SAEs during training, for loss-vs-tokens curves and the compute frontier (§3)."""
    return sorted({max(batch_tokens, tokens >> i) for i in range(1, count + 1)} - {tokens})


def train_saes(
    trainers: list[Trainer],
    batches: Iterable[torch.Tensor],
    progress: bool = True,
    checkpoint: Callable[[list[Trainer]], None] | None = None,
    checkpoint_every_tokens: int = 0,
    milestones: Sequence[int] = (),
    evaluate: Callable[[TopKSAE], dict] | None = None,
    checkpoint_at_tokens: Sequence[int] = (),
    stop: Callable[[], bool] | None = None,
) -> list[TrainResult]:
    """Trains several SAEs from one pass over the data: every batch is fed to every trainer.

    The trainers must share the token budget and be at the same cursor (new, or restored from
    checkpoints taken together); `batches` must start at that cursor. `checkpoint(trainers)` is
    called every `checkpoint_every_tokens` tokens, and when the run reaches each of
    `checkpoint_at_tokens`; when `stop()` turns true, the run checkpoints and raises Stopped. When
    the run passes each of `milestones` (tokens), `evaluate(sae)` scores each trainer's SAE as it
    stands (the one it would return) and the result joins its `milestones` (kept in checkpoints). A
    stream that ends before the budget ends the run there with a warning: the SAEs trained so far
    are returned, not lost.
    """
    lead = trainers[0]
    if any(t.tcfg.tokens != lead.tcfg.tokens or t.steps != lead.steps for t in trainers):
        raise ValueError("trainers fed from one pass must share tokens and cursor")
    bar = tqdm(
        total=lead.tcfg.tokens, initial=lead.tokens, unit="tok", unit_scale=True, desc="train", disable=not progress
    )
    next_checkpoint = lead.tokens + checkpoint_every_tokens
    also = [t for t in sorted(checkpoint_at_tokens) if t > lead.tokens]
    pending = [m for m in sorted(milestones) if m > lead.tokens] if evaluate else []
    for batch in batches:
        if lead.done:
            break
        for trainer in trainers:
            parts = trainer.step(batch)
            if trainer.steps % trainer.tcfg.log_every == 0 or trainer.done:
                trainer.check_finite()
                trainer.log(parts)
        if pending and evaluate is not None and lead.tokens >= pending[0] and not lead.done:
            while pending and lead.tokens >= pending[0]:
                pending.pop(0)
            for trainer in trainers:
                trainer.check_finite()
                trainer.milestones.append({"tokens": trainer.tokens, **evaluate(trainer.final_sae())})
        bar.update(batch.shape[0])
        if lead.history:
            bar.set_postfix(mse=" ".join(f"{t.history[-1]['mse']:.4f}" for t in trainers if t.history))
        due = (checkpoint_every_tokens and lead.tokens >= next_checkpoint) or (also and lead.tokens >= also[0])
        stopping = stop is not None and stop() and not lead.done
        if checkpoint and (due or stopping) and not lead.done:
            for trainer in trainers:
                trainer.check_finite()
            checkpoint(trainers)
            next_checkpoint = lead.tokens + checkpoint_every_tokens
            while also and lead.tokens >= also[0]:
                also.pop(0)
        if stopping:
            bar.close()
            raise Stopped(f"stopped at step {lead.steps}" + (" (checkpointed there)" if checkpoint else ""))
    bar.close()
    for trainer in trainers:
        trainer.check_finite()
    if not lead.done:
        warnings.warn(
            f"the activations ran out after {lead.tokens:,} of {lead.tcfg.tokens:,} tokens: training "
            "stopped there (the learning rate had not decayed to its end); pass tokens= to match the data",
            stacklevel=2,
        )
    return [TrainResult(t.final_sae(), t.tokens, t.steps, t.dead_fraction(), t.history) for t in trainers]


def paired(data: Activations, target: Activations) -> torch.Tensor:
    """[input | target] rows of a transcoder's two arrays (held in memory, float32)."""
    x, n_x = open_activations(data)
    y, n_y = open_activations(target)
    if not isinstance(x, (torch.Tensor, np.ndarray)) or not isinstance(y, (torch.Tensor, np.ndarray)):
        raise ValueError("target=: give the inputs and targets as arrays (an iterable yields [input | target] rows)")
    if n_x != n_y:
        raise ValueError(f"target= has {n_y} rows, data has {n_x}: give one target row per input row")

    def tensor(a: torch.Tensor | np.ndarray) -> torch.Tensor:
        return (a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))).float()

    return torch.cat([tensor(x), tensor(y)], dim=1)


def train_sae(
    sae_cfg: SAEConfig,
    tcfg: TrainConfig,
    data: Activations,
    sample: torch.Tensor | None = None,
    progress: bool = True,
    trainer: Trainer | None = None,
    checkpoint: Callable[[Trainer], None] | None = None,
    checkpoint_every_tokens: int = 0,
    milestones: Sequence[int] = (),
    evaluate: Callable[[TopKSAE], dict] | None = None,
    target: Activations | None = None,
) -> TrainResult:
    """Trains one SAE on activations a user has: a (rows, d) tensor or array, a .npy file, or an
    iterable of (batch, d) tensors. A transcoder (sae_cfg.transcoder) trains on `data`, the MLP's
    inputs, and `target`, its outputs row for row (or on an iterable of [input | output] batches).

        from sae import SAEConfig, TrainConfig, train_sae
        result = train_sae(SAEConfig(d_in=768, n_latents=16384, k=32), TrainConfig(), acts)
        result.sae.save("my-sae")

    tokens=None trains one pass over an array (several passes when tokens exceeds its rows); an
    iterable needs tokens. The initialisation sample is `sample`, or else the head of the data.
    `trainer` resumes a run restored from a checkpoint (data must then start at its cursor).
    `evaluate(sae)` scores the SAE as it stands once the run passes each of `milestones` (tokens), as
    train_saes does.
    """
    rows, length = open_activations(data if target is None else paired(data, target))
    if sae_cfg.transcoder and target is None and isinstance(rows, (torch.Tensor, np.ndarray)):
        if rows.shape[1] != 2 * sae_cfg.width():
            raise ValueError("train_sae: a transcoder needs target= (the MLP's outputs, row for row with data)")
    if tcfg.tokens is None:
        if length is None:
            raise ValueError("TrainConfig.tokens: an iterable of batches has no known length; give tokens=...")
        tcfg = tcfg.with_tokens(length)
    passes = -(-tcfg.budget() // length) if length else None
    batches = iter(batch_stream(rows, tcfg.batch_tokens, passes))
    if trainer is None:
        trainer = Trainer(sae_cfg, tcfg)
        if sample is None:
            sample, batches = head_sample(batches, tcfg.geometric_median_samples)
        trainer.initialize(sample)
    single = (lambda ts: checkpoint(ts[0])) if checkpoint else None
    return train_saes(
        [trainer], batches, progress, single, checkpoint_every_tokens, milestones=milestones, evaluate=evaluate
    )[0]
