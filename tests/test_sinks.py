"""The end of a run refits an SAE's sink latents' decoder rows by least squares (sae.sinks)."""

from __future__ import annotations

import numpy as np
import torch

from sae import SAEConfig, TopKSAE, TrainConfig, Trainer, train_saes
from sae.data import batch_stream
from sae.sinks import SinkRows, refit_sink_decoders


def data_with_sinks(rows: int = 4096, d: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Planted sparse rows plus identical attention-sink rows at 300x their norm, one in 64 (a
    context's first token); returns (rows, which are sinks)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(torch.randn(192, d, generator=g), dim=1)
    codes = torch.rand(rows, 192, generator=g) * (torch.rand(rows, 192, generator=g) < 0.03)
    x = codes @ features + 0.05 * torch.randn(rows, d, generator=g) + 0.3
    sinks = torch.arange(rows) % 64 == 0
    x[sinks] = 300.0 * torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0) + 1.0
    return x, sinks


def trained(x: torch.Tensor, tokens: int = 4096) -> Trainer:
    trainer = Trainer(SAEConfig(x.shape[1], 128, 8), TrainConfig(batch_tokens=256, tokens=tokens, seed=1))
    trainer.initialize(x[:2048])
    train_saes([trainer], batch_stream(x, 256, 1), progress=False)
    return trainer


def test_the_trained_sae_reconstructs_its_attention_sinks_exactly_and_rows_without_the_sink_latent_as_before():
    x, sinks = data_with_sinks()
    trainer = trained(x)
    assert len(trainer.sinks.latents) == 1 and len(trainer.sinks.rows) == int(sinks[:2048].sum())
    finished = trainer.final_sae()
    unfinished = trainer.averaged_sae().cpu()  # the same weights before the refit
    with torch.no_grad():
        before, after = unfinished(x), finished(x)
    sink_error = lambda r: ((x[sinks] - r[sinks]).pow(2).sum(1) / x[sinks].pow(2).sum(1)).max().item()  # noqa: E731
    assert sink_error(before) > 1e-5  # sign descent leaves the sinks an error ...
    assert sink_error(after) < 1e-9  # ... that the refit removes (float32 rounding at 300x)
    codes = unfinished.encode(x)
    fires = ((codes.indices == trainer.sinks.latents[0]) & (codes.values > 0)).any(1)
    silent = ~fires & ~sinks
    assert silent.sum() > 0.9 * (~sinks).sum()  # the gate: the sink latent is silent on ordinary rows
    torch.testing.assert_close(after[silent], before[silent], rtol=0, atol=0)  # and they do not move
    other_error = lambda r: (x[~sinks] - r[~sinks]).pow(2).sum().item()  # noqa: E731
    assert other_error(after) < 1.001 * other_error(before)
    torch.testing.assert_close(finished.W_dec.norm(dim=1), torch.ones(128))


def test_the_refit_is_the_least_squares_solution_of_the_sink_rows_residual():
    """Two sink latents firing on noisy copies of two sinks: after the refit the rows reconstruct as the codes with
    the decoder rows moved by numpy's lstsq correction of the residual; every other row is as it was."""
    g = torch.Generator().manual_seed(3)
    sae = TopKSAE(SAEConfig(16, 32, 4), generator=g)
    sinks = 5.0 * torch.randn(2, 16, generator=g)
    rows = sinks[[0, 0, 0, 1, 1, 1]] + 0.3 * torch.randn(6, 16, generator=g)  # two sinks, three noisy copies each
    with torch.no_grad():
        sae.b_enc.fill_(-0.1)
        sae.W_enc[:2] = 3.0 * torch.nn.functional.normalize(sinks, dim=1)  # latents 0 and 1 read the sinks
        codes = sae.encode_normalized(rows)
        dense = torch.zeros(6, 32).scatter_add_(1, codes.indices, codes.values).double().numpy()
        assert ((dense[:, :2] > 0).sum(0) >= 2).all()
        recon = sae.decode_normalized(codes).double().numpy()
        residual = rows.double().numpy() - recon
        correction = np.linalg.lstsq(dense[:, :2], residual, rcond=None)[0]
        others = sae.W_dec[2:].clone()
        refit_sink_decoders(sae, SinkRows(torch.tensor([0, 1]), rows))
        after = sae.decode_normalized(sae.encode_normalized(rows)).double().numpy()
    np.testing.assert_allclose(after, recon + dense[:, :2] @ correction, rtol=1e-4, atol=1e-4)
    assert np.abs(rows.double().numpy() - after).sum() < np.abs(residual).sum()
    torch.testing.assert_close(sae.W_dec[2:], others)
    torch.testing.assert_close(sae.W_dec[:2].norm(dim=1), torch.ones(2))


def test_a_checkpoint_keeps_the_sink_rows_and_one_from_before_them_loads_without():
    x, _ = data_with_sinks()
    trainer = trained(x, tokens=1024)
    tensors, meta = trainer.state_dict()
    restored = Trainer(SAEConfig(x.shape[1], 128, 8), TrainConfig(batch_tokens=256, tokens=1024, seed=1))
    restored.load_state_dict(tensors, meta)
    torch.testing.assert_close(restored.sinks.rows, trainer.sinks.rows)
    torch.testing.assert_close(restored.final_sae().W_dec, trainer.final_sae().W_dec)
    old = Trainer(SAEConfig(x.shape[1], 128, 8), TrainConfig(batch_tokens=256, tokens=1024, seed=1))
    old.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("sinks.")}, meta)
    assert len(old.sinks.latents) == 0  # no refit: its SAE is the averaged weights as they are
    torch.testing.assert_close(old.final_sae().W_dec, trainer.averaged_sae().cpu().W_dec)
