"""The sparse SAE against a dense reference written directly from the paper's equations."""

import pytest
import torch

from sae.config import SAEConfig, TrainConfig
from sae.kernels import topk_encode
from sae.loss import DeadLatents, sae_loss
from sae.model import TopKSAE


def dense_reference_loss(sae, x_norm, mse_scale, tcfg, dead):
    """z = ReLU(TopK(W_enc (x - b_pre) + b_enc)) as a dense masked vector; x_hat = z W_dec + b_pre."""
    pre = (x_norm - sae.b_pre) @ sae.W_enc.T
    if sae.b_enc is not None:
        pre = pre + sae.b_enc

    def keep_top(p, k):
        mask = torch.zeros_like(p, dtype=torch.bool).scatter(1, p.topk(k, dim=1).indices, True)
        return torch.where(mask, p.relu(), torch.zeros_like(p))

    def err(target, recon):
        return (target - recon).pow(2).sum(1).mean() * mse_scale

    k = sae.cfg.k
    recon = keep_top(pre, k) @ sae.W_dec + sae.b_pre
    loss = err(x_norm, recon)
    if tcfg.multi_topk:
        loss = loss + err(x_norm, keep_top(pre, 4 * k) @ sae.W_dec + sae.b_pre) / 8
    n_dead = int(dead.sum())
    if n_dead:
        aux_pre = pre.masked_fill(~dead, float("-inf"))
        z_aux = keep_top(aux_pre, min(tcfg.aux_k, n_dead)).nan_to_num(0.0)
        if tcfg.resolved_decoder_init(sae.cfg) == "data":  # the latents that fired in the batch add nothing
            z_aux = z_aux * ~(keep_top(pre, k) > 0).any(0)
        loss = loss + tcfg.aux_coef * err(x_norm - recon.detach(), z_aux @ sae.W_dec)
    return loss


def make_sae(bias=True, n=96, d=12, k=5, seed=0):
    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(d, n, k, encoder_bias=bias)).double()
    with torch.no_grad():
        sae.b_pre.normal_()
        if bias:
            sae.b_enc.normal_(std=0.1)
    return sae


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("multi_topk", [False, True])
@pytest.mark.parametrize("n_dead", [0, 3, 40])
@pytest.mark.parametrize("picks", ["counted", "fixed"])
@pytest.mark.parametrize("init", ["data", "random"])
def test_loss_and_gradients_match_dense_reference(bias, multi_topk, n_dead, picks, init):
    """AuxK as the trainer runs it (the dead latents counted: their rows alone, at most aux_k picks)
    and as a CUDA graph replays it (aux_k picks over the mask, zero beyond the dead latents): both
    are the dense reference, with (data rows) or without (random rows) the fired latents left out."""
    sae = make_sae(bias)
    x = torch.randn(33, 12, dtype=torch.float64)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[torch.randperm(96)[:n_dead]] = True
    tcfg = TrainConfig(aux_k=16, multi_topk=multi_topk, decoder_init=init)

    parts = sae_loss(sae, x, 0.7, tcfg, DeadLatents.counted(dead) if picks == "counted" else DeadLatents.masked(dead))
    parts.loss.backward()
    sparse_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    ref = dense_reference_loss(sae, x, 0.7, tcfg, dead)
    ref.backward()

    assert torch.allclose(parts.loss, ref, rtol=1e-10)
    for name, p in sae.named_parameters():
        assert torch.allclose(sparse_grads[name], p.grad, rtol=1e-8, atol=1e-10), name


def test_input_gradient_matches_dense():
    sae = make_sae()
    x = torch.randn(20, 12, dtype=torch.float64, requires_grad=True)
    values, indices, _, _ = topk_encode(x, sae.W_enc, sae.b_enc, 5)
    (values * torch.arange(5, dtype=torch.float64)).sum().backward()
    g_sparse = x.grad.clone()
    x.grad = None
    pre = x @ sae.W_enc.T + sae.b_enc
    top = pre.topk(5, dim=1)
    (top.values.relu() * torch.arange(5, dtype=torch.float64)).sum().backward()
    assert torch.allclose(g_sparse, x.grad)


def test_aux_selection_only_picks_dead_latents():
    sae = make_sae()
    x = torch.randn(50, 12, dtype=torch.float64)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[[3, 17, 40, 41, 90]] = True
    _, _, aux_values, aux_indices = topk_encode(x, sae.W_enc, sae.b_enc, 5, 5, dead)
    assert set(aux_indices.flatten().tolist()) <= {3, 17, 40, 41, 90}
    # they are the largest pre-activations among the dead ones
    pre = (x @ sae.W_enc.T + sae.b_enc)[:, dead]
    assert torch.allclose(aux_values.sort(dim=1).values, pre.relu().sort(dim=1).values)


def test_no_dead_latents_gives_zero_aux_loss():
    sae = make_sae()
    parts = sae_loss(
        sae,
        torch.randn(8, 12, dtype=torch.float64),
        1.0,
        TrainConfig(),
        DeadLatents.masked(torch.zeros(96, dtype=torch.bool)),
    )
    assert parts.aux.item() == 0.0 and torch.isfinite(parts.loss)


@pytest.mark.parametrize("mode", ["none", "standardize", "dataset_scale"])
def test_normalisation_round_trip(mode):
    sae = TopKSAE(SAEConfig(16, 64, 4, normalization=mode)).double()
    sae.input_scale.fill_(0.37)
    x = torch.randn(10, 16, dtype=torch.float64) * 5 + 3
    x_norm, stats = sae.normalize(x)
    if mode == "standardize":  # as the released code and SAELens: divided by std + eps, multiplied back by std
        mean, std = x.mean(1, keepdim=True), x.std(1, keepdim=True)
        assert torch.allclose(stats.undo(x_norm), mean + (x - mean) * std / (std + 1e-5), rtol=1e-12)
        assert torch.allclose(stats.undo(x_norm), x, atol=1e-4)
    else:
        assert torch.allclose(stats.undo(x_norm), x)
    if mode == "standardize":
        assert torch.allclose(x_norm.mean(1), torch.zeros(10, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(x_norm.std(1), torch.ones(10, dtype=torch.float64), atol=1e-4)


def test_code_has_k_entries_and_dense_matches():
    sae = make_sae()
    x = torch.randn(7, 12, dtype=torch.float64)
    codes = sae.encode(x)
    dense = codes.dense(96)
    assert codes.indices.shape == (7, 5)
    assert ((dense != 0).sum(1) <= 5).all()
    recon_dense = sae.normalize(x)[1].undo(dense @ sae.W_dec + sae.b_pre)
    assert torch.allclose(sae(x), recon_dense)


def test_init_is_tied_and_unit_norm():
    sae = TopKSAE(SAEConfig(20, 200, 8))
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(200), atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec)


def test_a_generator_seeds_the_init_and_an_unfilled_sae_draws_nothing():
    cfg = SAEConfig(20, 200, 8, encoder_bias=True)
    seeded = TopKSAE(cfg, generator=torch.Generator().manual_seed(3))
    reseeded = TopKSAE(cfg)
    reseeded.reset_parameters(torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(seeded.state_dict().values(), reseeded.state_dict().values()))
    before = torch.get_rng_state()
    unfilled = TopKSAE(cfg, fill=False)  # what a copy or a load overwrites: no random init drawn
    assert torch.equal(torch.get_rng_state(), before)
    unfilled.load_state_dict(seeded.state_dict())
    x = torch.randn(5, 20)
    assert torch.equal(unfilled(x), seeded(x))


def test_save_load_round_trip(tmp_path):
    sae = TopKSAE(SAEConfig(12, 48, 4, encoder_bias=True, normalization="dataset_scale"))
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.input_scale.fill_(2.5)
    sae.save(tmp_path / "s", metadata={"hookpoint": "h"})
    loaded = TopKSAE.load(tmp_path / "s")
    x = torch.randn(9, 12)
    assert loaded.cfg == sae.cfg and loaded.metadata == {"hookpoint": "h"}
    assert torch.equal(loaded(x), sae(x))
    assert not list((tmp_path / "s").glob("*.tmp"))


@pytest.mark.parametrize("n_dead", [0, 5, 60])
@pytest.mark.parametrize("init", ["data", "random"])
def test_batch_topk_loss_and_gradients_match_dense_reference(n_dead, init):
    torch.manual_seed(3)
    sae = TopKSAE(SAEConfig(12, 96, 5, encoder_bias=True, activation="batchtopk")).double()
    with torch.no_grad():
        sae.b_pre.normal_()
        sae.b_enc.normal_(std=0.1)
    x = torch.randn(21, 12, dtype=torch.float64)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[torch.randperm(96)[:n_dead]] = True
    tcfg = TrainConfig(aux_k=3, decoder_init=init)
    parts = sae_loss(sae, x, 0.3, tcfg, DeadLatents.counted(dead))
    parts.loss.backward()
    sparse_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()

    pre = (x - sae.b_pre) @ sae.W_enc.T + sae.b_enc
    keep = torch.zeros(pre.numel(), dtype=torch.bool)
    keep[pre.flatten().topk(5 * 21).indices] = True  # k x batch over the whole batch
    z = torch.where(keep.view_as(pre), pre.relu(), torch.zeros_like(pre))
    recon = z @ sae.W_dec + sae.b_pre
    ref = (x - recon).pow(2).sum(1).mean() * 0.3
    if n_dead:
        aux_pre = pre.masked_fill(~dead, float("-inf"))
        top = aux_pre.topk(3, dim=1)
        z_aux = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
        if init == "data":  # the latents that fired in the batch add nothing
            z_aux = z_aux * ~(z > 0).any(0)
        ref = ref + tcfg.aux_coef * (x - recon.detach() - z_aux @ sae.W_dec).pow(2).sum(1).mean() * 0.3
    ref.backward()
    assert torch.allclose(parts.loss, ref, rtol=1e-10)
    assert len(parts.values) == 5 * 21
    for name, p in sae.named_parameters():
        assert torch.allclose(sparse_grads[name], p.grad, rtol=1e-8, atol=1e-10), name


def test_batch_topk_threshold_drives_inference():
    from sae.train import Trainer

    torch.manual_seed(0)
    x = torch.randn(2048, 16) * torch.linspace(0.2, 3, 16)
    trainer = Trainer(SAEConfig(16, 64, 4, activation="batchtopk"), TrainConfig(batch_tokens=256, tokens=2048, lr=1e-2))
    trainer.initialize(x)
    for i in range(8):
        trainer.step(x[i * 256 : (i + 1) * 256])
    sae = trainer.sae
    assert sae.threshold > 0
    codes = sae.encode(x)
    kept = codes.values[codes.values > 0]
    assert (kept > sae.threshold).all()
    per_token = (codes.values > 0).sum(1).float()
    assert per_token.std() > 0 and 1 < per_token.mean() < 16  # variable per token, about k on average


@pytest.mark.parametrize("shape", [(40, 7), (40, 1), (1, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_sparse_products_equal_a_plain_sum_over_the_code(shape, dtype):
    """The CPU path of the sparse products (a CSR product for the weight gradient, AuxK's zero entries
    left out) against a plain float64 sum over every code entry: the decode, both of its gradients,
    and scatter_rows on a (B, k) code and on a ragged one. The code repeats latents within a row and
    holds zeros, as AuxK's padded and masked picks do."""
    from sae.kernels import scatter_rows, sparse_decode

    torch.manual_seed(1)
    (B, k), n, d = shape, 30, 9
    indices = torch.randint(0, n, (B, k))
    values = torch.randn(B, k, dtype=dtype) * (torch.rand(B, k) > 0.4)
    upstream = torch.randn(B, d, dtype=dtype)
    W = torch.randn(n, d, dtype=dtype, requires_grad=True)
    v = values.clone().requires_grad_()

    def plain_scatter(idx, weights, rows):  # sum over entries of weights[e] * outer(e_{idx[e]}, upstream[rows[e]])
        out = torch.zeros(n, d, dtype=torch.float64)
        for i, w, r in zip(idx.tolist(), weights.double().tolist(), rows.tolist()):
            out[i] += w * upstream[r].double()
        return out

    tokens = torch.arange(B)[:, None].expand(B, k).reshape(-1)
    want_W = plain_scatter(indices.reshape(-1), values.reshape(-1), tokens)
    want_out = torch.zeros(B, d, dtype=torch.float64).index_add_(
        0, tokens, values.reshape(-1, 1).double() * W.detach()[indices.reshape(-1)].double()
    )
    want_v = (W.detach()[indices].double() * upstream[:, None, :].double()).sum(-1)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)

    out = sparse_decode(v, indices, W)
    out.backward(upstream)
    assert torch.allclose(out.double(), want_out, **tol)
    assert torch.allclose(W.grad.double(), want_W, **tol)
    assert torch.allclose(v.grad.double(), want_v, **tol)
    with torch.no_grad():  # the forward without autograd: the nonzero entries alone
        assert torch.allclose(sparse_decode(values, indices, W).double(), want_out, **tol)
    assert torch.allclose(scatter_rows(n, indices, values, upstream).double(), want_W, **tol)
    # a ragged code (BatchTopK's): each entry's row given, rows in order
    flat = values.reshape(-1) != 0
    ragged = scatter_rows(n, indices.reshape(-1)[flat], values.reshape(-1)[flat], upstream, tokens[flat])
    assert torch.allclose(ragged.double(), want_W, **tol)
