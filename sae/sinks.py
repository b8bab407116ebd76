"""An SAE's attention-sink latents, finished by least squares at the end of a run.

A language model's residual stream holds attention sinks: a few identical rows (SmolLM2's first
token, at 38-171x the median norm: 76-98% of the raw variance). Each distinct sink has a latent of
its own, gated by its encoder bias so that it fires on the sink and stays silent on ordinary rows
(sae.train.size_sink_latents). Standardised, a sink weighs in the loss as one ordinary row, and sign
descent leaves it an error of 0.3-2% of its norm that moves from step to step: small in the SAE's
space, but scaled back to the raw space it is most of the plain normalized MSE (docs/benchmarks.md).
Given the finished SAE's codes, the sink latents' decoder rows can take up that residual exactly,
and, the latents being gated, without moving any other row's reconstruction: so the trained SAE
gets them by least squares over the initialisation sample's sink rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sae.model import TopKSAE


@dataclass(frozen=True)
class SinkRows:
    """The sink latents of an SAE (indices) and the sample's sink rows, normalised, that they are
    finished on (cpu, float32)."""

    latents: torch.Tensor
    rows: torch.Tensor


NO_SINK_ROWS = SinkRows(torch.zeros(0, dtype=torch.long), torch.zeros(0, 0))


@torch.no_grad()
def refit_sink_decoders(sae: TopKSAE, sinks: SinkRows) -> None:
    """In place: the decoder rows of the sink latents that fire on the sink rows, moved by the least-
    squares correction of the sink rows' residual given the SAE's codes (min over D of
    sum_r ||residual_r - sum_s a_rs D_s||^2), then back at unit norm with the norm folded into the
    latent's encoder row and bias (its contribution unchanged). Codes are unchanged up to those
    latents' scale, so a row on which no sink latent fires reconstructs as before. Not for an SAE
    without an encoder bias (its sink latents are not gated) or a transcoder (not measured yet)."""
    if not len(sinks.latents) or not len(sinks.rows) or sae.cfg.transcoder or sae.b_enc is None:
        return
    rows = sinks.rows.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)
    codes = sae.encode_normalized(rows)
    residual = (rows - sae.decode_normalized(codes)).double()
    latents = sinks.latents.to(rows.device)
    # the sink latents' codes on the rows, (rows, sink latents): never n_latents wide (1M latents)
    picked = codes.indices[:, :, None] == latents[None, None, :]
    codes_of = (picked * codes.values.double()[:, :, None]).sum(1)
    fired = codes_of.abs().sum(0) > 0
    latents, codes_of = latents[fired], codes_of[:, fired]
    if not len(latents):
        return
    correction = torch.linalg.pinv(codes_of) @ residual  # (latents, d)
    moved = sae.W_dec[latents].double() + correction
    norms = moved.norm(dim=1).clamp_min(1e-12)
    sae.W_dec[latents] = (moved / norms[:, None]).to(sae.W_dec.dtype)
    sae.W_enc[latents] *= norms[:, None].to(sae.W_enc.dtype)
    sae.b_enc[latents] *= norms.to(sae.b_enc.dtype)  # there is one: the gate (checked above)
