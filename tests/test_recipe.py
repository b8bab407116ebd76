"""The default recipe: least-squares encoder init, budget-aware defaults, the paper preset, and
training from activations a user already has."""

import math
import warnings

import numpy as np
import pytest
import torch
from test_train import planted_data

from sae import SAEConfig, TopKSAE, TrainConfig, Trainer, auto_lr, train_sae
from sae.geometric_median import geometric_median
from sae.kernels import sparse_decode, topk_encode
from sae.train import (
    SAE_DISTINCT_COS,
    SINK_GATE,
    TRANSCODER_DISTINCT_COS,
    lr_factor,
    massive_rows,
    scale_encoder_least_squares,
    spread_rows,
)


def test_least_squares_encoder_scale_is_the_argmin():
    """c from the closed form equals a brute-force minimum of the reconstruction error over c."""
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(32, 256, 8)).double()
    x = torch.randn(512, 32, dtype=torch.float64) + 0.3
    w_enc = sae.W_enc.detach().clone()
    c = scale_encoder_least_squares(sae, x)

    def error(scale: float) -> float:
        values, indices, _, _ = topk_encode(x - sae.b_pre, w_enc * scale, None, 8)
        return (x - sae.b_pre - sparse_decode(values, indices, sae.W_dec)).pow(2).sum().item()

    grid = torch.linspace(0.01, 1.5, 1500).tolist()
    best = min(grid, key=error)
    assert abs(c - best) < 2e-3, (c, best)
    assert torch.allclose(sae.W_enc, w_enc * c)
    assert error(c) < error(1.0)  # the tied init (c = 1) reconstructs worse


def test_scaled_init_fixes_the_slow_start():
    """The cause of saeflow's slow learning: the unscaled tied encoder. A fixed-seed run of 20 steps at
    a fixed lr must reach an MSE that the tied init (the old code) does not reach."""
    torch.manual_seed(0)
    x, _ = planted_data(20 * 512, 64, 512, 8, seed=3)
    x = x + 0.5
    bound = 0.58

    def mse_after_20_steps(init: str) -> float:
        tcfg = TrainConfig(
            batch_tokens=512,
            tokens=len(x),
            optimizer="adam",
            lr=1e-3,
            lr_warmup_tokens=0,
            lr_decay="constant",
            encoder_init=init,
        )
        trainer = Trainer(SAEConfig(64, 512, 8), tcfg)
        trainer.initialize(x[:4096])
        return [trainer.step(b).mse.item() for b in x.split(512)][-1]

    assert mse_after_20_steps("least_squares") < bound
    assert mse_after_20_steps("tied") > bound


def test_auto_lr_rules():
    assert math.isclose(auto_lr(2**15, recipe="paper"), 1e-4)
    assert math.isclose(auto_lr(2**13, recipe="paper"), 2e-4)
    base = auto_lr(4096, 4096, optimizer="adam")
    assert math.isclose(auto_lr(16384, 4096, optimizer="adam"), base / 2)  # 1/sqrt(n)
    assert math.isclose(auto_lr(4096, 1024, optimizer="adam"), base / 2)  # sqrt(batch)
    assert math.isclose(auto_lr(4096, 4096, tokens=4096 * 1000, optimizer="adam"), base)  # long runs: no boost
    assert math.isclose(auto_lr(4096, 4096, tokens=4096 * 32, optimizer="adam"), 2 * base)  # sqrt(128 / 32)
    assert math.isclose(auto_lr(4096, 4096, tokens=4096 * 2, optimizer="adam"), 2 * base)  # capped at 2x
    sign = auto_lr(4096, 4096)
    assert math.isclose(sign, 2e-2 / math.sqrt(2))
    assert math.isclose(auto_lr(16384, 4096), sign / 2)  # 1/sqrt(n)
    assert math.isclose(auto_lr(4096, 1024), sign)  # no batch scaling
    assert math.isclose(auto_lr(4096, 4096, tokens=4096 * 32), sign * 4**0.375)  # (128 / 32)^(3/8)
    # a sign step moves a unit decoder row by lr * sqrt(d_in): capped at MAX_SIGN_ROW_STEP (0.35)
    assert math.isclose(auto_lr(4096, 4096, tokens=4096 * 24, d_in=576), 0.35 / 24)  # 1.87x would move 0.63
    assert math.isclose(auto_lr(4096, 4096, tokens=4096 * 32, d_in=128), sign * 4**0.375)  # 0.27 of a row: kept
    assert math.isclose(auto_lr(1024, 4096, d_in=4096), 0.35 / 64)  # a small dictionary of a wide model
    assert math.isclose(auto_lr(4096, 4096, tokens=4096 * 24, optimizer="adam", d_in=576), 2 * base)  # signum only
    # the trainer steps with the capped lr, and the SAE records it
    trainer = Trainer(SAEConfig(576, 4096, 32), TrainConfig(batch_tokens=4096, tokens=4096 * 24))
    assert math.isclose(trainer.base_lr, 0.35 / 24)
    assert all(math.isclose(g["lr"], 0.35 / 24) for g in trainer.opt.param_groups)


def test_defaults_follow_the_budget_and_the_paper_preset_keeps_its_recipe():
    t = TrainConfig(tokens=1_000_000)
    assert t.resolved_optimizer() == "signum"  # schedule-free: a 4-step warmup, no decay
    assert (t.warmup_tokens(), t.decay(), t.dead_window(4096, 32), t.resolved_aux_k(768)) == (
        4 * 4096,
        "constant",
        4096,
        384,
    )
    assert [lr_factor(t, s * 4096) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    # at most half the run: 6 steps warm up over 3, 3 steps over 1 (the full lr from the first step)
    assert TrainConfig(tokens=6 * 4096).warmup_tokens() == 3 * 4096
    assert lr_factor(TrainConfig(tokens=3 * 4096), 0) == 1.0
    assert t.dead_window(32768, 16) == 8 * 2048  # where an average latent (k/n) fires 8 times
    assert t.scaled_encoder_init()
    t = TrainConfig(tokens=1_000_000, optimizer="adam")
    assert (t.warmup_tokens(), t.decay()) == (50_000, "linear")
    assert TrainConfig(tokens=10**10).dead_window(2**24, 8) == 10_000_000  # never above the paper's window
    assert TrainConfig(tokens=1000, batch_tokens=4096).dead_window(1024, 64) == 4096  # never below one batch
    p = TrainConfig(tokens=1_000_000, recipe="paper")
    assert (p.warmup_tokens(), p.decay(), p.dead_window(4096, 32), p.resolved_aux_k(768)) == (
        0,
        "constant",
        10_000_000,
        256,
    )
    assert not p.scaled_encoder_init() and p.resolved_optimizer() == "adam"
    assert math.isclose(p.resolved_lr(2**15), 1e-4)
    # linear warmup, then linear decay reaching zero after the last step
    assert math.isclose(lr_factor(t, 0), 4096 / 50_000)
    assert lr_factor(t, 50_000) == 1.0
    assert lr_factor(t, 1_000_000) == 0.0
    with pytest.raises(ValueError, match="recipe"):
        TrainConfig(recipe="fast")
    with pytest.raises(ValueError, match="TrainConfig.tokens"):
        Trainer(SAEConfig(8, 32, 4), TrainConfig())


def test_train_sae_on_a_tensor_an_array_a_npy_file_and_an_iterator(tmp_path):
    x = torch.randn(2000, 16) * 3 + 1
    cfg = SAEConfig(16, 64, 4)
    tcfg = TrainConfig(batch_tokens=250, log_every=1)
    on_tensor = train_sae(cfg, tcfg, x, progress=False)
    assert (on_tensor.tokens, on_tensor.steps) == (2000, 8)  # tokens=None: one pass
    np.save(tmp_path / "acts.npy", x.numpy())
    on_file = train_sae(cfg, tcfg, tmp_path / "acts.npy", progress=False)
    on_array = train_sae(cfg, tcfg, x.numpy(), progress=False)
    on_iter = train_sae(cfg, TrainConfig(batch_tokens=250, tokens=2000), iter(x.split(250)), progress=False)
    for other in (on_file, on_array, on_iter):  # the same batches in the same order: the same SAE
        assert torch.equal(other.sae.W_dec, on_tensor.sae.W_dec)
    two_passes = train_sae(cfg, TrainConfig(batch_tokens=250, tokens=4000), x, progress=False)
    assert two_passes.steps == 16
    with pytest.raises(ValueError, match="tokens"):
        train_sae(cfg, tcfg, iter(x.split(250)), progress=False)
    with pytest.raises(ValueError, match=r"\.npy"):
        train_sae(cfg, tcfg, tmp_path / "acts.pt", progress=False)


def test_a_short_stream_ends_training_with_a_warning_and_an_sae():
    x = torch.randn(1000, 16)
    with pytest.warns(UserWarning, match="ran out after 1,000 of 5,000 tokens"):
        result = train_sae(
            SAEConfig(16, 64, 4), TrainConfig(batch_tokens=250, tokens=5000), iter(x.split(250)), progress=False
        )
    assert result.tokens == 1000 and torch.isfinite(result.sae.W_dec).all()


@pytest.mark.parametrize("normalization", ["standardize", "dataset_scale", "none"])
def test_encode_decode_round_trip_on_raw_activations(normalization):
    x = torch.randn(300, 16) * 5 + 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sae = train_sae(
            SAEConfig(16, 64, 4, normalization=normalization), TrainConfig(batch_tokens=100), x, progress=False
        ).sae
    with torch.no_grad():
        codes = sae.encode(x)
        assert torch.allclose(sae.decode(codes), sae(x), atol=1e-5)
        bare = type(codes)(codes.values, codes.indices)  # codes without their normalisation
        if normalization == "standardize":
            with pytest.raises(ValueError, match="normalisation"):
                sae.decode(bare)
        else:
            assert torch.allclose(sae.decode(bare), sae(x), atol=1e-5)


def test_schedule_free_sign_descent_against_a_plain_reference():
    """Three steps on a quadratic, compared with the update rule written out by hand."""
    from sae.optim import ScheduleFreeSignSGD

    target = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
    start = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    w = torch.nn.Parameter(start.clone())
    opt = ScheduleFreeSignSGD([{"params": [w], "unit_rows": True}], lr=0.1, momentum=0.9)
    z, x, total = start.clone(), start.clone(), 0.0
    for lr in (0.1, 0.1, 0.05):
        opt.param_groups[0]["lr"] = lr
        grad = 2 * (w.detach() - target)
        w.grad = grad.clone()
        opt.step()
        z = z - lr * grad.sign()
        z = z / z.norm(dim=1, keepdim=True)
        total += lr * lr
        x = x + (lr * lr / total) * (z - x)
        assert torch.allclose(w.detach(), 0.1 * z + 0.9 * x, atol=1e-6)
    assert torch.allclose(opt.averaged(w), x, atol=1e-6)


def test_the_trained_sae_is_the_average_with_unit_decoder_rows():
    x = torch.randn(2048, 16) * 2 + 1
    trainer = Trainer(SAEConfig(16, 64, 4), TrainConfig(batch_tokens=256, tokens=2048))
    trainer.initialize(x)
    for batch in x.split(256):
        trainer.step(batch)
    final = trainer.final_sae()
    assert torch.allclose(final.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    avg_dec, avg_enc = trainer.opt.averaged(trainer.sae.W_dec), trainer.opt.averaged(trainer.sae.W_enc)
    norms = avg_dec.norm(dim=1, keepdim=True)
    # the row norm moves into the encoder: each latent's contribution z_i d_i is unchanged
    assert torch.allclose(final.W_dec, avg_dec / norms, atol=1e-6)
    assert torch.allclose(final.W_enc, avg_enc * norms, atol=1e-6)
    assert not torch.equal(final.W_enc, trainer.sae.W_enc)  # not the training iterate y


def test_the_optimizer_projects_the_decoder_gradient_as_the_separate_pass_does():
    """Default: the sign step removes the decoder gradient's component along each row itself; with
    gradient clipping (which must see the projected gradient) the trainer's own pass does it."""
    x = torch.randn(6 * 256, 16, generator=torch.Generator().manual_seed(2)) * 2 + 1
    runs = []
    for project_in_optimizer in (True, False):
        trainer = Trainer(SAEConfig(16, 64, 4), TrainConfig(batch_tokens=256, tokens=x.shape[0], dead_tokens=256))
        assert trainer.opt.param_groups[0]["project_rows"]
        trainer.opt.param_groups[0]["project_rows"] = project_in_optimizer
        trainer.initialize(x)
        for batch in x.split(256):
            trainer.step(batch)
        runs.append(trainer)
    for a, b in zip(runs[0].sae.parameters(), runs[1].sae.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    clipped = Trainer(SAEConfig(16, 64, 4), TrainConfig(batch_tokens=256, tokens=x.shape[0], grad_clip=1.0))
    assert not clipped.opt.param_groups[0]["project_rows"]


def greedy_distinct(rows: torch.Tensor, most: int, ladder: tuple[float, ...], block: int) -> list[int]:
    """The rule of sae.train.spread_rows, one row at a time: for each bound of the ladder in turn, a
    row not kept yet is kept when its cosine is below the bound to every row kept before its block
    (by an earlier bound, or by this one from an earlier block) and to every earlier row of its own
    block that is itself below the bound to all of those."""
    kept: list[int] = []

    def apart(i: int, others: list[int], max_cos: float) -> bool:
        return all(float(rows[i] @ rows[j]) < max_cos for j in others)

    for max_cos in ladder:
        before = set(kept)
        for i in range(len(rows)):
            start = i - i % block
            prior = [j for j in kept if j in before or j < start]
            rivals = [j for j in range(start, i) if j not in before and apart(j, prior, max_cos)]
            if i not in before and len(kept) < most and apart(i, prior + rivals, max_cos):
                kept.append(i)
    return kept


@pytest.mark.parametrize("most, block, ladder", [(1000, 64, (0.7,)), (20, 2048, (0.7,)), (1000, 64, (0.2, 0.7))])
def test_spread_rows_follow_the_greedy_rule(most, block, ladder):
    """Clusters of near-copies: one row per cluster survives, in the draw's order, as the plain loop
    says; under a ladder, the first bound's rows come first, the next bound's rows after them."""
    g = torch.Generator().manual_seed(3)
    centres = torch.nn.functional.normalize(torch.randn(40, 12, generator=g), dim=1)
    rows = torch.nn.functional.normalize(centres.repeat(5, 1) + 0.05 * torch.randn(200, 12, generator=g), dim=1)
    got = spread_rows(rows, most, ladder, block)
    assert got.tolist() == greedy_distinct(rows, most, ladder, block)
    cos = (rows[got] @ rows[got].T).fill_diagonal_(0)
    assert cos.max() < ladder[-1] and len(got) <= min(most, 40)
    if len(ladder) > 1:  # the tight bound keeps a few rows, the loose one fills in the other clusters
        tight = len(greedy_distinct(rows, most, ladder[:1], block))
        assert 0 < tight < len(got) == 40
        assert (rows[got[:tight]] @ rows[got[:tight]].T).fill_diagonal_(0).max() < ladder[0]


@pytest.mark.parametrize("n_latents", [96, 400])  # fewer latents than distinct sample rows, and more
def test_decoder_rows_from_data_are_distinct_centred_sample_rows(n_latents):
    """decoder_init "data": the first decoder rows are the unit directions of sample rows minus b_pre,
    in the order drawn by the run's seed, as spread as the sample allows (SAE_DISTINCT_COS); the
    encoder rows are the same directions times the one least-squares factor; latents past them keep
    the random init."""
    x, _ = planted_data(256, 24, 64, 4, seed=5)
    data, plain = (
        Trainer(SAEConfig(24, n_latents, 4), TrainConfig(batch_tokens=64, tokens=256, seed=7, decoder_init=d))
        for d in ("data", "random")
    )
    data.initialize(x)
    plain.initialize(x)
    with torch.no_grad():
        x_norm = data.sae.normalize(x)[0]
        drawn = x_norm[torch.randperm(len(x), generator=torch.Generator().manual_seed(7))] - data.sae.b_pre
        drawn = drawn / drawn.norm(dim=1, keepdim=True)
    want = drawn[greedy_distinct(drawn, n_latents, SAE_DISTINCT_COS, 2048)]
    m = len(want)
    assert 24 < m < 256  # some rows were skipped, and more than a basis' worth kept
    torch.testing.assert_close(data.sae.W_dec[:m], want)
    assert torch.equal(data.sae.W_dec[m:], plain.sae.W_dec[m:])
    factor = data.sae.W_enc.norm(dim=1)
    assert 0 < factor.min() and torch.allclose(factor, factor[0].expand_as(factor), rtol=1e-5)
    torch.testing.assert_close(data.sae.W_enc / factor[:, None], data.sae.W_dec)


def test_a_data_initialised_encoder_steps_by_its_own_scale():
    """Under decoder_init "data" the encoder's sign step is lr x min(1, its mean row norm), measured
    before the step; the decoder's is the plain lr. A random init keeps one group for the encoder
    and the biases (its checkpoints' optimizer state is as before)."""
    x, _ = planted_data(512, 24, 64, 4, seed=1)
    t = Trainer(SAEConfig(24, 96, 4), TrainConfig(batch_tokens=256, tokens=512, decoder_init="data"))
    t.initialize(x)
    scale = min(1.0, t.sae.W_enc.norm(dim=1).mean().item())
    assert 0 < scale < 1  # the least-squares factor of aligned rows: below the unit decoder rows'
    before = {n: p.detach().clone() for n, p in t.sae.named_parameters()}
    t.step(x[:256])
    lr = t.base_lr
    (encoder,) = [g for g in t.opt.param_groups if g.get("encoder")]
    assert encoder["lr"] == pytest.approx(lr * scale)
    # z takes the whole sign step (on CPU the gradients hold its signs after the step); the decoder's
    # rows are then renormalised
    enc, dec = t.sae.W_enc, t.sae.W_dec
    assert enc.grad is not None and dec.grad is not None
    torch.testing.assert_close(t.opt.state[enc]["z"], before["W_enc"] - lr * scale * enc.grad)
    stepped = before["W_dec"] - lr * dec.grad
    torch.testing.assert_close(t.opt.state[dec]["z"], stepped / stepped.norm(dim=1, keepdim=True))
    plain = Trainer(SAEConfig(24, 96, 4), TrainConfig(batch_tokens=256, tokens=512, decoder_init="random"))
    assert not any(g.get("encoder") for g in plain.opt.param_groups) and len(plain.opt.param_groups) == 2


def test_decoder_rows_from_data_reconstruct_better_before_any_step():
    """On planted sparse data the initialised SAE (no step taken) reconstructs held-out rows better
    from sample rows than from random directions."""
    x, _ = planted_data(4096, 32, 128, 3, seed=2)
    train, held = x[:2048], x[2048:]
    errors = {}
    for init in ("data", "random"):
        t = Trainer(SAEConfig(32, 256, 3), TrainConfig(batch_tokens=256, tokens=2048, decoder_init=init))
        t.initialize(train)
        with torch.no_grad():
            errors[init] = (t.sae(held) - held).pow(2).sum().item() / (held - held.mean(0)).pow(2).sum().item()
    assert errors["data"] < 0.8 * errors["random"], errors


def _transcoder_started_at_pairs(x: torch.Tensor, y: torch.Tensor):
    """A transcoder of 48 latents (k 4) initialised at sample pairs drawn by seed 2 on rows [x | y];
    with its normalised x and y, the draw's order and the inputs' centre."""
    t = Trainer(
        SAEConfig(16, 48, 4, transcoder=True), TrainConfig(batch_tokens=64, tokens=256, seed=2, decoder_init="data")
    )
    t.initialize(torch.cat([x, y], 1))
    sae = t.sae
    with torch.no_grad():
        x_norm, y_norm = sae.normalize(x)[0], sae.normalize_target(y)[0]
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(2))
        return sae, x_norm, y_norm, order, geometric_median(x_norm)


def test_a_transcoders_data_rows_are_sample_pairs():
    """decoder_init "data" on a transcoder: latent i starts at the i-th distinct drawn pair, its encoder
    row the unit direction of x - the input's geometric median (its bias reads from there), its
    decoder row that of y - b_pre; the encoder scaled by one least-squares factor."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(512, 16, generator=g) + 2.0
    y = torch.tanh(x @ torch.randn(16, 16, generator=g))
    sae, x_norm, y_norm, order, centre = _transcoder_started_at_pairs(x, y)
    with torch.no_grad():
        reads = torch.nn.functional.normalize(x_norm[order] - centre, dim=1)
        kept = greedy_distinct(reads, 48, TRANSCODER_DISTINCT_COS, 2048)
        writes = torch.nn.functional.normalize(y_norm[order][kept] - sae.b_pre, dim=1)
    m = len(kept)
    assert m > 16
    torch.testing.assert_close(sae.W_dec[:m], writes)
    factor = sae.W_enc[:m].norm(dim=1)
    torch.testing.assert_close(sae.W_enc[:m] / factor[:, None], reads[kept])
    assert torch.allclose(factor, factor[0].expand_as(factor), rtol=1e-5)
    torch.testing.assert_close(sae.b_enc, -(sae.W_enc @ centre))


def test_a_transcoders_sink_pairs_start_first_sized_to_their_targets():
    """Pairs whose target is massive (an attention sink's MLP output: norm over MASSIVE_NORM x the
    median) start the first latents, in the draw's order. Each such latent's code on its own pair's
    input is SINK_GATE of its target's norm (encoder row norm |y - b_pre| / |x - centre|, bias lowered
    by the gate) and it is silent on every ordinary row; the other latents keep the one least-squares
    factor, as without sinks."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(512, 16, generator=g) + 2.0
    y = torch.tanh(x @ torch.randn(16, 16, generator=g))
    sinks = torch.tensor([5, 77, 300, 411])
    x[sinks] = 2.0 + 20.0 * torch.eye(16)[[3, 8, 11, 14]]  # distinct inputs, far out as a sink's residual is
    y[sinks] = 300.0 * torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=1)
    sae, x_norm, y_norm, order, centre = _transcoder_started_at_pairs(x, y)
    with torch.no_grad():
        first = torch.cat([order[torch.isin(order, sinks)], order[~torch.isin(order, sinks)]])
        reads = torch.nn.functional.normalize(x_norm[first] - centre, dim=1)
        kept = greedy_distinct(reads, 48, TRANSCODER_DISTINCT_COS, 2048)
        assert first[kept][:4].tolist() == [i for i in order.tolist() if i in sinks.tolist()]
        writes = torch.nn.functional.normalize(y_norm[first][kept] - sae.b_pre, dim=1)
        torch.testing.assert_close(sae.W_dec[: len(kept)], writes)
        pre = x_norm @ sae.W_enc.T + sae.b_enc  # (rows, latents)
        own = first[kept][:4]
        target_norms = (y_norm[own] - sae.b_pre).norm(dim=1)
        torch.testing.assert_close(pre[own, torch.arange(4)], SINK_GATE * target_norms)
        ordinary = torch.ones(len(x), dtype=torch.bool)
        ordinary[sinks] = False
        assert pre[ordinary, :4].max() < 0
        factor = sae.W_enc[4 : len(kept)].norm(dim=1)
        assert torch.allclose(factor, factor[0].expand_as(factor), rtol=1e-5)
        torch.testing.assert_close(sae.W_enc[4 : len(kept)] / factor[:, None], reads[kept][4:])
        torch.testing.assert_close(sae.W_enc[:4].norm(dim=1), target_norms / (x_norm[own] - centre).norm(dim=1))


@pytest.mark.parametrize("bias", [True, False])
def test_an_saes_attention_sink_rows_start_a_gated_latent_of_their_own(bias):
    """An SAE's rows that are massive in the raw space (identical rows at 400x the others' norm, as
    SmolLM2's attention sinks are; standardised, they are not massive) start latent 0 whatever the
    draw. With an encoder bias (the default) that latent's code on them is SINK_GATE of their
    centred norm and it is silent on every ordinary row; without one it keeps the least-squares
    factor of the other rows, ungated."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(512, 64, generator=g) + 0.5
    sinks = torch.tensor([5, 77, 300, 411])
    x[sinks] = 400.0 * torch.nn.functional.normalize(torch.randn(64, generator=g), dim=0)
    t = Trainer(SAEConfig(64, 96, 4, encoder_bias=bias), TrainConfig(batch_tokens=64, tokens=256, seed=2))
    t.initialize(x)
    sae = t.sae
    with torch.no_grad():
        s = sae.normalize(x)[0] - sae.b_pre
        assert not massive_rows(s)[sinks].any()  # judged on the raw rows
        torch.testing.assert_close(sae.W_dec[0], s[5] / s[5].norm())
        assert (sae.W_dec[1:] @ sae.W_dec[0]).max() < SAE_DISTINCT_COS[-1]  # one latent for the identical rows
        pre = s @ sae.W_enc.T + (sae.b_enc if bias else 0.0)
        factor = sae.W_enc[1:].norm(dim=1)
        assert torch.allclose(factor, factor[0].expand_as(factor), rtol=1e-5)
        if bias:
            torch.testing.assert_close(pre[sinks, 0], SINK_GATE * s[sinks].norm(dim=1))
            ordinary = torch.ones(len(x), dtype=torch.bool)
            ordinary[sinks] = False
            assert pre[ordinary, 0].max() < 0
            assert sae.b_enc[1:].abs().max() == 0
        else:
            assert sae.W_enc[0].norm() == pytest.approx(factor[0].item(), rel=1e-5)


def test_decoder_init_unset_is_data_but_random_for_an_sae_under_the_paper_recipe():
    unset, paper = TrainConfig(), TrainConfig(recipe="paper")
    for cfg in (
        SAEConfig(16, 64, 4),
        SAEConfig(16, 64, 4, transcoder=True),
        SAEConfig(16, 64, 4, transcoder=True, skip_connection=True),
        SAEConfig(16, 64, 4, transcoder=True, cross_layer=2),
    ):
        assert unset.resolved_decoder_init(cfg) == "data"
        assert paper.resolved_decoder_init(cfg) == ("data" if cfg.transcoder else "random")
    chosen = TrainConfig(decoder_init="random")
    assert chosen.resolved_decoder_init(SAEConfig(16, 64, 4, transcoder=True)) == "random"
    sae = Trainer(SAEConfig(16, 64, 4), TrainConfig(batch_tokens=64, tokens=256))
    assert any(g.get("encoder") for g in sae.opt.param_groups)  # the encoder's own step (data rows)
    assert sae.sae.b_enc is not None  # an encoder bias by default: it gates the sink latents


def test_a_transcoder_checkpoint_from_random_rows_resumes_only_with_random_rows():
    cfg = SAEConfig(16, 64, 4, transcoder=True)
    rows = torch.randn(128, 32)
    old = Trainer(cfg, TrainConfig(batch_tokens=64, tokens=256, decoder_init="random"))
    old.initialize(rows)
    old.step(rows[:64])
    tensors, meta = old.state_dict()
    with pytest.raises(
        ValueError,
        match=r"^checkpoint: its optimizer has 2 parameter groups, this trainer's 3: .*"
        r"TrainConfig\(decoder_init='random'\)\)$",
    ):
        Trainer(cfg, TrainConfig(batch_tokens=64, tokens=256)).load_state_dict(tensors, meta)
    again = Trainer(cfg, TrainConfig(batch_tokens=64, tokens=256, decoder_init="random"))
    again.load_state_dict(tensors, meta)
    assert again.steps == 1 and torch.equal(again.sae.W_enc, old.sae.W_enc)


def test_a_cross_layer_transcoders_data_rows_are_sample_pairs_per_layer_block():
    """decoder_init "data" on a cross-layer transcoder: block l's latents start at the distinct pairs
    of their own draw of the sample (one randperm per block, in layer order): the encoder row reads
    x_l - its centre, the decoder row writes y - b_pre on layers l .. L and zero on the earlier ones
    (which stay zero after a step); one least-squares factor on the encoder."""
    g = torch.Generator().manual_seed(4)
    L, d, m = 3, 8, 40
    x = torch.randn(384, L * d, generator=g) + 1.0
    y = torch.tanh(x @ torch.randn(L * d, L * d, generator=g))
    rows = torch.cat([x, y], 1)
    cfg = SAEConfig(d, L * m, 3, transcoder=True, cross_layer=L)
    t = Trainer(cfg, TrainConfig(batch_tokens=64, tokens=256, seed=3, decoder_init="data"))
    t.initialize(rows)
    sae = t.sae
    draws = torch.Generator().manual_seed(3)
    with torch.no_grad():
        x_norm, y_norm = sae.normalize(x)[0], sae.normalize_target(y)[0]
        centre = geometric_median(x_norm)
        factor = sae.W_enc.norm(dim=1)
        for layer in range(L):
            order = torch.randperm(len(x), generator=draws)
            cols = slice(layer * d, (layer + 1) * d)
            reads = torch.nn.functional.normalize((x_norm[order] - centre)[:, cols], dim=1)
            kept = greedy_distinct(reads, m, TRANSCODER_DISTINCT_COS, 2048)
            writes = (y_norm[order][kept] - sae.b_pre).clone()
            writes[:, : layer * d] = 0
            block = slice(layer * m, layer * m + len(kept))
            assert len(kept) > d
            torch.testing.assert_close(sae.W_dec[block], torch.nn.functional.normalize(writes, dim=1))
            torch.testing.assert_close(sae.W_enc[block] / factor[block, None], reads[kept])
    assert torch.allclose(factor, factor[0].expand_as(factor), rtol=1e-5)
    torch.testing.assert_close(sae.b_enc, -sae.preactivations(centre[None])[0])
    t.step(rows[:64])
    for layer in range(1, L):  # a later block's latents write nothing into earlier layers
        assert not sae.W_dec[layer * m : (layer + 1) * m, : layer * d].any()


def test_a_cross_layer_blocks_sinks_are_those_of_its_own_layer():
    """Block l's sink latents are the pairs whose target on layer l is massive: sinks planted in layer
    1's output start block 1's first latents, sized as a one-layer transcoder's; block 0, which also
    writes layer 1, and block 2 have none (their latents keep the one least-squares factor)."""
    g = torch.Generator().manual_seed(4)
    L, d, m = 3, 8, 40
    x = torch.randn(384, L * d, generator=g) + 1.0
    y = torch.tanh(x @ torch.randn(L * d, L * d, generator=g))
    sinks = torch.tensor([9, 100, 250])
    x[sinks, d : 2 * d] = 1.0 + 20.0 * torch.eye(d)[[1, 4, 6]]
    y[sinks, d : 2 * d] = 300.0 * torch.nn.functional.normalize(torch.randn(3, d, generator=g), dim=1)
    cfg = SAEConfig(d, L * m, 3, transcoder=True, cross_layer=L)
    t = Trainer(cfg, TrainConfig(batch_tokens=64, tokens=256, seed=3))  # decoder_init unset: data
    t.initialize(torch.cat([x, y], 1))
    sae = t.sae
    draws = torch.Generator().manual_seed(3)
    orders = [torch.randperm(len(x), generator=draws) for _ in range(L)]  # one draw per block
    drawn_sinks = [i for i in orders[1].tolist() if i in sinks.tolist()]
    with torch.no_grad():
        x_norm, y_norm = sae.normalize(x)[0], sae.normalize_target(y)[0]
        own = slice(d, 2 * d)
        pre = x_norm[drawn_sinks][:, own] @ sae.W_enc[m : m + 3].T + sae.b_enc[m : m + 3]
        writes = y_norm[drawn_sinks] - sae.b_pre
        writes[:, :d] = 0  # block 1 writes nothing into layer 0
        torch.testing.assert_close(pre.diagonal(), SINK_GATE * writes.norm(dim=1))
        torch.testing.assert_close(sae.W_dec[m : m + 3], torch.nn.functional.normalize(writes, dim=1))
        norms = sae.W_enc.norm(dim=1)
        rest = torch.cat([norms[:m], norms[m + 3 :]])
        assert torch.allclose(rest, rest[0].expand_as(rest), rtol=1e-5)
        assert (norms[m : m + 3] > 2 * rest[0]).all()  # sized to the sinks, not the fit


def test_a_cross_layer_encoder_of_data_rows_steps_at_the_lr_of_its_own_width():
    """A cross-layer transcoder's lr is capped for its L d-wide decoder rows (0.35 / sqrt(L d), halved
    for a transcoder); under decoder_init "data" its d-wide encoder rows step by their own width's cap,
    sqrt(L) x that, times min(1, their mean norm). One-layer coders and a set lr keep the ratio 1."""
    L, d = 2, 64
    cfg = SAEConfig(d, 64, 4, transcoder=True, cross_layer=L)
    tcfg = TrainConfig(batch_tokens=64, tokens=256, decoder_init="data")
    t = Trainer(cfg, tcfg)
    assert t.base_lr == pytest.approx(0.5 * 0.35 / math.sqrt(L * d))
    assert tcfg.encoder_lr_ratio(cfg) == pytest.approx(math.sqrt(L))
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(256, 2 * L * d, generator=g)
    t.initialize(rows)
    scale = min(1.0, t.sae.W_enc.norm(dim=1).mean().item())
    t.step(rows[:64])
    (encoder,) = [group for group in t.opt.param_groups if group.get("encoder")]
    assert encoder["lr"] == pytest.approx(0.5 * 0.35 / math.sqrt(d) * scale * lr_factor(tcfg, 0))  # warming up
    assert TrainConfig(lr=1e-3).encoder_lr_ratio(cfg) == 1.0
    assert tcfg.encoder_lr_ratio(SAEConfig(d, 64, 4, transcoder=True)) == 1.0


def test_an_unknown_decoder_init_is_refused_in_one_line():
    with pytest.raises(ValueError, match="^decoder_init must be 'random' or 'data', got 'kmeans'$"):
        TrainConfig(decoder_init="kmeans")  # type: ignore[arg-type]
