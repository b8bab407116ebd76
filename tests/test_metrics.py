import pytest
import torch
from torch import nn

from sae.config import SAEConfig
from sae.evaluate import ablation_sparsity, downstream_metrics, reconstruction_metrics
from sae.lm import load_lm
from sae.metrics import ablation_sparsity_score, kl_divergence, next_token_ce
from sae.model import TopKSAE


def test_normalized_mse_is_one_for_the_mean_predictor():
    x = torch.randn(500, 8, dtype=torch.float64) * 3 + 1
    sae = TopKSAE(SAEConfig(8, 16, 2, normalization="none")).double()
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_pre.copy_(x.mean(0))
    m = reconstruction_metrics(sae, x.split(128), progress=False)
    assert m["normalized_mse"] == pytest.approx(1.0, abs=1e-12)
    assert m["fraction_variance_explained"] == pytest.approx(0.0, abs=1e-12)


def test_reconstruction_metrics_against_dense_computation():
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(8, 40, 3)).double()
    x = torch.randn(300, 8, dtype=torch.float64)
    m = reconstruction_metrics(sae, x.split(64), progress=False)
    xn = (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-5)
    pre = (xn - sae.b_pre) @ sae.W_enc.T
    top = pre.topk(3, dim=1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    recon = z @ sae.W_dec + sae.b_pre
    expected = (xn - recon).pow(2).sum() / (xn - xn.mean(0)).pow(2).sum()
    assert m["normalized_mse"] == pytest.approx(expected.item(), rel=1e-10)
    assert m["l0"] == pytest.approx((z > 0).sum(1).double().mean().item())
    fired = (z > 0).any(0)
    assert m["dead_fraction"] == pytest.approx(1 - fired.double().mean().item())
    assert m["dense_fraction"] == pytest.approx(((z > 0).double().mean(0) > 0.1).double().mean().item())


def test_next_token_ce_and_kl_reference():
    logits = torch.randn(2, 5, 7)
    tokens = torch.randint(7, (2, 5))
    manual = torch.stack([-(logits[b, t].log_softmax(-1)[tokens[b, t + 1]]) for b in range(2) for t in range(4)]).view(
        2, 4
    )
    assert torch.allclose(next_token_ce(logits, tokens), manual, atol=1e-6)
    assert torch.allclose(kl_divergence(logits, logits), torch.zeros(2, 5), atol=1e-6)
    other = torch.randn(2, 5, 7)
    p, q = logits.softmax(-1), other.softmax(-1)
    assert torch.allclose(kl_divergence(logits, other), (p * (p / q).log()).sum(-1), atol=1e-5)


def test_identity_splice_changes_nothing(tiny_model_dir):
    model, _ = load_lm(str(tiny_model_dir), "float32", "cpu")
    ids = torch.randint(3, model.config.vocab_size, (6, 10), generator=torch.Generator().manual_seed(0))
    m = downstream_metrics(nn.Identity(), model, ids, "model.layers.1", 1, torch.zeros(32), 4, progress=False)
    assert m["ce_increase"] == pytest.approx(0.0, abs=1e-6)
    assert m["kl_divergence"] == pytest.approx(0.0, abs=1e-6)
    assert m["loss_recovered_vs_zero"] == pytest.approx(1.0, abs=1e-5)
    assert m["ce_zero_ablation"] != pytest.approx(m["ce_clean"])


def test_ablation_sparsity_score_extremes():
    T, V = 4, 50
    single = torch.zeros(T, V)
    single[2, 7] = 3.0
    assert ablation_sparsity_score(single).item() == pytest.approx(1 / (T * V))
    spread = torch.tensor([1.0] * 25 + [-1.0] * 25 + [0.0]).repeat(T, 1)  # median 0; 50 of 51 entries changed
    assert ablation_sparsity_score(spread).item() == pytest.approx((T * 50) / (T * 51))
    shifted = single + 5.0  # a constant shift per position is removed by the median
    assert ablation_sparsity_score(shifted).item() == pytest.approx(1 / (T * V))


def test_ablation_sparsity_runs_on_a_model(tiny_model_dir):
    model, _ = load_lm(str(tiny_model_dir), "float32", "cpu")
    sae = TopKSAE(SAEConfig(32, 64, 4))
    ids = torch.randint(3, model.config.vocab_size, (5, 20), generator=torch.Generator().manual_seed(1))
    m = ablation_sparsity(sae, model, ids, "model.layers.1", 1, window=8)
    assert 0 < m["ablation_sparsity"] <= 1 and m["ablation_sparsity_samples"] <= 5
    with torch.no_grad():  # no latent fires: every pre-activation is 0
        sae.W_enc.zero_()
    silent = ablation_sparsity(sae, model, ids, "model.layers.1", 1, window=8)
    assert silent == {"ablation_sparsity_samples": 0.0, "ablation_sparsity_window": 8.0}


def test_progressive_codes_against_dense_computation():
    torch.manual_seed(1)
    sae = TopKSAE(SAEConfig(8, 40, 3, normalization="none")).double()
    x = torch.randn(200, 8, dtype=torch.float64)
    m = reconstruction_metrics(sae, x.split(50), progress=False)
    pre = (x - sae.b_pre) @ sae.W_enc.T
    for k in (1, 6, 12):  # k/2, 2k, 4k
        top = pre.topk(k, dim=1)
        z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
        expected = (x - z @ sae.W_dec - sae.b_pre).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        assert m[f"normalized_mse_k{k}"] == pytest.approx(expected.item(), rel=1e-10)


def test_ablation_baselines_against_manual_forward(tiny_model_dir):
    from sae.lm import logits, replaced

    model, _ = load_lm(str(tiny_model_dir), "float32", "cpu")
    ids = torch.randint(3, model.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(2))
    mean = torch.randn(32)
    m = downstream_metrics(nn.Identity(), model, ids, "model.layers.1", 1, mean, 2, progress=False)
    expected = {}
    for name, fill in (("zero", torch.zeros(32)), ("mean", mean)):

        def fn(h, _x, fill=fill):
            out = h.clone()
            out[:, 1:] = fill  # position 0 keeps its clean activation
            return out

        with replaced(model, "model.layers.1", fn):
            expected[name] = next_token_ce(logits(model, ids), ids).mean().item()
    clean = next_token_ce(logits(model, ids), ids).mean().item()
    assert m["ce_zero_ablation"] == pytest.approx(expected["zero"], rel=1e-5)
    assert m["ce_mean_ablation"] == pytest.approx(expected["mean"], rel=1e-5)
    assert m["loss_recovered_vs_mean"] == pytest.approx((expected["mean"] - clean) / (expected["mean"] - clean))
