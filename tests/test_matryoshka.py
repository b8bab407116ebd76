"""Matryoshka SAEs (Bussmann et al. 2025): the loss sums the reconstruction losses of nested latent
prefixes; each term equals the plain loss of the dictionary cut to that prefix, checked against a
dense reference; the spec refuses bad group sizes in one line; plain SAEs keep their keys."""

import pytest
import torch
import yaml

from flows.cli import main
from flows.spec import load_spec
from sae import SAEConfig, TopKSAE, TrainConfig, train_sae
from sae.loss import matryoshka_terms, sae_loss

GROUPS = (8, 16, 24)  # prefixes of 8, 24 and 48 latents


def _sae(activation: str = "topk") -> TopKSAE:
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(12, 48, 5, activation=activation, matryoshka=GROUPS))  # type: ignore[arg-type]
    with torch.no_grad():
        sae.b_pre.normal_()
    return sae


def _dense(values, indices, n: int) -> torch.Tensor:
    """The (B, n) code the sparse one stands for."""
    return torch.zeros(values.shape[0], n).scatter_add(1, indices, values)


def _reference_terms(code, sae: TopKSAE, x, scale: float) -> list[torch.Tensor]:
    """Each prefix's loss as a plain SAE cut to its first `end` latents would compute it."""
    return [
        ((x - (code[:, :end] @ sae.W_dec[:end] + sae.b_pre)) ** 2).sum(-1).mean() * scale
        for end in sae.cfg.prefix_ends()
    ]


def test_each_prefix_term_is_the_plain_loss_of_the_dictionary_cut_to_it():
    sae = _sae()
    x = torch.randn(64, 12)
    values = torch.rand(64, 5, requires_grad=True)
    indices = torch.stack([torch.randperm(48)[:5] for _ in range(64)])
    assert sae.cfg.prefix_ends() == [8, 24, 48]
    terms = matryoshka_terms(values, indices, sae, x, 0.7)
    reference = _reference_terms(_dense(values, indices, 48), sae, x, 0.7)
    assert len(terms) == 3
    for (_, term), ref in zip(terms, reference):
        assert term.item() == pytest.approx(ref.item(), rel=1e-5)
    assert terms[0][1].item() != pytest.approx(terms[-1][1].item(), rel=1e-3)  # the prefixes differ
    # and their gradients, for the decoder and for the codes
    got = torch.autograd.grad(sum(t for _, t in terms), [values, sae.W_dec])
    want = torch.autograd.grad(sum(reference), [values, sae.W_dec])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_the_ragged_batchtopk_code_gives_the_same_terms():
    sae = _sae("batchtopk")
    x = torch.randn(32, 12)
    rows = torch.arange(32).repeat_interleave(3)
    cols = torch.randint(0, 48, (96,))
    values = torch.rand(96)
    terms = matryoshka_terms(values, cols, sae, x, 1.0, rows)
    code = torch.zeros(32, 48).index_put_((rows, cols), values, accumulate=True)
    for (_, term), ref in zip(terms, _reference_terms(code, sae, x, 1.0)):
        assert term.item() == pytest.approx(ref.item(), rel=1e-5)


def test_the_loss_sums_the_prefixes_and_reports_the_whole_dictionary():
    sae = _sae()
    x = torch.randn(64, 12)
    parts = sae_loss(sae, x, 0.5, TrainConfig(batch_tokens=64, tokens=64))
    reference = _reference_terms(_dense(parts.values, parts.indices, 48), sae, x, 0.5)
    assert parts.loss.item() == pytest.approx(sum(r.item() for r in reference), rel=1e-5)
    assert parts.mse.item() == pytest.approx(reference[-1].item(), rel=1e-5)


def test_a_matryoshka_sae_trains_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(4096, 12)
    result = train_sae(
        SAEConfig(12, 48, 4, matryoshka=GROUPS), TrainConfig(batch_tokens=256, tokens=4096), x, progress=False
    )
    assert all(torch.isfinite(p).all() for p in result.sae.parameters())
    result.sae.save(tmp_path / "m")
    loaded = TopKSAE.load(tmp_path / "m")
    assert loaded.cfg.matryoshka == GROUPS and loaded.cfg == result.sae.cfg
    plain = SAEConfig(12, 48, 4)
    assert "matryoshka" not in plain.to_dict()  # a plain SAE's config reads as before


def _spec_file(tmp_path, tiny_model_dir, text_dir, **sae):
    body = {
        "name": "m",
        "model": {"source": str(tiny_model_dir)},
        "data": {"source": str(text_dir), "context_length": 16, "tokens": 1000},
        "hookpoints": ["model.layers.1"],
        "sae": {"n_latents": 48, "k": 4, **sae},
        "train": {"batch_tokens": 256},
        "workdir": str(tmp_path / "work"),
    }
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.mark.parametrize(
    ("groups", "says"),
    [
        ([16, 48], "sum to 64, not to the 48 latents"),
        ([24, 16, 8], "must not decrease"),
        ([48], "one group is a plain SAE"),
    ],
)
def test_bad_group_sizes_are_refused_in_one_line(groups, says, tiny_model_dir, text_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match=says):
        SAEConfig(12, 48, 4, matryoshka=tuple(groups))
    path = _spec_file(tmp_path, tiny_model_dir, text_dir, matryoshka=groups)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sae.matryoshka" in err[0] and says in err[0]
    assert not (tmp_path / "work").exists()  # refused before anything was computed


def test_plain_specs_keep_their_keys_and_matryoshka_ones_get_their_own(tiny_model_dir, text_dir, tmp_path):
    def spec(**sae):
        return load_spec(_spec_file(tmp_path, tiny_model_dir, text_dir, **sae))

    plain, unset, nested = spec(), spec(matryoshka=None), spec(matryoshka=[16, 32])
    assert plain.part_hash("sae", "train") == unset.part_hash("sae", "train")
    assert nested.part_hash("sae", "train") != plain.part_hash("sae", "train")
    assert nested.sae_config(32).matryoshka == (16, 32) and plain.sae_config(32).matryoshka == ()


def test_the_ramp_opens_the_groups_one_by_one():
    from sae.loss import matryoshka_open

    ends = (32, 96, 256)
    opened = [matryoshka_open(ends, 0.3, p) for p in (0.0, 0.149, 0.15, 0.299, 0.3, 0.9)]
    assert opened == [32, 32, 96, 96, 256, 256]
    assert matryoshka_open(ends, 0.0, 0.0) == 256  # no ramp: all from the start
    assert matryoshka_open((8, 24), 0.5, 0.49) == 8 and matryoshka_open((8, 24), 0.5, 0.5) == 24


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_latents_not_yet_open_are_latents_that_cannot_fire(activation):
    """The loss with the first `open` latents open equals the plain loss of a copy whose other latents'
    encoder biases are far below any pre-activation (they never enter the selection)."""
    from sae.config import TrainConfig
    from sae.loss import NO_DEAD, sae_loss

    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(10, 24, 3, matryoshka=(8, 16), activation=activation))
    x = torch.randn(32, 10)
    tcfg = TrainConfig(batch_tokens=32)
    ramped = sae_loss(sae, x, 1.0, tcfg, NO_DEAD, open_latents=8)
    closed = TopKSAE(sae.cfg)
    closed.load_state_dict(sae.state_dict())
    with torch.no_grad():
        closed.b_enc[8:] = -1e6
    plain = sae_loss(closed, x, 1.0, tcfg, NO_DEAD)
    assert (ramped.indices < 8).all()
    torch.testing.assert_close(ramped.loss, plain.loss)
    everything = sae_loss(sae, x, 1.0, tcfg, NO_DEAD)
    assert (everything.indices >= 8).any() and not torch.allclose(everything.loss, ramped.loss)


def test_a_ramped_run_keeps_later_groups_silent_and_alive_until_they_open():
    from sae.config import TrainConfig
    from sae.train import Trainer

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64 * 20, 10, generator=g)
    cfg = SAEConfig(10, 24, 3, matryoshka=(8, 16))
    trainer = Trainer(cfg, TrainConfig(batch_tokens=64, tokens=64 * 20, matryoshka_ramp=0.5, dead_tokens=64))
    trainer.initialize(x)
    start = trainer.sae.W_enc.detach().clone()
    for i in range(10):  # the first half: only the first group is open
        trainer.step(x[i * 64 : (i + 1) * 64])
        assert trainer.open_latents == 8
        assert (trainer.tracker.tokens_since_fired[8:] == 0).all()  # never counted dead, so AuxK leaves them
    # no gradient reached them: only the averaging's rounding moves them
    torch.testing.assert_close(trainer.sae.W_enc.detach()[8:], start[8:], rtol=0, atol=1e-6)
    assert (trainer.sae.W_enc.detach()[:8] - start[:8]).abs().max() > 1e-3  # while the open ones trained
    fired = torch.zeros(24, dtype=torch.bool)
    for i in range(10, 20):
        parts = trainer.step(x[i * 64 : (i + 1) * 64])
        fired[parts.indices[parts.values > 0]] = True
    assert trainer.open_latents == 24 and fired[8:].any()


def test_a_ramp_is_refused_without_matryoshka_and_outside_zero_to_one():
    from sae.config import TrainConfig
    from sae.train import Trainer

    with pytest.raises(ValueError, match="matryoshka_ramp must be in \\[0, 1\\)"):
        TrainConfig(matryoshka_ramp=1.0)
    with pytest.raises(ValueError, match="train.matryoshka_ramp: only for a Matryoshka SAE"):
        Trainer(SAEConfig(10, 24, 3), TrainConfig(tokens=64, matryoshka_ramp=0.3))


def test_a_spec_ramp_needs_matryoshka_reaches_the_trainer_and_keys_only_when_set(
    tiny_model_dir, text_dir, tmp_path, capsys
):
    path = _spec_file(tmp_path, tiny_model_dir, text_dir, matryoshka_ramp=0.3)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sae.matryoshka_ramp belongs to a Matryoshka SAE" in err[0]
    assert not (tmp_path / "work").exists()
    nested = load_spec(_spec_file(tmp_path, tiny_model_dir, text_dir, matryoshka=[16, 32]))
    ramped = load_spec(_spec_file(tmp_path, tiny_model_dir, text_dir, matryoshka=[16, 32], matryoshka_ramp=0.3))
    assert (
        ramped.train_config(1000, "cpu").matryoshka_ramp == 0.3
        and nested.train_config(1000, "cpu").matryoshka_ramp == 0
    )
    assert ramped.part_hash("sae", "train") != nested.part_hash("sae", "train")
    unset = load_spec(_spec_file(tmp_path, tiny_model_dir, text_dir, matryoshka=[16, 32], matryoshka_ramp=None))
    assert unset.part_hash("sae", "train") == nested.part_hash("sae", "train")
