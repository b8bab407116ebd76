"""Training loop for TopK SAEs: the recipe of Gao et al. 2024 (§2.3, §A), one readable loop."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from sae.config import SAEConfig, TrainConfig
from sae.data import Activations, batch_stream, head_sample, open_activations
from sae.geometric_median import geometric_median
from sae.kernels import BatchTopKEncode, mask_indices, ragged_decode, sparse_decode, topk_encode
from sae.model import TopKSAE
from sae.optim import ScheduleFreeSignSGD, project_rows_


class NonFiniteLoss(FloatingPointError):
    """Training diverged: the run stops, and nothing after the last finite loss is saved."""


@dataclass
class LossParts:
    loss: torch.Tensor
    mse: torch.Tensor  # normalised by the constant from `init_from_sample`
    aux: torch.Tensor
    values: torch.Tensor  # (B, k) kept values of the main TopK
    indices: torch.Tensor


@dataclass
class DeadLatentTracker:
    """Tokens since each latent last fired; dead = not fired for `dead_tokens` tokens (§A.2)."""

    tokens_since_fired: torch.Tensor
    dead_tokens: int
    threshold: float

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.dead_tokens

    def update(self, values: torch.Tensor, indices: torch.Tensor, tokens: int | None = None,
               reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """tokens: the batch's size (default: values' rows); reduce sums the hits over the ranks that
        saw the other rows of a data-parallel batch, so that every rank keeps the same counters."""
        # counted with index_add, not boolean indexing: no host sync, so CUDA steps queue back to back
        self.tokens_since_fired += values.shape[0] if tokens is None else tokens
        hits = torch.zeros_like(self.tokens_since_fired).index_add_(
            0, indices.reshape(-1), (values.reshape(-1) > self.threshold).long()
        )
        if reduce is not None:
            hits = reduce(hits)
        self.tokens_since_fired.masked_fill_(hits > 0, 0)


@torch.no_grad()
def init_from_sample(
    sae: TopKSAE, sample: torch.Tensor, use_geometric_median: bool = True, scale_encoder: bool = True
) -> float:
    """Sets the data-dependent constants from a raw sample; returns the MSE scale.

    The MSE scale is 1 / E||x - mean(x)||^2 on the sample, fixed for the whole run: the paper
    normalises the loss once, never per batch.
    """
    if sae.cfg.normalization == "dataset_scale":
        sae.input_scale.fill_(math.sqrt(sae.cfg.d_in / sample.float().pow(2).sum(-1).mean().item()))
    x, _ = sae.normalize(sample)
    if use_geometric_median:
        sae.b_pre.copy_(geometric_median(x))
    if scale_encoder:
        scale_encoder_least_squares(sae, x)
    return 1.0 / (x - x.mean(0)).pow(2).sum(-1).mean().item()


@torch.no_grad()
def scale_encoder_least_squares(sae: TopKSAE, x_norm: torch.Tensor) -> float:
    """Scales the tied encoder by the c minimising sum ||x - b_pre - c * D^T z(x)||^2 on the sample.

    With encoder rows equal to the unit decoder rows, each of the k kept latents reads its full
    projection on the input, and the k decoder rows add up to a reconstruction whose norm is about
    (1 + k * 2 ln(n/k) / d) times the input's, largely in wrong directions: the first steps then
    reconstruct worse than predicting b_pre, and Adam spends a short run shrinking the encoder. The
    selection is invariant to c > 0 (no bias yet), so the least-squares c is exact and closed-form.
    """
    dot = norm2 = 0.0
    rows = max(1, min(4096, 2**28 // sae.cfg.n_latents))  # a (rows x n_latents) float32 matmul: at most 1 GiB
    for x_in in (x_norm - sae.b_pre).split(rows):
        values, indices, _, _ = topk_encode(x_in, sae.W_enc, sae.b_enc, sae.cfg.k)
        recon = sparse_decode(values, indices, sae.W_dec)
        dot += (x_in * recon).sum().item()
        norm2 += recon.pow(2).sum().item()
    c = min(max(dot / max(norm2, 1e-30), 1e-3), 1.0)
    sae.W_enc.mul_(c)
    return c


def sae_loss(
    sae: TopKSAE, x_norm: torch.Tensor, mse_scale: float, tcfg: TrainConfig, dead: torch.Tensor | None,
    n_dead: int | None = None,
) -> LossParts:
    """L(k) [+ L(4k)/8 with multi-TopK] + aux_coef * L_aux, all scaled by the same constant.

    n_dead: how many latents `dead` holds, when the caller counted them (the trainer does): AuxK then
    picks min(aux_k, n_dead) latents among their rows alone. None: aux_k picks over the masked
    pre-activations whatever the count, zero beyond the dead latents: no host sync, and the fixed
    shapes a CUDA graph replays, for the price of a second selection over every latent."""
    if sae.cfg.activation == "batchtopk":
        return _batch_topk_loss(sae, x_norm, mse_scale, tcfg, dead)
    k = sae.cfg.k
    k_wide = min(4 * k, sae.cfg.n_latents) if tcfg.multi_topk else k
    aux_k, aux_latents = 0, None
    if dead is not None and n_dead is None:
        aux_k = min(tcfg.resolved_aux_k(sae.cfg.d_in), sae.cfg.n_latents)
    elif dead is not None and n_dead > 0:
        aux_k, aux_latents = min(tcfg.resolved_aux_k(sae.cfg.d_in), n_dead), mask_indices(dead, n_dead)
    values, indices, aux_values, aux_indices = topk_encode(
        x_norm - sae.b_pre, sae.W_enc, sae.b_enc, k_wide, aux_k, dead, aux_latents
    )

    recon = sparse_decode(values[:, :k], indices[:, :k], sae.W_dec) + sae.b_pre
    mse = _sq_err(x_norm, recon, mse_scale)
    loss = mse
    if k_wide > k:
        loss = loss + _sq_err(x_norm, sparse_decode(values, indices, sae.W_dec) + sae.b_pre, mse_scale) / 8
    aux = torch.zeros((), device=x_norm.device)
    if aux_k > 0:
        # the dead latents learn to predict the live ones' residual error (§A.2)
        aux = _sq_err(x_norm - recon.detach(), sparse_decode(aux_values, aux_indices, sae.W_dec), mse_scale)
        if n_dead is None:  # uncounted: no dead latent, no AuxK term (a device-side choice, no sync)
            aux = torch.where(dead.any(), torch.nan_to_num(aux, nan=0.0), 0.0)
        loss = loss + tcfg.aux_coef * aux
    return LossParts(loss, mse.detach(), aux.detach(), values[:, :k].detach(), indices[:, :k])


def _sq_err(target: torch.Tensor, recon: torch.Tensor, scale: float) -> torch.Tensor:
    return (target - recon).pow(2).sum(-1).mean() * scale


def _batch_topk_loss(sae: TopKSAE, x_norm: torch.Tensor, mse_scale: float, tcfg: TrainConfig, dead) -> LossParts:
    """BatchTopK: k·B latents over the whole batch; AuxK over the dead latents as for TopK."""
    x_in = x_norm - sae.b_pre
    rows, cols, values = BatchTopKEncode.apply(x_in, sae.W_enc, sae.b_enc, sae.cfg.k * x_in.shape[0])
    recon = ragged_decode(rows, cols, values, sae.W_dec, x_norm.shape[0]) + sae.b_pre
    mse = _sq_err(x_norm, recon, mse_scale)
    loss, aux = mse, torch.zeros((), device=x_norm.device)
    dead_idx = dead.nonzero().squeeze(1) if dead is not None else cols.new_zeros(0)
    aux_k = min(tcfg.resolved_aux_k(sae.cfg.d_in), len(dead_idx))
    if aux_k > 0:
        # only the dead rows of the encoder take part: a small matmul
        b = sae.b_enc[dead_idx] if sae.b_enc is not None else None
        aux_values, aux_pos, _, _ = topk_encode(x_in, sae.W_enc[dead_idx], b, aux_k)
        aux = _sq_err(x_norm - recon.detach(), sparse_decode(aux_values, dead_idx[aux_pos], sae.W_dec), mse_scale)
        loss = loss + tcfg.aux_coef * aux
    return LossParts(loss, mse.detach(), aux.detach(), values.detach(), cols)


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
        rest = [p for name, p in sae.named_parameters() if name != "W_dec"]
        # the optimizer projects the decoder gradient in its own pass, unless clipping must see it first
        decoder = {"params": [sae.W_dec], "unit_rows": True, "project_rows": not tcfg.grad_clip}
        return ScheduleFreeSignSGD([decoder, {"params": rest}], lr=lr,
                                   momentum=tcfg.momentum)
    # fused: one kernel per step for all parameters (CPU and CUDA), same update rule
    return torch.optim.Adam(sae.parameters(), lr=lr, betas=tcfg.betas, eps=tcfg.eps, fused=True)


def lr_factor(tcfg: TrainConfig, tokens_seen: int) -> float:
    """The schedule at the step that starts after `tokens_seen` tokens: linear warmup, then decay
    (to zero at the end of the run, reached by the step after the last one)."""
    warmup, decay = tcfg.warmup_tokens(), tcfg.decay()
    if tokens_seen < warmup:
        return (tokens_seen + tcfg.batch_tokens) / warmup
    if decay == "constant":
        return 1.0
    span = max(tcfg.tokens - warmup, 1)
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


class Trainer:
    """All state of one training run: SAE, optimizer, dead-latent counters, progress, loss scale.

    The loop consumes no randomness after initialisation, so (state_dict, data cursor = steps) is a
    complete checkpoint: resuming from it reproduces an uninterrupted run bit for bit on CPU.
    """

    def __init__(self, sae_cfg: SAEConfig, tcfg: TrainConfig):
        if tcfg.tokens is None:
            raise ValueError("TrainConfig.tokens: a trainer needs its token budget (train_sae derives it from the data)")
        self.tcfg = tcfg
        self.device = torch.device(tcfg.device)
        self.bf16 = tcfg.bf16()
        self.sae = TopKSAE(sae_cfg)
        self.sae.reset_parameters(generator=torch.Generator().manual_seed(tcfg.seed))
        self.sae.to(self.device)
        lr = tcfg.resolved_lr(sae_cfg.n_latents)
        self.opt = make_optimizer(self.sae, tcfg, lr)
        self.schedule_free = isinstance(self.opt, ScheduleFreeSignSGD)
        self.base_lr = lr
        self.tracker = DeadLatentTracker(torch.zeros(sae_cfg.n_latents, dtype=torch.long, device=self.device),
                                         tcfg.dead_window(sae_cfg.n_latents, sae_cfg.k), tcfg.fire_threshold)
        self.ema = {n: torch.zeros_like(p) for n, p in self.sae.named_parameters()} if tcfg.ema_decay else {}
        self.mse_scale = 1.0
        self.steps = 0
        self.tokens = 0
        self.history: list[dict] = []
        self.milestones: list[dict] = []  # held-out metrics at token milestones (train_saes' evaluate)
        # set on the device at every step, read (a host sync) only at log and checkpoint time
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self.checked_steps = 0
        # sae.parallel.Parallel when this trainer holds one shard of a distributed run
        self.parallel = None
        # train.cuda_graph: the step captured once per AuxK phase and replayed (sae/cuda_graph.py)
        self.graphs = None
        if tcfg.cuda_graph:
            from sae.cuda_graph import StepGraphs

            self.graphs = StepGraphs(self)

    def initialize(self, sample: torch.Tensor) -> None:
        sample = sample[: self.tcfg.geometric_median_samples].to(self.device)
        self.mse_scale = init_from_sample(self.sae, sample, scale_encoder=self.tcfg.scaled_encoder_init())

    @property
    def done(self) -> bool:
        return self.tokens >= self.tcfg.tokens

    def step(self, batch: torch.Tensor) -> LossParts:
        for group in self.opt.param_groups:
            group["lr"] = self.base_lr * lr_factor(self.tcfg, self.tokens)
        n_dead = self.dead_count()
        if self.graphs is not None:
            self.opt.prepare()  # the host half of the optimizer step; the graph replays the rest
            parts = self.graphs.step(batch, n_dead)
        else:
            parts = self.device_step(batch.to(self.device, non_blocking=True), n_dead)
        self.tokens += self.rows(batch)
        self.steps += 1
        return parts

    def rows(self, batch: torch.Tensor) -> int:
        """Tokens a step on `batch` trains on: the global batch on a data-parallel grid."""
        return batch.shape[0] * (self.parallel.grid.data if self.parallel else 1)

    def dead_count(self) -> int | None:
        """The number of dead latents for this step's AuxK (sae_loss's n_dead); 0 skips AuxK.

        Counting them is one host sync per step (sparsify's step takes one too). It pays: AuxK over
        few dead latents multiplies their rows alone, and none is run while none is dead, where the
        uncounted form selects over every latent again. None: not counted. A grid counts in
        Parallel.loss over every shard; a CUDA graph replays one of two fixed shapes, no AuxK (0) or
        AuxK over the mask (None)."""
        if self.tokens < self.tracker.dead_tokens:  # no latent can be dead yet
            return 0
        if self.parallel is not None:
            return None
        dead = int(self.tracker.dead_mask().sum())
        if self.graphs is not None:
            return None if dead else 0
        return dead

    def device_step(self, batch: torch.Tensor, n_dead: int | None) -> LossParts:
        """One training step's device work on a batch already on the device, AuxK over n_dead dead
        latents (see dead_count): no host sync and no host state changed, so that sae/cuda_graph.py
        can capture it (the optimizer's host half, `prepare`, is then run before each replay)."""
        sae, tcfg = self.sae, self.tcfg
        x_norm, _ = sae.normalize(batch)
        # autocast's cache of cast weights would outlive a captured graph's memory: off when graphed
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16,
                            cache_enabled=self.graphs is None):
            dead = self.tracker.dead_mask() if n_dead != 0 else None
            if self.parallel:
                parts = self.parallel.loss(sae, x_norm, self.mse_scale, tcfg, dead)
            else:
                parts = sae_loss(sae, x_norm, self.mse_scale, tcfg, dead, n_dead)
        self.nonfinite |= ~torch.isfinite(parts.loss.detach())
        self.opt.zero_grad(set_to_none=True)
        parts.loss.backward()
        if self.parallel:
            self.parallel.average_gradients(sae)
        if not self.opt.param_groups[0].get("project_rows"):  # else the optimizer's step does it
            project_decoder_grad(sae)
        if tcfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), tcfg.grad_clip)
        if self.graphs is not None:
            self.opt.apply()
        else:
            self.opt.step()
        if not self.schedule_free:  # schedule-free keeps z's rows at unit norm; y and x are its mixtures
            renormalize_decoder(sae)
        self.tracker.update(parts.values, parts.indices, self.rows(batch),
                            self.parallel.sum_over_data if self.parallel else None)
        if sae.cfg.activation == "batchtopk":
            self._update_threshold(parts.values)
        if self.ema:
            with torch.no_grad():
                for name, p in sae.named_parameters():
                    self.ema[name].lerp_(p, 1 - tcfg.ema_decay)
        return parts

    @torch.no_grad()
    def _update_threshold(self, kept: torch.Tensor) -> None:
        """Moving average (0.9: it follows the drift of training) of the smallest positive activation
        BatchTopK kept in each batch; inference keeps what exceeds it."""
        smallest = torch.where(kept > 0, kept, torch.inf).min()  # inf: nothing positive was kept
        if self.parallel:  # the global batch's smallest, the same on every rank
            smallest = self.parallel.min_over_all(smallest)
        t = self.sae.threshold
        moved = torch.where(t == 0, smallest, 0.9 * t + 0.1 * smallest)
        t.copy_(torch.where(smallest.isfinite(), moved, t))

    @torch.no_grad()
    def _copy_with(self, weight: Callable[[str], torch.Tensor]) -> TopKSAE:
        """A copy of the SAE whose parameters are weight(name), computed one at a time (at most one
        parameter's temporary beside the copy: the end of a run is no memory peak)."""
        out = TopKSAE(self.sae.cfg).to(self.device)
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
                "the run stopped and keeps only its last finite checkpoint; lower train.lr (or leave it at auto)")
        self.checked_steps = self.steps

    def ema_sae(self) -> TopKSAE:
        """A copy of the SAE holding the bias-corrected EMA of the weights (ema / (1 - decay^steps))."""
        correction = 1 - self.tcfg.ema_decay**self.steps
        return self._copy_with(lambda name: self.ema[name] / correction)

    @torch.no_grad()
    def averaged_sae(self) -> TopKSAE:
        """Schedule-free: a copy holding the averaged weights x, decoder rows back at unit norm (each
        row's norm moved into its encoder row: a latent's contribution is unchanged)."""
        params = dict(self.sae.named_parameters())
        out = self._copy_with(lambda name: self.opt.averaged(params[name]))
        fold_decoder_norms(out)
        return out

    def final_sae(self) -> TopKSAE:
        if self.ema:
            return self.ema_sae().cpu()
        return (self.averaged_sae() if self.schedule_free else self.sae).cpu()

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
        self.opt.load_state_dict({"state": state, "param_groups": meta["opt_param_groups"]})
        self.tracker.tokens_since_fired = tensors["tracker.tokens_since_fired"].to(self.device)
        for name in self.ema:
            self.ema[name] = tensors[f"ema.{name}"].to(self.device)
        self.steps, self.tokens = meta["steps"], meta["tokens"]
        self.mse_scale, self.history = meta["mse_scale"], list(meta["history"])
        self.milestones = list(meta.get("milestones", []))
        if self.graphs is not None:  # a captured graph would go on updating the tensors just replaced
            from sae.cuda_graph import StepGraphs

            self.graphs = StepGraphs(self)


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
) -> list[TrainResult]:
    """Trains several SAEs from one pass over the data: every batch is fed to every trainer.

    The trainers must share the token budget and be at the same cursor (new, or restored from
    checkpoints taken together); `batches` must start at that cursor. `checkpoint(trainers)` is
    called every `checkpoint_every_tokens` tokens. When the run passes each of `milestones`
    (tokens), `evaluate(sae)` scores each trainer's SAE as it stands (the one it would return) and
    the result joins its `milestones` (kept in checkpoints). A stream that ends before the budget
    ends the run there with a warning: the SAEs trained so far are returned, not lost.
    """
    lead = trainers[0]
    if any(t.tcfg.tokens != lead.tcfg.tokens or t.steps != lead.steps for t in trainers):
        raise ValueError("trainers fed from one pass must share tokens and cursor")
    bar = tqdm(total=lead.tcfg.tokens, initial=lead.tokens, unit="tok", unit_scale=True, desc="train",
               disable=not progress)
    next_checkpoint = lead.tokens + checkpoint_every_tokens
    pending = [m for m in sorted(milestones) if m > lead.tokens] if evaluate else []
    for batch in batches:
        if lead.done:
            break
        for trainer in trainers:
            parts = trainer.step(batch)
            if trainer.steps % trainer.tcfg.log_every == 0 or trainer.done:
                trainer.check_finite()
                trainer.log(parts)
        if pending and lead.tokens >= pending[0] and not lead.done:
            while pending and lead.tokens >= pending[0]:
                pending.pop(0)
            for trainer in trainers:
                trainer.check_finite()
                trainer.milestones.append({"tokens": trainer.tokens, **evaluate(trainer.final_sae())})
        bar.update(batch.shape[0])
        if lead.history:
            bar.set_postfix(mse=" ".join(f"{t.history[-1]['mse']:.4f}" for t in trainers if t.history))
        if checkpoint and checkpoint_every_tokens and lead.tokens >= next_checkpoint and not lead.done:
            for trainer in trainers:
                trainer.check_finite()
            checkpoint(trainers)
            next_checkpoint = lead.tokens + checkpoint_every_tokens
    bar.close()
    for trainer in trainers:
        trainer.check_finite()
    if not lead.done:
        warnings.warn(f"the activations ran out after {lead.tokens:,} of {lead.tcfg.tokens:,} tokens: training "
                      "stopped there (the learning rate had not decayed to its end); pass tokens= to match the data",
                      stacklevel=2)
    return [TrainResult(t.final_sae(), t.tokens, t.steps, t.dead_fraction(), t.history) for t in trainers]


def train_sae(
    sae_cfg: SAEConfig,
    tcfg: TrainConfig,
    data: Activations,
    sample: torch.Tensor | None = None,
    progress: bool = True,
    trainer: Trainer | None = None,
    checkpoint: Callable[[Trainer], None] | None = None,
    checkpoint_every_tokens: int = 0,
) -> TrainResult:
    """Trains one SAE on activations a user has: a (rows, d) tensor or array, a .npy file, or an
    iterable of (batch, d) tensors.

        from sae import SAEConfig, TrainConfig, train_sae
        result = train_sae(SAEConfig(d_in=768, n_latents=16384, k=32), TrainConfig(), acts)
        result.sae.save("my-sae")

    tokens=None trains one pass over an array (several passes when tokens exceeds its rows); an
    iterable needs tokens. The initialisation sample is `sample`, or else the head of the data.
    `trainer` resumes a run restored from a checkpoint (data must then start at its cursor).
    """
    rows, length = open_activations(data)
    if tcfg.tokens is None:
        if length is None:
            raise ValueError("TrainConfig.tokens: an iterable of batches has no known length; give tokens=...")
        tcfg = tcfg.with_tokens(length)
    passes = -(-tcfg.tokens // length) if length else None
    batches = iter(batch_stream(rows, tcfg.batch_tokens, passes))
    if trainer is None:
        trainer = Trainer(sae_cfg, tcfg)
        if sample is None:
            sample, batches = head_sample(batches, tcfg.geometric_median_samples)
        trainer.initialize(sample)
    single = (lambda ts: checkpoint(ts[0])) if checkpoint else None
    return train_saes([trainer], batches, progress, single, checkpoint_every_tokens)[0]
