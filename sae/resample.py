"""A transcoder's dead latents restarted at the batch's worst-predicted pairs, in its first steps.

Why: a transcoder's rarely firing latents die in its first ~100 sign steps (on SmolLM2's MLP 20 at
batches of 1024, 4% of 4096 after 100k tokens) faster than AuxK revives them (0.3% left by 200k).
Restarting them every RESAMPLE_EVERY_STEPS steps through RESAMPLE_UNTIL_STEP (as Bricken et al.
2023 resample, at the pairs the transcoder predicts worst) left 0.5% at 100k at an FVU within 0.3%.
Why only early: the schedule-free average moves toward a row's new value by about 1/t a step, so a
row restarted late stays near its start in the averaged weights (restarting through 400k tokens took
the FVU at 400k from 0.16 to 1.5); and AuxK keeps later deaths rare. Why half the living encoder
rows' norm: at their full norm the restarted latents took top-k places from working ones (FVU +2.5%
at 100k), at 0.2x most died again (docs/dictionaries.md, "The 100k miss").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sae.model import TopKSAE

RESAMPLE_EVERY_STEPS = 10
RESAMPLE_UNTIL_STEP = 100
RESAMPLED_ENCODER_NORM = 0.5  # a restarted encoder row's norm, as a fraction of the living rows' mean


def resample_due(step: int) -> bool:
    """Whether the dead latents are restarted after optimizer step `step` (counted from 1)."""
    return 0 < step <= RESAMPLE_UNTIL_STEP and step % RESAMPLE_EVERY_STEPS == 0


@dataclass(frozen=True)
class Restarts:
    """New rows for some latents: what each one's encoder reads, its bias, and what it writes."""

    latents: torch.Tensor  # (m,) indices into the SAE's latents
    W_enc: torch.Tensor  # (m, d_in)
    b_enc: torch.Tensor  # (m,)
    W_dec: torch.Tensor  # (m, d_out)


@torch.no_grad()
def restarts_for(
    sae: TopKSAE, x_norm: torch.Tensor, target: torch.Tensor, dead: torch.Tensor, generator: torch.Generator
) -> Restarts:
    """New rows for the `dead` latents (a bool mask), one batch pair each, drawn without replacement
    with probability proportional to the pair's squared prediction error (in the normalised space):
    the encoder row is the direction of the pair's input less the batch's mean input, at
    RESAMPLED_ENCODER_NORM x the living rows' mean norm, its bias reads from that mean (the latent
    fires on inputs past it in the pair's direction), and the decoder row is the direction of the
    pair's error. A cross-layer transcoder's block l restarts from layer l's input and the error on
    layers l..L (its decoder rows are zero on the earlier ones). Where the batch has fewer pairs with
    an error than dead latents, the first dead latents of each block get one."""
    cfg = sae.cfg
    error = target - sae.decode_normalized(sae.encode_normalized(x_norm))
    layers = cfg.layers() if cfg.cross_layer else 1
    per_block, d = cfg.n_latents // layers, cfg.d_in
    out_width = error.shape[1] // layers
    parts = []
    for layer in range(layers):
        block = slice(layer * per_block, (layer + 1) * per_block)
        latents = block.start + torch.nonzero(dead[block]).flatten()
        writes = error.clone()
        writes[:, : layer * out_width] = 0.0
        weight = writes.pow(2).sum(1).double().cpu()
        count = min(len(latents), int((weight > 0).sum()))
        if not count:
            continue
        latents = latents[:count]
        rows = torch.multinomial(weight, count, generator=generator).to(x_norm.device)
        reads = sae.encoder_input(x_norm)[:, layer * d : (layer + 1) * d]
        centre = reads.mean(0)
        living = ~dead[block]
        norms = sae.W_enc[block].norm(dim=1)
        enc_norm = RESAMPLED_ENCODER_NORM * (norms[living] if living.any() else norms).mean()
        W_enc = _unit(reads[rows] - centre) * enc_norm
        parts.append(Restarts(latents, W_enc, -(W_enc @ centre), _unit(writes[rows])))
    if not parts:
        empty = torch.zeros(0, dtype=torch.long, device=x_norm.device)
        return Restarts(empty, sae.W_enc[:0].clone(), sae.W_enc.new_zeros(0), sae.W_dec[:0].clone())
    return Restarts(*(torch.cat([getattr(p, f) for p in parts]) for f in ("latents", "W_enc", "b_enc", "W_dec")))


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
