"""The training loss of a TopK SAE (Gao et al. 2024, §2.3, §5.3, §A.2), written once.

    L = L(k) [+ L(4k) / 8 with multi-TopK] + aux_coef * L_aux

every term a squared error summed over d, averaged over the batch and multiplied by one constant
fixed at initialisation (1 / E||x - mean(x)||^2 on a sample). L_aux is AuxK: the top aux_k
pre-activations among the dead latents reconstruct the residual the live latents left.

One process holds every latent; a grid of processes holds each SAE's latents in shards
(sae/parallel.py). The loss is the same in both; where the latents are is given to it as hooks
(`Latents`): which of this process's candidates are among the top k of all of them, and the sum of
the processes' partial decodes. `WholeLatents` is the one-process form: both hooks are identities.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from sae.config import TrainConfig
from sae.kernels import BatchTopKEncode, mask_indices, ragged_decode, sparse_decode, topk_encode
from sae.model import TopKSAE


@dataclass
class LossParts:
    loss: torch.Tensor
    mse: torch.Tensor  # normalised by the constant from `init_from_sample`
    aux: torch.Tensor
    values: torch.Tensor  # (B, k) kept values of the main TopK (this process's latents)
    indices: torch.Tensor


@dataclass
class DeadLatentTracker:
    """Tokens since each latent last fired; dead = not fired for `dead_tokens` tokens (§A.2)."""

    tokens_since_fired: torch.Tensor
    dead_tokens: int
    threshold: float

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.dead_tokens

    def update(
        self,
        values: torch.Tensor,
        indices: torch.Tensor,
        tokens: int | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
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


class AuxMode(enum.Enum):
    """How a step's AuxK picks among the dead latents."""

    OFF = "off"  # no latent is dead: no AuxK term
    DEAD_ROWS = "dead_rows"  # the counted dead latents' encoder rows alone: a small product
    MASKED = "masked"  # a second selection over every latent, the live ones masked: fixed shapes, no host sync


@dataclass(frozen=True)
class DeadLatents:
    """This step's dead latents as the loss uses them. `here` counts those of this process's latents,
    `everywhere` those of the whole SAE (the same on one process); MASKED leaves both uncounted."""

    mode: AuxMode
    mask: torch.Tensor | None = None  # (this process's n_latents,) bool
    here: int = 0
    everywhere: int = 0

    @classmethod
    def counted(cls, mask: torch.Tensor) -> DeadLatents:
        """All latents in this process, counted (one host sync)."""
        n = int(mask.sum())
        return cls(AuxMode.DEAD_ROWS, mask, n, n)

    @classmethod
    def masked(cls, mask: torch.Tensor) -> DeadLatents:
        return cls(AuxMode.MASKED, mask)

    def rows(self) -> torch.Tensor:
        """The dead latents' positions (DEAD_ROWS), without a host sync: the count is known."""
        if self.mask is None:
            raise ValueError("no dead-latent mask: AuxK is off")
        return mask_indices(self.mask, self.here)


NO_DEAD = DeadLatents(AuxMode.OFF)


class Latents(Protocol):
    """Where the SAE's latents live, as the loss needs to know: `n_latents` and `k` are the whole
    SAE's. `enter` passes the encoder input to this process's latents, `top` zeroes this process's
    candidates (values sorted descending per row) that are not among the top k of all processes',
    `sum` adds the processes' partial decodes, `batch_keep` is BatchTopKEncode's `keep` (None: keep
    `count`), `replicas` how many processes share a batch's rows, `sum_over_data` adds a tensor over
    the processes that hold the batch's other rows."""

    n_latents: int
    k: int
    replicas: int

    def enter(self, x: torch.Tensor) -> torch.Tensor: ...

    def top(self, values: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def sum(self, partial: torch.Tensor) -> torch.Tensor: ...

    def batch_keep(self, count: int) -> Callable[[torch.Tensor], int] | None: ...

    def sum_over_data(self, t: torch.Tensor) -> torch.Tensor: ...


class WholeLatents:
    """Every latent in this process: the hooks change nothing."""

    replicas = 1

    def __init__(self, n_latents: int, k: int):
        self.n_latents, self.k = n_latents, k

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def top(self, values: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return values[:, :k], indices[:, :k]

    def sum(self, partial: torch.Tensor) -> torch.Tensor:
        return partial

    def batch_keep(self, count: int) -> None:
        return None

    def sum_over_data(self, t: torch.Tensor) -> torch.Tensor:
        return t


def sq_err(target: torch.Tensor, recon: torch.Tensor, scale: float) -> torch.Tensor:
    """sum_d (target - recon)^2, averaged over the batch, times the run's fixed scale."""
    return (target - recon).pow(2).sum(-1).mean() * scale


def sae_loss(
    sae: TopKSAE,
    x_norm: torch.Tensor,
    mse_scale: float,
    tcfg: TrainConfig,
    dead: DeadLatents = NO_DEAD,
    latents: Latents | None = None,
    target: torch.Tensor | None = None,
    open_latents: int | None = None,
) -> LossParts:
    """The loss of `sae` (this process's latents) on a normalised batch; `latents` defaults to all
    of them in this process. `target`: a transcoder's normalised target (an SAE's is x_norm).
    `open_latents`: only the first that many latents are selected (matryoshka_open)."""
    latents = latents or WholeLatents(sae.cfg.n_latents, sae.cfg.k)
    aux_k = _aux_width(tcfg, sae.cfg.d_in, latents.n_latents, dead)
    x_in = latents.enter(sae.encoder_input(x_norm))
    # what the latents add to: b_pre, and a skip-transcoder's W_skip x
    skip = sae.skip(x_norm)
    offset = sae.b_pre if skip is None else skip + sae.b_pre
    x_norm = x_norm if target is None else target  # from here on: what the decoder reconstructs
    if sae.cfg.activation == "batchtopk":
        return _batch_topk_loss(sae, x_in, x_norm, offset, mse_scale, tcfg, dead, aux_k, latents, open_latents)
    k, n_here = latents.k, sae.cfg.n_latents
    k_wide = min(4 * k, latents.n_latents) if tcfg.multi_topk else k
    values, indices, aux_values, aux_indices = sae.select(
        x_in,
        min(k_wide, n_here),
        min(aux_k, n_here),
        dead.mask if aux_k else None,
        dead.rows() if aux_k and dead.mode is AuxMode.DEAD_ROWS else None,
        open_latents,
    )

    def decode(width: int) -> torch.Tensor:
        return latents.sum(sparse_decode(*latents.top(values, indices, width), sae.W_dec)) + offset

    main_values, main_indices = latents.top(values, indices, k)
    recon, mse, loss = _reconstruction(sae, x_norm, offset, mse_scale, latents, main_values, main_indices)
    if k_wide > k:  # multi-TopK (§5.3)
        loss = loss + sq_err(x_norm, decode(k_wide), mse_scale) / 8
    aux = torch.zeros((), device=x_norm.device)
    if aux_k > 0:
        fired = _fired(sae, tcfg, main_values, main_indices, latents)
        aux = _aux_loss(sae, aux_values, aux_indices, aux_k, x_norm, recon, mse_scale, dead, latents, fired)
        loss = loss + tcfg.aux_coef * aux
    return LossParts(loss, mse.detach(), aux.detach(), main_values.detach(), main_indices)


def matryoshka_open(prefix_ends: Sequence[int], ramp: float, progress: float) -> int:
    """How many of a Matryoshka SAE's latents take part in the selection at `progress` (the fraction
    of the run done): group m of M (from 0) joins at ramp x m / (M - 1), so all have joined by `ramp`.

    Why: a feature taken early by a latent of a later group never reaches an earlier one, since under
    TopK the earlier latent gets no gradient from the tokens it does not fire on. On the planted
    hierarchy (benchmarks/matryoshka_absorption.py) the first group held 15 independent features
    beside 17 parents, and the prefixes were 1.07-1.15x plain SAEs of their size at their L0; with a
    ramp of 0.3, 0.93-1.05x, less absorbed, at 1.2x the whole dictionary's nMSE (docs/dictionaries.md)."""
    if ramp <= 0 or len(prefix_ends) < 2:
        return prefix_ends[-1]
    joined = sum(progress >= ramp * m / (len(prefix_ends) - 1) for m in range(1, len(prefix_ends)))
    return prefix_ends[joined]


def matryoshka_terms(
    values: torch.Tensor,
    indices: torch.Tensor,
    sae: TopKSAE,
    x_norm: torch.Tensor,
    mse_scale: float,
    rows: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(reconstruction, squared error) of each nested prefix of a Matryoshka SAE's latents, from the
    codes of the whole dictionary (Bussmann et al. 2025: the prefixes share one encoding): each
    group's latents decoded on their own, added to the prefix before. The last is the whole SAE's.
    A (B, k) code, or a ragged one (1-D indices and values, each entry's row in `rows`). `x_norm`
    is the target; `offset` what the latents add to (default b_pre)."""
    recon, start, terms = (sae.b_pre if offset is None else offset).expand_as(x_norm), 0, []
    for end in sae.cfg.prefix_ends():
        in_group = values * ((indices >= start) & (indices < end))
        if rows is None:
            part = sparse_decode(in_group, indices, sae.W_dec)
        else:
            part = ragged_decode(rows, indices, in_group, sae.W_dec, x_norm.shape[0])
        recon = recon + part
        terms.append((recon, sq_err(x_norm, recon, mse_scale)))
        start = end
    return terms


def _reconstruction(sae: TopKSAE, x_norm, offset, mse_scale: float, latents: Latents, values, indices, rows=None):
    """(reconstruction, its squared error, the reconstruction loss) of a (B, k) code, or of a ragged
    one with each entry's row in `rows`: the sum of the prefixes' errors for a Matryoshka SAE.
    `x_norm` is the target, `offset` what the latents add to."""
    if sae.cfg.matryoshka:
        if not isinstance(latents, WholeLatents):
            raise ValueError("a Matryoshka SAE trains with all its latents in one process: set train.latent_shards: 1")
        terms = matryoshka_terms(values, indices, sae, x_norm, mse_scale, rows, offset)
        return terms[-1][0], terms[-1][1], torch.stack([t for _, t in terms]).sum()
    if rows is None:
        partial = sparse_decode(values, indices, sae.W_dec)
    else:
        partial = ragged_decode(rows, indices, values, sae.W_dec, x_norm.shape[0])
    recon = latents.sum(partial) + offset
    mse = sq_err(x_norm, recon, mse_scale)
    return recon, mse, mse


def _aux_width(tcfg: TrainConfig, d_in: int, n_latents: int, dead: DeadLatents) -> int:
    """How many dead latents AuxK picks: aux_k, at most as many as are dead (all latents when uncounted)."""
    if dead.mode is AuxMode.OFF:
        return 0
    return min(tcfg.resolved_aux_k(d_in), n_latents if dead.mode is AuxMode.MASKED else dead.everywhere)


def _fired(
    sae: TopKSAE, tcfg: TrainConfig, values: torch.Tensor, indices: torch.Tensor, latents: Latents
) -> torch.Tensor | None:
    """The latents (this process's) that fired anywhere in the global batch's code, which AuxK leaves
    out, where they started at sample rows (decoder_init "data"); None where they started random.

    Why: a short dead window (8 n / k tokens: one batch of 1024 at 4096 latents and k 32) counts rare
    latents as dead, and a latent started at a sample row is often rare; AuxK's steps (under sign
    descent the full lr, whatever aux_coef) turned the ones that still fired away from their row. A
    transcoder on SmolLM2's MLP 20 at 100k / 200k / 400k tokens: 10.4 / 2.1 / 1.3% dead, 8.1 / 1.3 /
    0.6% left out of AuxK, at FVU +0.5% (its window is now 4x as long as well:
    TRANSCODER_DEAD_WINDOW_FACTOR); an SAE at layers 20 / 27, batches of 1024, 100k tokens: 2.2 /
    6.7% dead, 1.0 / 2.0% left out. Random rows fire as often as each other, and there leaving them
    out kept more dead at 200k and 400k (layers 12 and 27, batches of 4096; docs/method.md)."""
    if tcfg.resolved_decoder_init(sae.cfg) != "data":
        return None
    counts = torch.zeros(sae.cfg.n_latents, device=values.device)
    counts.index_add_(0, indices.flatten(), (values.detach() > 0).flatten().to(counts.dtype))
    return latents.sum_over_data(counts) > 0


def _aux_loss(
    sae: TopKSAE,
    aux_values,
    aux_indices,
    aux_k: int,
    x_norm,
    recon,
    mse_scale: float,
    dead: DeadLatents,
    latents: Latents,
    fired: torch.Tensor | None = None,
) -> torch.Tensor:
    """AuxK (§A.2): the top aux_k dead candidates of every process model the live latents' residual;
    a candidate in `fired` (this process's latents that fired in the batch's code) adds nothing."""
    if fired is not None:
        aux_values = aux_values * ~fired[aux_indices]
    partial = sparse_decode(*latents.top(aux_values, aux_indices, aux_k), sae.W_dec)
    aux = sq_err(x_norm - recon.detach(), latents.sum(partial), mse_scale)
    if dead.mode is AuxMode.MASKED and dead.mask is not None:  # uncounted: none dead, no AuxK (no sync)
        aux = torch.where(dead.mask.any(), torch.nan_to_num(aux, nan=0.0), 0.0)
    return aux


def _batch_topk_loss(
    sae: TopKSAE,
    x_in,
    x_norm,
    offset,
    mse_scale: float,
    tcfg: TrainConfig,
    dead: DeadLatents,
    aux_k: int,
    latents: Latents,
    open_latents: int | None = None,
) -> LossParts:
    """BatchTopK: the k·B largest pre-activations of the whole (global) batch (of the first
    `open_latents` latents); AuxK per row over the dead latents' encoder rows alone, as for TopK.
    `x_norm` is the target."""
    if dead.mode is AuxMode.MASKED:
        raise ValueError("BatchTopK's AuxK needs the dead latents counted (a CUDA graph cannot run it)")
    rows_here = x_norm.shape[0]
    count = latents.k * rows_here * latents.replicas
    W_enc, b_enc = sae.W_enc[:open_latents], None if sae.b_enc is None else sae.b_enc[:open_latents]
    rows, cols, values = BatchTopKEncode.apply(x_in, W_enc, b_enc, count, latents.batch_keep(count))
    recon, mse, loss = _reconstruction(sae, x_norm, offset, mse_scale, latents, values, cols, rows)
    aux = torch.zeros((), device=x_norm.device)
    if aux_k > 0:
        width = min(aux_k, sae.cfg.n_latents)  # the same on every process: the candidates are gathered
        dead_rows = dead.rows()
        if dead.here:
            b = sae.b_enc[dead_rows] if sae.b_enc is not None else None
            aux_values, picked, _, _ = topk_encode(x_in, sae.W_enc[dead_rows], b, min(width, dead.here))
            aux_indices = dead_rows[picked]
        else:  # none dead among this process's latents (others have some)
            aux_values, aux_indices = sae.W_dec.new_zeros(rows_here, 0), dead_rows.new_zeros(rows_here, 0)
        missing = width - aux_values.shape[1]  # fewer dead latents here than the width: zero picks
        aux_values, aux_indices = F.pad(aux_values, (0, missing)), F.pad(aux_indices, (0, missing))
        fired = _fired(sae, tcfg, values, cols, latents)
        aux = _aux_loss(sae, aux_values, aux_indices, aux_k, x_norm, recon, mse_scale, dead, latents, fired)
        loss = loss + tcfg.aux_coef * aux
    return LossParts(loss, mse.detach(), aux.detach(), values.detach(), cols)
