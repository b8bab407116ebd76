"""A transcoder's dead latents restarted at the batch's worst-predicted pairs (sae/resample.py): the new
rows against a plain reference computed densely, the trainer's schedule and state after a restart, a
resumed run equal to an uninterrupted one, and the defaults."""

import pytest
import torch

from sae import SAEConfig, TopKSAE, TrainConfig
from sae.resample import RESAMPLE_EVERY_STEPS, RESAMPLED_ENCODER_NORM, resample_due, restarts_for
from sae.train import Trainer


def _random_transcoder(d: int, n: int, k: int, layers: int = 1) -> TopKSAE:
    torch.manual_seed(0)
    cross = {"cross_layer": layers} if layers > 1 else {}
    sae = TopKSAE(SAEConfig(d, n, k, transcoder=True, skip_connection=True, **cross))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(std=0.3)
    return sae


def _dense_error(sae: TopKSAE, x: torch.Tensor, y: torch.Tensor, layers: int) -> torch.Tensor:
    """y minus the prediction, written out densely: each layer block keeps its own top k / L."""
    L, d = layers, sae.cfg.d_in
    m, k = sae.cfg.n_latents // L, sae.cfg.k // L
    kept = torch.zeros(len(x), sae.cfg.n_latents)
    for layer in range(L):
        block = slice(layer * m, (layer + 1) * m)
        pre = torch.relu(x[:, layer * d : (layer + 1) * d] @ sae.W_enc[block].T + sae.b_enc[block])
        top = pre.topk(k)
        kept[:, block] = torch.zeros_like(pre).scatter(1, top.indices, top.values)
    skip = torch.cat([x[:, i * d : (i + 1) * d] @ sae.W_skip[i * d : (i + 1) * d].T for i in range(L)], 1)
    return y - (kept @ sae.W_dec + sae.b_pre + skip)


@pytest.mark.parametrize("layers", [1, 2])
def test_restarted_rows_equal_a_plain_reference(layers):
    """Each dead latent gets a pair drawn by squared error (its block's layers only for a cross-layer
    transcoder): encoder row the pair's centred input direction at half the living rows' mean norm,
    bias reading from the batch mean, decoder row the error's direction, zero on earlier layers."""
    d, n, k, B = 6, 16, 4, 40
    sae = _random_transcoder(d, n, k, layers)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(B, layers * d, generator=g), torch.randn(B, layers * d, generator=g)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[[1, 4, 5, 9, 12, 15]] = True
    got = restarts_for(sae, x, y, dead, torch.Generator().manual_seed(7))

    error = _dense_error(sae, x, y, layers).detach()
    draw = torch.Generator().manual_seed(7)
    m = n // layers
    latents, enc, bias, dec = [], [], [], []
    for layer in range(layers):
        block = list(range(layer * m, (layer + 1) * m))
        here = [i for i in block if dead[i]]
        writes = error.clone()
        writes[:, : layer * d] = 0
        rows = torch.multinomial(writes.pow(2).sum(1).double(), len(here), generator=draw)
        reads = x[:, layer * d : (layer + 1) * d]
        living = [i for i in block if not dead[i]]
        norm = RESAMPLED_ENCODER_NORM * sae.W_enc[living].detach().norm(dim=1).mean()
        for latent, row in zip(here, rows.tolist()):
            centred = reads[row] - reads.mean(0)
            w = centred / centred.norm() * norm
            latents.append(latent)
            enc.append(w)
            bias.append(-(w @ reads.mean(0)))
            dec.append(writes[row] / writes[row].norm())
    assert got.latents.tolist() == latents
    torch.testing.assert_close(got.W_enc, torch.stack(enc), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.b_enc, torch.stack(bias), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.W_dec, torch.stack(dec), rtol=1e-5, atol=1e-6)
    if layers > 1:  # block 2's decoder rows write nothing on layer 1
        assert (got.W_dec[got.latents >= m, :d] == 0).all() and (got.W_dec[got.latents < m, :d] != 0).any()


def test_more_dead_latents_than_pairs_with_an_error_restart_the_first_ones():
    sae = _random_transcoder(6, 16, 4)
    x = torch.randn(3, 6)
    y = sae.decode_normalized(sae.encode_normalized(x)).detach()
    y[0] += 1.0  # one pair alone is predicted with an error
    got = restarts_for(sae, x, y, torch.ones(16, dtype=torch.bool), torch.Generator().manual_seed(0))
    assert got.latents.tolist() == [0]
    alive = restarts_for(sae, x, y, torch.zeros(16, dtype=torch.bool), torch.Generator().manual_seed(0))
    assert len(alive.latents) == 0  # no dead latent: nothing restarts


def test_the_schedule_is_every_ten_steps_of_the_first_hundred():
    assert [s for s in range(0, 250) if resample_due(s)] == list(range(10, 101, RESAMPLE_EVERY_STEPS))


def _rows(n: int, d: int, steps: int, batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps * batch, d, generator=g)
    y = torch.tanh(x @ torch.randn(d, d, generator=g)) * 3
    return torch.cat([x, y], 1)


def _trainer(**kw) -> Trainer:
    cfg = SAEConfig(8, 256, 4, transcoder=True, skip_connection=True)
    # dead after one batch of 16: most of 256 latents miss a batch, so restarts have work at step 10
    return Trainer(cfg, TrainConfig(batch_tokens=16, tokens=16 * 30, dead_tokens=16, **kw))


def test_the_trainer_restarts_the_dead_latents_in_weights_optimizer_and_counters():
    rows = _rows(256, 8, 30, 16)
    seen = []

    def run(trainer: Trainer, steps: int) -> None:
        restart = trainer.restart

        def spy(new):
            seen.append((trainer.steps, new, trainer.tracker.dead_mask().clone()))
            restart(new)

        trainer.restart = spy
        trainer.initialize(rows)
        for i in range(steps):
            trainer.step(rows[i * 16 : (i + 1) * 16])

    trainer = _trainer()
    run(trainer, RESAMPLE_EVERY_STEPS - 1)
    assert not seen  # nothing before step 10
    trainer.step(rows[(RESAMPLE_EVERY_STEPS - 1) * 16 : RESAMPLE_EVERY_STEPS * 16])
    [(step, new, dead)] = seen
    assert dead.sum() > 100
    # a batch of 16 pairs restarts 16 latents, the first 16 of those dead after the step
    assert step == RESAMPLE_EVERY_STEPS and new.latents.tolist() == dead.nonzero().flatten()[:16].tolist()
    assert (trainer.tracker.tokens_since_fired[new.latents] == 0).all()
    # the weights, the optimizer's z and the averaged x all start at the new rows
    averaged = trainer.averaged_sae()
    for name in ("W_enc", "b_enc", "W_dec"):
        param, value = getattr(trainer.sae, name), getattr(new, name)
        assert torch.equal(param.detach()[new.latents], value)
        assert torch.equal(trainer.opt.state[param]["z"][new.latents], value)
        if name != "W_dec":  # (the averaged SAE folds decoder norms into the encoder: unit rows here)
            torch.testing.assert_close(getattr(averaged, name).detach()[new.latents], value)
    torch.testing.assert_close(new.W_dec.norm(dim=1), torch.ones(16))
    seen.clear()
    run(_trainer(resample_dead=False), RESAMPLE_EVERY_STEPS)
    assert not seen  # off: no restart


def test_a_resumed_run_restarts_what_an_uninterrupted_one_does():
    rows = _rows(256, 8, 30, 16)
    whole = _trainer()
    whole.initialize(rows)
    for i in range(30):
        whole.step(rows[i * 16 : (i + 1) * 16])
    first = _trainer()
    first.initialize(rows)
    for i in range(15):
        first.step(rows[i * 16 : (i + 1) * 16])
    tensors, meta = first.state_dict()
    resumed = _trainer()
    resumed.load_state_dict(tensors, meta)
    for i in range(15, 30):
        resumed.step(rows[i * 16 : (i + 1) * 16])
    for name, value in whole.sae.state_dict().items():
        assert torch.equal(resumed.sae.state_dict()[name], value), name


def test_on_by_default_for_transcoders_under_sign_descent_only():
    tc, sae = SAEConfig(8, 64, 4, transcoder=True), SAEConfig(8, 64, 4)
    assert TrainConfig().resolved_resample_dead(tc) and not TrainConfig().resolved_resample_dead(sae)
    assert not TrainConfig(optimizer="adam").resolved_resample_dead(tc)
    assert TrainConfig(resample_dead=True).resolved_resample_dead(sae)  # asked for: on
    with pytest.raises(ValueError, match="resample_dead: .*with optimizer adam leave it unset"):
        TrainConfig(resample_dead=True, optimizer="adam")
    with pytest.raises(ValueError, match="resample_dead: .*adam"):
        TrainConfig(resample_dead=True, recipe="paper")
