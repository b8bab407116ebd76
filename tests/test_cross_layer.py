"""Cross-layer transcoders: latent block l reads layer l's MLP input, keeps its own top k / L and
decodes into the MLP outputs of layers l..L. The batched coder is checked against a plain per-layer
loop with one decoder matrix per (source, target) pair of layers, written out densely."""

import pytest
import torch

from sae import SAEConfig, TopKSAE, TrainConfig, train_sae
from sae.loss import DeadLatents, sae_loss

L, D, N, K = 3, 10, 36, 6  # 12 latents per layer, 2 kept per layer


def _clt(skip: bool = True, seed: int = 0) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(D, N, K, transcoder=True, skip_connection=skip, cross_layer=L))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(std=0.3)
        sae.W_dec.copy_(sae.W_dec.view(L, N // L, L, D).mul(torch.ones(L, L).triu()[:, None, :, None]).view(N, L * D))
        sae.input_scale.copy_(torch.tensor([0.5, 1.0, 2.0]))
        sae.target_scale.copy_(torch.tensor([1.5, 0.8, 0.3]))
    return sae


def _layer_codes(sae: TopKSAE, x_norm: torch.Tensor, dead: torch.Tensor | None = None, aux_k: int = 0):
    """Per layer: the dense kept activations (B, n / L), and AuxK's picks among its dead latents."""
    m, kept, aux = N // L, [], []
    for s in range(L):
        rows = slice(s * m, (s + 1) * m)
        pre = x_norm[:, s * D : (s + 1) * D] @ sae.W_enc[rows].T + sae.b_enc[rows]
        top = pre.topk(K // L, dim=1)
        kept.append(torch.zeros_like(pre).scatter(1, top.indices, top.values.relu()))
        if dead is not None:
            share = aux_k // L + (s < aux_k % L)
            masked = pre.masked_fill(~dead[rows], float("-inf"))
            pick = masked.topk(share, dim=1)
            aux.append(torch.zeros_like(pre).scatter(1, pick.indices, pick.values.relu()))
    return kept, aux


def _decode(sae: TopKSAE, acts: list[torch.Tensor], x_norm: torch.Tensor | None) -> torch.Tensor:
    """Target layer t: b_pre_t [+ W_skip_t x_t] + sum over s <= t of acts_s D_(s->t)."""
    m, out = N // L, []
    for t in range(L):
        cols = slice(t * D, (t + 1) * D)
        y = torch.zeros(acts[0].shape[0], D) if x_norm is None else sae.b_pre[cols].expand(acts[0].shape[0], D)
        for s in range(t + 1):
            y = y + acts[s] @ sae.W_dec[s * m : (s + 1) * m, cols]
        if x_norm is not None and sae.W_skip is not None:
            y = y + x_norm[:, cols] @ sae.W_skip[cols].T
        out.append(y)
    return torch.cat(out, dim=1)


def _per_column(scales: torch.Tensor) -> torch.Tensor:
    return scales.repeat_interleave(D)


@pytest.mark.parametrize("skip", [True, False])
def test_the_coder_equals_a_plain_per_layer_loop(skip):
    sae = _clt(skip)
    x = torch.randn(20, L * D)
    x_norm = x * _per_column(sae.input_scale)
    kept, _ = _layer_codes(sae, x_norm)
    want = _decode(sae, kept, x_norm) / _per_column(sae.target_scale)
    assert torch.allclose(sae.predict(x), want, atol=1e-5)
    codes = sae.encode(x)
    assert codes.values.shape == (20, K)
    assert torch.allclose(codes.dense(N), torch.cat(kept, dim=1), atol=1e-6)
    for s in range(L):  # each layer's block keeps k / L of its own latents
        in_block = (codes.indices >= s * N // L) & (codes.indices < (s + 1) * N // L)
        assert (in_block.sum(1) == K // L).all()
    assert torch.allclose(sae.decode(codes), want, atol=1e-5)


def test_loss_auxk_and_gradients_equal_the_per_layer_reference():
    sae = _clt()
    x, y = torch.randn(32, L * D), torch.randn(32, L * D)
    x_norm, y_norm = x * _per_column(sae.input_scale), y * _per_column(sae.target_scale)
    dead = torch.zeros(N, dtype=torch.bool)
    dead[[0, 3, 5, 13, 14, 30]] = True
    tcfg = TrainConfig(aux_k=4, aux_coef=0.25)
    parts = sae_loss(sae, x_norm, 0.6, tcfg, DeadLatents.counted(dead), target=y_norm)
    parts.loss.backward()
    sae.restrict_decoder_grad()
    got = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()

    kept, aux = _layer_codes(sae, x_norm, dead, aux_k=4)
    recon = _decode(sae, kept, x_norm)
    mse = ((y_norm - recon) ** 2).sum(-1).mean() * 0.6
    aux_loss = ((y_norm - recon.detach() - _decode(sae, aux, None)) ** 2).sum(-1).mean() * 0.6
    (mse + 0.25 * aux_loss).backward()
    assert parts.mse.item() == pytest.approx(mse.item(), rel=1e-5)
    assert parts.aux.item() == pytest.approx(aux_loss.item(), rel=1e-5)
    for name, p in sae.named_parameters():
        assert torch.allclose(got[name], p.grad, atol=1e-5), name
    earlier = sae.W_dec.grad.view(L, N // L, L, D)  # the reference never reads those blocks
    assert all(earlier[s, :, t].abs().max() == 0 for s in range(L) for t in range(s))


def _planted(tokens: int, seed: int = 0):
    """Layer s's input carries its features; each feature also writes into later layers' outputs."""
    g, feats = torch.Generator().manual_seed(0), 10  # one dictionary; the activations drawn by seed
    enc = [torch.randn(feats, D, generator=g) for _ in range(L)]
    dec = {(s, t): torch.randn(feats, D, generator=g) for t in range(L) for s in range(t + 1)}
    g.manual_seed(seed + 1)
    acts = [torch.rand(tokens, feats, generator=g) * (torch.rand(tokens, feats, generator=g) < 0.15) for _ in range(L)]
    x = torch.cat([acts[s] @ enc[s] for s in range(L)], dim=1)
    y = torch.cat([sum(acts[s] @ dec[(s, t)] for s in range(t + 1)) for t in range(L)], dim=1)
    return x, y


def _fvu(pred: torch.Tensor, y: torch.Tensor) -> float:
    return ((pred - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()).item()


def test_a_trained_cross_layer_transcoder_reads_what_per_layer_transcoders_cannot():
    """Layer t's output depends on the features of earlier layers' inputs: a transcoder per layer
    sees only its own input, a cross-layer transcoder reads them all with the same latents and k."""
    x, y = _planted(24576)
    held_x, held_y = _planted(4096, seed=1)
    tcfg = TrainConfig(batch_tokens=512)
    clt = train_sae(SAEConfig(D, 60, 12, transcoder=True, cross_layer=L), tcfg, x, target=y, progress=False).sae
    blocks = clt.W_dec.view(L, 20, L, D)
    assert all(blocks[s, :, t].abs().max() == 0 for s in range(L) for t in range(s))  # stayed zero
    assert torch.allclose(clt.W_dec.norm(dim=1), torch.ones(60), atol=1e-5)
    per_layer = []
    for t in range(L):
        cols = slice(t * D, (t + 1) * D)
        single = SAEConfig(D, 20, 4, transcoder=True)
        tc = train_sae(single, tcfg, x[:, cols], target=y[:, cols], progress=False).sae
        per_layer.append(tc.predict(held_x[:, cols]))
    clt_fvu, separate_fvu = _fvu(clt.predict(held_x), held_y), _fvu(torch.cat(per_layer, 1), held_y)
    assert clt_fvu < 0.6 * separate_fvu, (clt_fvu, separate_fvu)


def test_save_load_round_trip(tmp_path):
    sae = _clt()
    sae.save(tmp_path / "clt")
    back = TopKSAE.load(tmp_path / "clt")
    assert back.cfg == sae.cfg and back.cfg.to_dict()["cross_layer"] == L
    x = torch.randn(7, L * D)
    assert torch.equal(back.predict(x), sae.predict(x))
    assert "cross_layer" not in SAEConfig(D, N, K, transcoder=True).to_dict()


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"cross_layer": 1, "transcoder": True}, "give 2 or more layers"),
        ({"cross_layer": 3}, "set transcoder too"),
        ({"cross_layer": 4, "transcoder": True}, "must both divide by 4"),
        ({"cross_layer": 3, "transcoder": True, "matryoshka": (12, 24)}, "drop matryoshka"),
        ({"cross_layer": 3, "transcoder": True, "activation": "batchtopk"}, "drop activation batchtopk"),
    ],
)
def test_bad_cross_layer_configs_say_what_to_change(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SAEConfig(D, N, K, **kwargs)


def test_multi_topk_and_latent_shards_are_refused():
    cfg = SAEConfig(D, N, K, transcoder=True, cross_layer=L)
    with pytest.raises(ValueError, match="train.multi_topk"):
        train_sae(cfg, TrainConfig(multi_topk=True), torch.randn(64, L * D), target=torch.randn(64, L * D))
