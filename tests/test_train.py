import itertools

import pytest
import torch

from sae.config import SAEConfig, TrainConfig
from sae.geometric_median import geometric_median
from sae.kernels import mask_indices
from sae.model import TopKSAE
from sae.train import DeadLatentTracker, Trainer, project_decoder_grad, renormalize_decoder, train_sae


def test_gradient_projection_removes_parallel_component():
    sae = TopKSAE(SAEConfig(8, 32, 4)).double()
    renormalize_decoder(sae)  # unit norm in float64
    sae.W_dec.grad = torch.randn(32, 8, dtype=torch.float64)
    before = sae.W_dec.grad.clone()
    project_decoder_grad(sae)
    for w, g0, g in zip(sae.W_dec.detach(), before, sae.W_dec.grad):
        projector = torch.eye(8, dtype=torch.float64) - torch.outer(w, w)  # w has unit norm
        assert torch.allclose(g, projector @ g0)
        assert abs(float(g @ w)) < 1e-12


def test_decoder_rows_unit_norm_after_a_step():
    sae = TopKSAE(SAEConfig(8, 32, 4))
    opt = torch.optim.Adam(sae.parameters(), lr=0.1)
    sae(torch.randn(16, 8)).pow(2).sum().backward()
    project_decoder_grad(sae)
    opt.step()
    assert not torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-4)
    renormalize_decoder(sae)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-6)


def test_geometric_median_matches_brute_force():
    torch.manual_seed(0)
    pts = torch.cat([torch.randn(30, 2), torch.randn(5, 2) * 10 + 20]).double()  # outliers pull the mean
    gm = geometric_median(pts)

    def cost(y):
        return (pts - y).norm(dim=1).sum().item()

    # brute force: a coarse grid, then a fine grid around its best cell
    best = min(itertools.product(torch.linspace(-5, 25, 301), repeat=2), key=lambda p: cost(torch.tensor(p)))
    cx, cy = float(best[0]), float(best[1])
    fine = itertools.product(torch.linspace(cx - 0.1, cx + 0.1, 101), torch.linspace(cy - 0.1, cy + 0.1, 101))
    best_cost = min(cost(torch.tensor(p, dtype=torch.float64)) for p in fine)
    assert cost(gm) <= best_cost + 1e-6
    assert cost(gm) < cost(pts.mean(0))


def test_dead_latent_counter_counts_tokens():
    tracker = DeadLatentTracker(torch.zeros(6, dtype=torch.long), dead_tokens=10, threshold=1e-3)
    values = torch.tensor([[1.0, 0.0], [0.5, 1e-4]])
    indices = torch.tensor([[0, 1], [2, 3]])
    for _ in range(5):
        tracker.update(values, indices)
    # latents 0 and 2 fired every batch; 1 (zero) and 3 (below threshold) never did: 5 batches x 2 tokens
    assert tracker.tokens_since_fired.tolist() == [0, 10, 0, 10, 10, 10]
    assert tracker.dead_mask().tolist() == [False, True, False, True, True, True]


def test_the_trainer_counts_the_dead_latents_for_auxk_and_skips_it_while_none_is():
    """AuxK costs about what the main TopK does: the trainer counts the dead latents, skips AuxK
    while there are none and multiplies their rows alone when there are (at most aux_k picks)."""
    tcfg = TrainConfig(batch_tokens=64, tokens=64 * 20, dead_tokens=128, aux_k=8, log_every=1000)
    trainer = Trainer(SAEConfig(16, 64, 4), tcfg)
    x = torch.randn(64 * 20, 16, generator=torch.Generator().manual_seed(0))
    trainer.initialize(x)
    assert trainer.dead_count() == 0  # before dead_tokens tokens nothing can be dead
    trainer.step(x[:64])
    trainer.step(x[64:128])
    counters = trainer.tracker.tokens_since_fired
    for i, dead in enumerate((0, 3, 20)):
        counters.zero_()
        counters[torch.randperm(64, generator=torch.Generator().manual_seed(i))[:dead]] = tcfg.dead_tokens
        assert trainer.dead_count() == dead
        parts = trainer.step(x[128 + 64 * i : 192 + 64 * i])
        assert (parts.aux.item() > 0.0) == (dead > 0), (dead, parts.aux.item())


@pytest.mark.parametrize("n, count", [(1, 0), (1, 1), (50, 0), (50, 7), (50, 50)])
def test_mask_indices_are_the_masks_true_positions(n, count):
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=torch.Generator().manual_seed(count))[:count]] = True
    assert torch.equal(mask_indices(mask, count), mask.nonzero().squeeze(1))


def planted_data(n_tokens, d, n_features, active, seed):
    """Tokens that are sparse non-negative combinations of a known unit-norm dictionary."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(n_features, d, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    idx = torch.rand(n_tokens, n_features, generator=g).argsort(dim=1)[:, :active]
    mags = torch.rand(n_tokens, active, generator=g) + 0.5
    codes = torch.zeros(n_tokens, n_features).scatter_(1, idx, mags)
    return codes @ dictionary, dictionary


def train_on_planted(n_tokens: int, precision: str):
    """As many latents as true features; returns (fraction of features recovered at cos > 0.9, result)."""
    d, n_true, active, batch = 32, 64, 4, 256
    x, dictionary = planted_data(n_tokens, d, n_true, active, seed=1)

    def batches():
        g = torch.Generator().manual_seed(2)
        while True:
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x) - batch + 1, batch):
                yield x[perm[i : i + batch]]

    cfg = SAEConfig(d, n_true, active, normalization="none")
    # the default optimizer and lr, on a constant schedule: this checks the numerics (fp32, bf16)
    tcfg = TrainConfig(
        batch_tokens=batch,
        tokens=2_000_000 if precision == "fp32" else 1_000_000,
        lr_warmup_tokens=0,
        lr_decay="constant",
        dead_tokens=20_000,
        aux_k=16,
        log_every=1000,
        precision=precision,
    )
    result = train_sae(cfg, tcfg, batches(), x[:8192], progress=False)
    cos = dictionary @ result.sae.W_dec.T  # (true features, learned latents)
    return (cos.max(dim=1).values > 0.9).float().mean().item(), result


def test_planted_dictionary_is_recovered():
    """Tied init, AuxK and the decoder constraint must find every true feature."""
    recovered, result = train_on_planted(60_000, "fp32")
    assert recovered >= 0.95, recovered
    assert result.dead_fraction < 0.01


def test_weight_ema_is_bias_corrected():
    decay = 0.6
    tcfg = TrainConfig(batch_tokens=32, tokens=96, lr=1e-2, ema_decay=decay, dead_tokens=10**6)
    trainer = Trainer(SAEConfig(8, 32, 4), tcfg)
    x = torch.randn(96, 8, generator=torch.Generator().manual_seed(0))
    trainer.initialize(x)
    seen = []
    for i in range(3):
        trainer.step(x[i * 32 : (i + 1) * 32])
        seen.append(trainer.sae.W_dec.detach().clone())
    # EMA from zero, divided by (1 - decay^t): weights (1-d) d^(t-1-i) on step i, normalised
    weights = torch.tensor([(1 - decay) * decay ** (2 - i) for i in range(3)])
    expected = sum(w * s for w, s in zip(weights, seen)) / (1 - decay**3)
    assert torch.allclose(trainer.ema_sae().W_dec, expected, atol=1e-6)
    assert torch.allclose(weights.sum() / (1 - decay**3), torch.tensor(1.0))
    assert trainer.final_sae() is not trainer.sae


def test_milestones_score_the_sae_as_it_stands_and_survive_a_resume():
    """train_saes scores each trainer's returned SAE when the run passes a milestone; a run restored
    from a checkpoint between milestones ends with the same list as an uninterrupted one."""
    from sae.train import milestone_tokens, train_saes

    assert milestone_tokens(4096, 3, 256) == [512, 1024, 2048]
    assert milestone_tokens(1000, 4, 256) == [256, 500]  # at least one batch, each once
    x = torch.randn(8 * 256, 16, generator=torch.Generator().manual_seed(0)) + 1
    cfg, tcfg = SAEConfig(16, 64, 4), TrainConfig(batch_tokens=256, tokens=8 * 256)

    def score(sae):
        return {"decoder_sum": float(sae.W_dec.detach().sum())}

    def fresh():
        trainer = Trainer(cfg, tcfg)
        trainer.initialize(x)
        return trainer

    whole = fresh()
    train_saes([whole], x.split(256), progress=False, milestones=[512, 1200], evaluate=score)
    assert [m["tokens"] for m in whole.milestones] == [512, 1280]  # the first step at or past each
    by_hand = fresh()
    for batch in x.split(256)[:2]:
        by_hand.step(batch)
    assert whole.milestones[0]["decoder_sum"] == score(by_hand.final_sae())["decoder_sum"]
    # stop after 3 steps, checkpoint, restore into a new trainer and finish
    first = fresh()
    with pytest.warns(UserWarning, match="ran out"):
        train_saes([first], x.split(256)[:3], progress=False, milestones=[512, 1200], evaluate=score)
    resumed = Trainer(cfg, tcfg)
    resumed.load_state_dict(*first.state_dict())
    train_saes([resumed], x.split(256)[3:], progress=False, milestones=[512, 1200], evaluate=score)
    assert resumed.milestones == whole.milestones


def test_training_inside_no_grad_trains_as_outside():
    """A caller's torch.no_grad() (e.g. around an evaluation loop) does not reach the training step."""
    x = torch.randn(2048, 16, generator=torch.Generator().manual_seed(0))
    cfg, tcfg = SAEConfig(16, 32, 4), TrainConfig(batch_tokens=256, tokens=2048, seed=0)
    outside = train_sae(cfg, tcfg, x, progress=False).sae
    with torch.no_grad():
        inside = train_sae(cfg, tcfg, x, progress=False).sae
    assert torch.equal(inside.W_dec, outside.W_dec) and torch.equal(inside.W_enc, outside.W_enc)
    with torch.no_grad():  # it trained: better than predicting the mean
        assert ((inside(x) - x) ** 2).sum() < 0.9 * ((x - x.mean(0)) ** 2).sum()


def test_a_milestone_of_a_longer_run_is_the_shorter_run():
    """With settings that do not depend on the budget (a fixed lr, sign descent's constant schedule
    after the same 4-step warmup: runs of 8 steps or more), the SAE scored at a milestone of a longer
    run equals the SAE of a run stopped there: what lets benchmarks/quality.py score several budgets
    from one run."""
    x = torch.randn(4096, 16, generator=torch.Generator().manual_seed(1))
    cfg = SAEConfig(16, 32, 4)
    seen = []
    long = TrainConfig(batch_tokens=256, tokens=4096, lr=0.01, seed=0)
    train_sae(cfg, long, x, progress=False, milestones=[2100], evaluate=lambda sae: seen.append(sae) or {})
    short = train_sae(cfg, TrainConfig(batch_tokens=256, tokens=2100, lr=0.01, seed=0), x, progress=False).sae
    assert len(seen) == 1
    assert torch.equal(seen[0].W_dec, short.W_dec) and torch.equal(seen[0].W_enc, short.W_enc)
