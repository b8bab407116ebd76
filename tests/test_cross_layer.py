"""Cross-layer transcoders: latent block l reads layer l's MLP input, keeps its own top k / L and
decodes into the MLP outputs of layers l..L. The batched coder is checked against a plain per-layer
loop with one decoder matrix per (source, target) pair of layers, written out densely."""

import math

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
    """Per layer: the dense kept activations (B, n / L), and AuxK's picks among its dead latents (a
    pick of a latent that fired anywhere in the batch adds nothing)."""
    layers, d = sae.cfg.layers(), sae.cfg.d_in
    m, kept, aux = sae.cfg.n_latents // layers, [], []
    for s in range(layers):
        rows = slice(s * m, (s + 1) * m)
        pre = x_norm[:, s * d : (s + 1) * d] @ sae.W_enc[rows].T + sae.b_enc[rows]
        top = pre.topk(sae.cfg.k // layers, dim=1)
        kept.append(torch.zeros_like(pre).scatter(1, top.indices, top.values.relu()))
        if dead is not None:
            share = aux_k // layers + (s < aux_k % layers)
            pick = pre.masked_fill(~dead[rows], float("-inf")).topk(share, dim=1)
            fired = (kept[-1] > 0).any(0)
            aux.append(torch.zeros_like(pre).scatter(1, pick.indices, pick.values.relu()) * ~fired)
    return kept, aux


def _decode(sae: TopKSAE, acts: list[torch.Tensor], x_norm: torch.Tensor | None) -> torch.Tensor:
    """Target layer t: b_pre_t [+ W_skip_t x_t] + sum over s <= t of acts_s D_(s->t)."""
    layers, d = sae.cfg.layers(), sae.cfg.d_in
    m, out = sae.cfg.n_latents // layers, []
    for t in range(layers):
        cols = slice(t * d, (t + 1) * d)
        y = torch.zeros(acts[0].shape[0], d) if x_norm is None else sae.b_pre[cols].expand(acts[0].shape[0], d)
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


# through the pipeline: one LM pass, the store, training, the spliced evaluation, the registry ---------

MLPS = [f"model.layers.{i}.mlp" for i in range(3)]
SITE = "+".join(MLPS) + ":io"


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_one_forward_captures_every_layers_input_and_output(tiny_lm):
    from sae.lm import IO, capture

    ids = torch.randint(0, 200, (2, 9))
    joined = capture(tiny_lm, ids, [SITE])[SITE]
    alone = capture(tiny_lm, ids, [m + IO for m in MLPS])
    assert joined.shape == (2, 9, 6 * 32)
    ins, outs = joined.split(3 * 32, dim=-1)
    assert torch.equal(ins, torch.cat([alone[m + IO][..., :32] for m in MLPS], -1))
    assert torch.equal(outs, torch.cat([alone[m + IO][..., 32:] for m in MLPS], -1))


def test_the_spliced_lm_loss_equals_replacing_every_mlp_by_the_per_layer_reference(tiny_lm):
    """Every chosen MLP's output replaced at once, each layer's prediction reading the (already
    spliced) inputs of its own and earlier layers: checked against the MLPs' forwards replaced outright
    by the plain per-layer loop of this file."""
    from sae.evaluate import downstream_metrics
    from sae.lm import logits
    from sae.metrics import next_token_ce

    torch.manual_seed(1)
    sae = TopKSAE(SAEConfig(32, 24, 6, transcoder=True, skip_connection=True, cross_layer=3))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(std=0.2)
        sae.W_dec.copy_(sae.W_dec.view(3, 8, 3, 32).mul(torch.ones(3, 3).triu()[:, None, :, None]).view(24, 96))
        sae.input_scale.copy_(torch.tensor([0.5, 1.0, 2.0]))
        sae.target_scale.copy_(torch.tensor([1.5, 0.8, 0.3]))
    ids = torch.randint(0, 200, (3, 10))
    got = downstream_metrics(sae, tiny_lm, ids, SITE, 0, torch.randn(96), 2, progress=False)

    seen: list[torch.Tensor] = []
    originals = [tiny_lm.get_submodule(m).forward for m in MLPS]

    def predict_layer(t: int):
        def forward(h):
            seen.append(h.reshape(-1, 32))
            x_norm = torch.cat([*seen, *[torch.zeros_like(seen[0])] * (2 - t)], 1) * sae.input_scale.repeat_interleave(
                32
            )
            kept = [a if s <= t else torch.zeros_like(a) for s, a in enumerate(_layer_codes(sae, x_norm)[0])]
            y = _decode(sae, kept, x_norm)[:, t * 32 : (t + 1) * 32] / sae.target_scale[t]
            return y.reshape(h.shape)

        return forward

    try:
        for t, m in enumerate(MLPS):
            tiny_lm.get_submodule(m).forward = predict_layer(t)
        with torch.no_grad():
            want = next_token_ce(logits(tiny_lm, ids), ids).mean().item()
    finally:
        for m, forward in zip(MLPS, originals):
            tiny_lm.get_submodule(m).forward = forward
    assert len(seen) == 3
    assert got["ce_with_sae"] == pytest.approx(want, rel=1e-5)


def _spec_body(tiny_model_dir, text_dir, tmp_path, hookpoints=MLPS, **sae) -> dict:
    return {
        "name": "clt",
        "model": {"source": str(tiny_model_dir)},
        "data": {"source": str(text_dir), "context_length": 16, "tokens": 1500, "eval_fraction": 0.3},
        "hookpoints": list(hookpoints),
        "sae": {"n_latents": 48, "k": 6, "dead_tokens": 500, "cross_layer": True, **sae},
        "train": {"batch_tokens": 128},
        "eval": {"tokens": 300, "downstream_contexts": 4, "ablation_contexts": 2, "feature_tokens": 256},
        "registry": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "model_name": "clt", "alias": "candidate"},
        "workdir": str(tmp_path / "work"),
    }


def test_a_cross_layer_transcoder_end_to_end(tiny_model_dir, text_dir, tmp_path, monkeypatch):
    """cache (three MLPs' inputs and outputs from one LM pass), train, evaluate with every MLP spliced
    at once and each layer's FVU, register, pull, predict."""
    from flows import stages
    from flows.spec import check_resources, parse_spec
    from storage import activations as store
    from storage.registry import model_version, pull

    spec = parse_spec(_spec_body(tiny_model_dir, text_dir, tmp_path, skip_connection=True))
    assert spec.hookpoints == ["+".join(MLPS)] and spec.sites() == [SITE]
    check_resources(spec, online=False)
    for split, index in stages.plan_cache(spec):
        stages.cache_shard(spec, split, index)
    stages.cache(spec)
    hook = spec.hookpoints[0]
    rows = store.activations(store.open_store(stages.store_url(spec)), "train", SITE)
    assert rows.shape[1] == 6 * 32  # [3 inputs | 3 outputs] of d 32 MLPs

    stages.train(spec, hook, progress=False)
    metrics = stages.evaluate(spec, hook, progress=False)
    trained = TopKSAE.load(stages.sae_dir(spec, hook))
    assert trained.cfg.cross_layer == 3 and trained.cfg.d_in == 32 and trained.cfg.skip_connection
    held = torch.from_numpy(store.activations(store.open_store(stages.store_url(spec)), "eval", SITE)[:300])
    x, y = held.float().split(96, dim=1)
    with torch.no_grad():
        pred = trained.predict(x)
    for t in range(3):  # each layer's FVU, as evaluated, is its prediction's on the held-out rows
        cols = slice(t * 32, (t + 1) * 32)
        assert metrics[f"normalized_mse_layer_{t}"] == pytest.approx(_fvu(pred[:, cols], y[:, cols]), rel=1e-3)
    for name in ("ce_increase", "kl_divergence", "l0", "dead_fraction", "normalized_mse"):
        assert name in metrics and math.isfinite(metrics[name]), name
    assert metrics["l0"] <= 6

    stages.register(spec, hook)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", spec.tracking_uri())
    version = model_version("models:/clt@candidate")
    assert version.tags["dictionary"] == "cross-layer skip-transcoder"
    assert version.tags["transcodes"] == f"inputs of {MLPS[0]} .. {MLPS[-1]} -> outputs of each and every later one"
    pulled = TopKSAE.from_pretrained("models:/clt@candidate")
    assert torch.allclose(pulled.predict(x[:16]), pred[:16])
    card = (pull("models:/clt@candidate", tmp_path / "pulled") / "MODEL_CARD.md").read_text()
    assert "cross-layer transcoder" in card and f"`{MLPS[0]}`, `{MLPS[1]}`, `{MLPS[2]}`" in card


@pytest.mark.parametrize(
    ("hookpoints", "sae", "field", "says"),
    [
        ([MLPS[0], MLPS[2]], {}, "hookpoints", "layers [0, 2] are not consecutive"),
        ([MLPS[1], MLPS[0]], {}, "hookpoints", "layers [1, 0] are not consecutive"),
        (["model.layers.0", "model.layers.1"], {}, "hookpoints.0", "name the MLP module"),
        ([MLPS[0], "model.layers.1.self_attn"], {}, "hookpoints", "not one module of consecutive layers"),
        ([MLPS[0]], {}, "hookpoints", "two or more consecutive MLPs"),
        (MLPS, {"k": 4}, "sae", "must both divide by 3"),
        (MLPS, {"n_latents": None, "expansion_factor": 2}, "sae.cross_layer", "give sae.n_latents"),
        (MLPS, {"multi_topk": True}, "sae.multi_topk", "drop it"),
    ],
)
def test_bad_cross_layer_specs_are_refused_in_one_line(
    hookpoints, sae, field, says, tiny_model_dir, text_dir, tmp_path, capsys
):
    import yaml

    from flows.cli import main

    body = _spec_body(tiny_model_dir, text_dir, tmp_path, hookpoints, **sae)
    body["sae"] = {key: v for key, v in body["sae"].items() if v is not None}
    path = tmp_path / "clt.yaml"
    path.write_text(yaml.safe_dump(body))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0] and says in err[0], err
    assert not (tmp_path / "work").exists()  # refused before any LM pass


def test_validate_counts_every_layers_rows_and_plans_the_memory(tiny_model_dir, text_dir, tmp_path, capsys):
    import re

    import yaml

    from flows.cli import main
    from flows.spec import parse_spec
    from sae.memory import plan_memory

    path = tmp_path / "clt.yaml"
    path.write_text(yaml.safe_dump(_spec_body(tiny_model_dir, text_dir, tmp_path)))
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "x d 32 x 3 layers x 2 (input and output)" in out
    single = _spec_body(tiny_model_dir, text_dir, tmp_path, [MLPS[0]], cross_layer=False, transcoder=True)
    path.write_text(yaml.safe_dump(single))
    assert main(["validate", str(path)]) == 0
    sizes = [
        float(re.search(r"([\d.]+) \w+ of training activations", o).group(1)) for o in (out, capsys.readouterr().out)
    ]
    assert sizes[0] == pytest.approx(3 * sizes[1], rel=0.02)
    spec = parse_spec(_spec_body(tiny_model_dir, text_dir, tmp_path, skip_connection=True))
    plan = spec.memory_plan(32)
    with torch.device("meta"):
        tensors = TopKSAE(spec.sae_config(32)).state_dict()
    params = sum(t.numel() for name, t in tensors.items() if name not in ("input_scale", "target_scale", "threshold"))
    assert plan.gradients == params * 4  # one float32 gradient per parameter
    assert plan.weights > plan_memory(32, 48, 6, 128, transcoder=True, skip_connection=True).weights


def test_a_sweep_expands_and_the_planner_refuses_in_one_line(tiny_model_dir, text_dir, tmp_path, capsys):
    import yaml

    from flows.cli import main
    from flows.spec import parse_spec

    body = _spec_body(tiny_model_dir, text_dir, tmp_path)
    swept = parse_spec({**body, "sweep": {"n_latents": [48, 96], "k": [6, 12]}})
    assert len(swept.sae) == 4 and all(s.cross_layer and s.transcoder for s in swept.sae)
    assert len({swept.model_name(swept.hookpoints[0], i) for i in range(4)}) == 4
    path = tmp_path / "clt.yaml"
    path.write_text(yaml.safe_dump(body))
    assert main(["plan", str(path), "--budget-flops", "1e15"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sae.cross_layer" in err[0] and "by hand" in err[0]


def test_rows_of_inputs_and_outputs_side_by_side_train_as_data_and_target():
    x, y = _planted(2048)
    cfg, tcfg = SAEConfig(D, N, K, transcoder=True, cross_layer=L), TrainConfig(batch_tokens=256)
    apart = train_sae(cfg, tcfg, x, target=y, progress=False).sae
    together = train_sae(cfg, tcfg, torch.cat([x, y], dim=1), progress=False).sae
    for name, value in apart.state_dict().items():
        assert torch.equal(together.state_dict()[name], value), name
    with pytest.raises(ValueError, match="needs target="):
        train_sae(cfg, tcfg, x, progress=False)


def test_sign_descent_moves_each_layers_skip_block_by_its_own_lr_scale():
    """The first step of two runs that differ only in the skip's per-layer lr scales: block l of W_skip
    (layer l's input -> layer l's output) moves by scale_l x the plain step, every other parameter the
    same; a layer whose targets have massive rows gets a scale far below 1, the others exactly 1."""
    from sae.train import Trainer, skip_lr_scale

    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(512, L * D, generator=g), torch.randn(512, L * D, generator=g)
    y[::128, 2 * D :] *= 300  # the last layer's targets have attention-sink-like rows
    rows = torch.cat([x, y], dim=1)
    runs = []
    for keep_scales in (True, False):
        t = Trainer(
            SAEConfig(D, N, K, transcoder=True, skip_connection=True, cross_layer=L),
            TrainConfig(batch_tokens=256, tokens=512),
        )
        t.initialize(rows)
        (group,) = [group for group in t.opt.param_groups if "block_lr_scales" in group]
        assert group["params"] == [t.sae.W_skip]
        scales = group["block_lr_scales"]
        if not keep_scales:
            group["block_lr_scales"] = [1.0] * L
        before = {name: p.detach().clone() for name, p in t.sae.named_parameters()}
        t.step(rows[:256])
        runs.append({name: p.detach() - before[name] for name, p in t.sae.named_parameters()})
    assert scales[:2] == [1.0, 1.0] and scales[2] == pytest.approx(skip_lr_scale(y[:, 2 * D :]), rel=1e-6)
    assert 0 < scales[2] < 0.1
    scaled, plain = runs
    for layer in range(L):
        block = slice(layer * D, (layer + 1) * D)
        assert plain["W_skip"][block].abs().max() > 0
        torch.testing.assert_close(scaled["W_skip"][block], scales[layer] * plain["W_skip"][block])
    for name in plain:
        if name != "W_skip":
            assert torch.equal(scaled[name], plain[name]), name


def test_the_skip_lr_and_init_rules_move_a_cross_layer_transcoders_key(tiny_model_dir, text_dir, tmp_path, monkeypatch):
    import flows.spec
    from flows.spec import parse_spec

    skip = parse_spec(_spec_body(tiny_model_dir, text_dir, tmp_path, skip_connection=True))
    plain = parse_spec(_spec_body(tiny_model_dir, text_dir, tmp_path, skip_connection=False))
    before = skip.part_hash("sae", "train"), plain.part_hash("sae", "train")
    monkeypatch.setattr(flows.spec, "SKIP_LR_RULE", flows.spec.SKIP_LR_RULE + 1)
    assert skip.part_hash("sae", "train") != before[0]
    assert plain.part_hash("sae", "train") == before[1]
    moved = skip.part_hash("sae", "train"), plain.part_hash("sae", "train")
    monkeypatch.setattr(flows.spec, "TRANSCODER_RULE", flows.spec.TRANSCODER_RULE + 1)
    # a cross-layer transcoder starts at sample pairs by default too: the init rule moves both keys
    assert skip.part_hash("sae", "train") != moved[0] and plain.part_hash("sae", "train") != moved[1]
