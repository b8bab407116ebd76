"""Transcoders and skip-transcoders: the latents read an MLP's input and predict its output. The loss,
the prediction and the spliced-in LM loss are checked against plain references (a dense computation,
the MLP's own forward replaced by the prediction); one LM pass captures the MLP's input and output."""

import math

import pytest
import torch

from sae import SAEConfig, TopKSAE, TrainConfig, train_sae
from sae.config import TrainConfig as TC
from sae.evaluate import downstream_metrics, reconstruction_metrics
from sae.lm import IO, capture, io_problem, logits
from sae.loss import sae_loss
from sae.metrics import next_token_ce


def _transcoder(skip: bool = True, d: int = 12, n: int = 48, k: int = 5) -> TopKSAE:
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d, n, k, transcoder=True, skip_connection=skip))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(std=0.3)
        sae.input_scale.fill_(0.7)
        sae.target_scale.fill_(1.3)
    return sae


def _dense_prediction(sae: TopKSAE, x_norm: torch.Tensor) -> torch.Tensor:
    """W_dec^T TopK(ReLU(W_enc x + b_enc)) + b_pre + W_skip x, written out densely."""
    pre = torch.relu(x_norm @ sae.W_enc.T + sae.b_enc)
    kept = torch.zeros_like(pre).scatter(1, pre.topk(sae.cfg.k).indices, pre.gather(1, pre.topk(sae.cfg.k).indices))
    out = kept @ sae.W_dec + sae.b_pre
    return out + x_norm @ sae.W_skip.T if sae.W_skip is not None else out


@pytest.mark.parametrize("skip", [True, False])
def test_loss_and_gradients_equal_a_dense_reference(skip):
    sae = _transcoder(skip)
    x, y = torch.randn(64, 12), torch.randn(64, 12)
    x_norm, y_norm = x * sae.input_scale, y * sae.target_scale
    tcfg = TC(aux_coef=0.0)
    parts = sae_loss(sae, x_norm, 0.7, tcfg, target=y_norm)
    parts.loss.backward()
    got = {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}
    sae.zero_grad()
    ref = ((y_norm - _dense_prediction(sae, x_norm)) ** 2).sum(-1).mean() * 0.7
    ref.backward()
    assert parts.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for name, p in sae.named_parameters():
        assert torch.allclose(got[name], p.grad, atol=1e-5), name
    assert ("W_skip" in got) == skip


def test_predict_and_codes_work_on_the_mlps_raw_input():
    sae = _transcoder()
    x = torch.randn(10, 12)
    want = _dense_prediction(sae, x * sae.input_scale) / sae.target_scale
    assert torch.allclose(sae.predict(x), want, atol=1e-5)
    assert torch.allclose(sae.decode(sae.encode(x)), want, atol=1e-5)
    codes = sae.encode(x)
    for stats in (None, codes.stats):  # codes without their skip term, with or without their scale
        with pytest.raises(ValueError, match="skip-transcoder's codes"):
            sae.decode(type(codes)(codes.values, codes.indices, stats))


def test_save_load_round_trip_keeps_the_prediction(tmp_path):
    sae = _transcoder()
    sae.save(tmp_path / "tc")
    back = TopKSAE.load(tmp_path / "tc")
    x = torch.randn(7, 12)
    assert back.cfg.transcoder and back.cfg.skip_connection and back.cfg.normalization == "dataset_scale"
    assert torch.equal(back.predict(x), sae.predict(x))
    # a plain SAE's config has none of the new keys: its files and keys stay as they were
    plain = {"d_in", "n_latents", "k", "encoder_bias", "normalization", "activation"}
    assert set(SAEConfig(12, 48, 5).to_dict()) == plain


def test_bad_configs_say_what_to_change():
    with pytest.raises(ValueError, match="normalization: standardize .* transcoder"):
        SAEConfig(12, 48, 5, transcoder=True, normalization="standardize")
    with pytest.raises(ValueError, match="skip_connection: .* set transcoder"):
        SAEConfig(12, 48, 5, skip_connection=True)
    assert SAEConfig(12, 48, 5, transcoder=True).normalization == "dataset_scale"
    assert SAEConfig(12, 48, 5).normalization == "standardize"
    sae = _transcoder()
    with pytest.raises(ValueError, match="width 24, got 12"):
        sae.split(torch.randn(3, 12))


def _planted(rows: int = 100_000, d: int = 32, seed: int = 0):
    """y = a sparse nonlinear map of x plus a linear part: what an MLP's output looks like to a transcoder."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g)
    enc = torch.randn(128, d, generator=g) / d**0.5
    dec = torch.randn(128, d, generator=g) / 4
    lin = torch.randn(d, d, generator=g) / d**0.5
    pre = x @ enc.T
    keep = pre.topk(6, dim=1)
    code = torch.zeros_like(pre).scatter(1, keep.indices, torch.relu(keep.values))
    return x, code @ dec + 0.5 * x @ lin.T


def _fvu(pred: torch.Tensor, y: torch.Tensor) -> float:
    return ((pred - y) ** 2).sum().item() / ((y - y.mean(0)) ** 2).sum().item()


def test_a_trained_transcoder_predicts_the_target_and_the_skip_takes_the_linear_part():
    x, y = _planted()
    held_x, held_y = x[-2000:], y[-2000:]
    fvu = {}
    for skip in (False, True):
        cfg = SAEConfig(32, 256, 6, transcoder=True, skip_connection=skip)
        sae = train_sae(cfg, TrainConfig(batch_tokens=256), x[:-2000], target=y[:-2000], progress=False).sae
        with torch.no_grad():
            fvu[skip] = _fvu(sae.predict(held_x), held_y)
        # the evaluation's normalized MSE is the target's FVU (the scales are scalars: it is scale-free)
        metrics = reconstruction_metrics(sae, [torch.cat([held_x, held_y], 1)], progress=False)
        assert metrics["normalized_mse"] == pytest.approx(fvu[skip], rel=1e-4)
    # the best affine map, fitted by least squares on the training rows: what no sparse code is needed for
    fit = torch.linalg.lstsq(torch.nn.functional.pad(x[:-2000], (0, 1), value=1.0), y[:-2000]).solution
    linear = _fvu(torch.nn.functional.pad(held_x, (0, 1), value=1.0) @ fit, held_y)
    assert fvu[False] < 0.6 * linear and fvu[True] < 0.9 * fvu[False], (fvu, linear)


def test_train_sae_needs_the_target_rows():
    x, y = _planted(rows=512)
    cfg = SAEConfig(32, 64, 4, transcoder=True)
    with pytest.raises(ValueError, match="target="):
        train_sae(cfg, TrainConfig(batch_tokens=256), x, progress=False)
    with pytest.raises(ValueError, match="has 100 rows, data has 512"):
        train_sae(cfg, TrainConfig(batch_tokens=256), x, target=y[:100], progress=False)


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_one_forward_captures_the_mlps_input_and_output(tiny_lm):
    ids = torch.randint(0, 200, (2, 9))
    mlp = "model.layers.1.mlp"
    got = capture(tiny_lm, ids, [mlp + IO, "model.layers.2"])
    x_in, out = got[mlp + IO].split(32, dim=-1)
    with torch.no_grad():
        assert torch.allclose(tiny_lm.get_submodule(mlp)(x_in), out, atol=1e-6)
        # the input is the post-attention RMSNorm of layer 1's residual: what the decoder layer feeds its MLP
        assert got[mlp + IO].shape == (2, 9, 64) and got["model.layers.2"].shape == (2, 9, 32)


def test_only_a_module_with_one_tensor_in_and_out_can_feed_a_transcoder(tiny_lm):
    assert io_problem(tiny_lm.config, "model.layers.1.mlp") is None
    problem = io_problem(tiny_lm.config, "model.layers.1")
    assert problem is not None and "model.layers.1" in problem and "name the MLP module" in problem
    problem = io_problem(tiny_lm.config, "model.layers.1.mlp.up_proj")
    assert problem is not None and "maps width 32 to 64" in problem


def test_the_lm_loss_with_the_prediction_spliced_in_equals_replacing_the_mlp(tiny_lm):
    sae = _transcoder(d=32, n=64, k=4)
    ids = torch.randint(0, 200, (3, 10))
    mean = torch.randn(32)
    m = downstream_metrics(sae, tiny_lm, ids, "model.layers.1.mlp" + IO, 0, mean, 2, progress=False)
    mlp = tiny_lm.get_submodule("model.layers.1.mlp")
    original = mlp.forward
    try:
        mlp.forward = lambda h: sae.predict(h.reshape(-1, 32)).reshape(h.shape)  # the MLP replaced outright
        with torch.no_grad():
            replaced_ce = next_token_ce(logits(tiny_lm, ids), ids).mean().item()
    finally:
        mlp.forward = original
    with torch.no_grad():
        clean = next_token_ce(logits(tiny_lm, ids), ids).mean().item()
    assert m["ce_with_sae"] == pytest.approx(replaced_ce, rel=1e-5)
    assert m["ce_increase"] == pytest.approx(replaced_ce - clean, rel=1e-4, abs=1e-6)


MLP = "model.layers.1.mlp"


def _spec_body(tiny_model_dir, text_dir, tmp_path, hookpoint: str = MLP, **sae) -> dict:
    return {
        "name": "tc",
        "model": {"source": str(tiny_model_dir)},
        "data": {"source": str(text_dir), "context_length": 16, "tokens": 1500, "eval_fraction": 0.3},
        "hookpoints": [hookpoint],
        "sae": {"n_latents": 64, "k": 4, "dead_tokens": 500, **sae},
        "train": {"batch_tokens": 128},
        "eval": {"tokens": 300, "downstream_contexts": 4, "ablation_contexts": 2, "feature_tokens": 256},
        "registry": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "model_name": "tc", "alias": "candidate"},
        "workdir": str(tmp_path / "work"),
    }


def test_a_skip_transcoder_end_to_end(tiny_model_dir, text_dir, tmp_path, monkeypatch):
    """cache (the MLP's input and output from one LM pass), train, evaluate, register, pull, predict."""
    from mlflow import MlflowClient

    from flows import stages
    from flows.spec import check_resources, parse_spec
    from storage import activations as store
    from storage.registry import model_version, pull

    spec = parse_spec(_spec_body(tiny_model_dir, text_dir, tmp_path, transcoder=True, skip_connection=True))
    check_resources(spec, online=False)
    for split, index in stages.plan_cache(spec):
        stages.cache_shard(spec, split, index)
    stages.cache(spec)
    rows = store.activations(store.open_store(stages.store_url(spec)), "train", spec.site(MLP))
    assert rows.shape[1] == 64  # [input | output] of a d 32 MLP
    block = torch.from_numpy(rows[:40].astype("float32"))
    from transformers import AutoModelForCausalLM

    mlp = AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_submodule(MLP)
    with torch.no_grad():  # the stored output is the MLP's output of the stored input (float16 store)
        assert torch.allclose(mlp(block[:, :32]), block[:, 32:], atol=2e-2, rtol=2e-2)

    stages.train(spec, MLP, progress=False)
    metrics = stages.evaluate(spec, MLP, progress=False)
    trained = TopKSAE.load(stages.sae_dir(spec, MLP))
    assert trained.cfg.transcoder and trained.cfg.skip_connection and trained.cfg.d_in == 32
    held = torch.from_numpy(
        store.activations(store.open_store(stages.store_url(spec)), "eval", spec.site(MLP))[:300].astype("float32")
    )
    with torch.no_grad():
        fvu = _fvu(trained.predict(held[:, :32]), held[:, 32:])
    assert metrics["normalized_mse"] == pytest.approx(fvu, rel=1e-3)  # the target's FVU, as evaluated
    for name in ("ce_increase", "kl_divergence", "l0", "dead_fraction", "fraction_variance_explained"):
        assert name in metrics and math.isfinite(metrics[name]), name
    # (the splice itself is checked against replacing the MLP outright below; the tiny random model's
    # MLP moves its loss by about 1e-3, too little to rank predictions against ablations here)
    from flows.paths import BROWSER_DIR, eval_dir

    browser = eval_dir(spec, MLP, 0) / BROWSER_DIR
    assert (browser / "index.html").is_file()  # the feature browser of what the latents fire on

    stages.register(spec, MLP)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", spec.tracking_uri())
    version = model_version("models:/tc@candidate")
    assert version.tags["dictionary"] == "skip-transcoder"
    assert version.tags["transcodes"] == f"input of {MLP} -> output of {MLP}"
    assert MlflowClient().get_run(version.run_id).info.run_name is not None
    pulled = TopKSAE.from_pretrained("models:/tc@candidate")
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(pulled.predict(x), trained.predict(x))
    card = (pull("models:/tc@candidate", tmp_path / "pulled") / "MODEL_CARD.md").read_text()
    assert f"reads the input of `{MLP}`" in card and "skip-transcoder" in card and "sae.predict(x)" in card


@pytest.mark.parametrize(
    ("hookpoint", "sae", "field", "says"),
    [
        ("model.layers.1", {"transcoder": True}, "hookpoints.0", "name the MLP module"),
        (MLP, {"skip_connection": True}, "sae.skip_connection", "set sae.transcoder: true"),
        (MLP, {"transcoder": True, "normalization": "standardize"}, "sae.normalization", "dataset_scale"),
    ],
)
def test_bad_transcoder_specs_are_refused_in_one_line(
    hookpoint, sae, field, says, tiny_model_dir, text_dir, tmp_path, capsys
):
    import yaml

    from flows.cli import main

    path = tmp_path / "tc.yaml"
    path.write_text(yaml.safe_dump(_spec_body(tiny_model_dir, text_dir, tmp_path, hookpoint, **sae)))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0] and says in err[0], err
    assert not (tmp_path / "work").exists()  # refused before any LM pass


def test_transcoders_and_saes_do_not_share_a_spec_and_plain_keys_stay(tiny_model_dir, text_dir, tmp_path):
    from flows.paths import CACHE_SECTIONS
    from flows.spec import parse_spec

    body = _spec_body(tiny_model_dir, text_dir, tmp_path)
    mixed = {**body, "sae": [{"n_latents": 64, "k": 4, "transcoder": True}, {"n_latents": 64, "k": 8}]}
    with pytest.raises(ValueError, match="some SAEs are transcoders and some not"):
        parse_spec(mixed)
    plain = parse_spec(body)
    unset = parse_spec({**body, "sae": {**body["sae"], "transcoder": False, "skip_connection": False}})
    tc = parse_spec({**body, "sae": {**body["sae"], "transcoder": True}})
    assert plain.part_hash(*CACHE_SECTIONS, "sae", "train") == unset.part_hash(*CACHE_SECTIONS, "sae", "train")
    assert tc.part_hash(*CACHE_SECTIONS) != plain.part_hash(*CACHE_SECTIONS)  # a store of other arrays
    assert plain.sites() == [MLP] and tc.sites() == [MLP + IO]
    sharded = {**body, "sae": {**body["sae"], "transcoder": True}, "train": {"batch_tokens": 128, "devices": 2}}
    sharded["train"]["latent_shards"] = 2
    with pytest.raises(ValueError, match="trains each transcoder's latents in one process: drop train.latent_shards"):
        parse_spec(sharded)


def test_validate_counts_both_halves_and_a_sweep_of_transcoders_expands(tiny_model_dir, text_dir, tmp_path, capsys):
    import re

    import yaml

    from flows.cli import main
    from flows.spec import parse_spec

    sizes = {}
    for kind, sae in (("sae", {}), ("transcoder", {"transcoder": True})):
        path = tmp_path / f"{kind}.yaml"
        path.write_text(yaml.safe_dump(_spec_body(tiny_model_dir, text_dir, tmp_path, **sae)))
        assert main(["validate", str(path)]) == 0
        out = capsys.readouterr().out
        size, unit = re.search(r"([\d.]+) (\w+) of training activations", out).groups()
        sizes[kind] = (float(size), unit, out)
    assert sizes["transcoder"][1] == sizes["sae"][1]
    assert sizes["transcoder"][0] == pytest.approx(2 * sizes["sae"][0], rel=0.02)
    assert "x 2 (input and output)" in sizes["transcoder"][2]
    body = _spec_body(tiny_model_dir, text_dir, tmp_path, transcoder=True)
    swept = parse_spec({**body, "sweep": {"n_latents": [64, 128], "k": [4, 8]}})
    assert len(swept.sae) == 4 and all(s.transcoder and s.normalization == "dataset_scale" for s in swept.sae)
    assert len({swept.model_name(MLP, i) for i in range(4)}) == 4


def test_a_transcoders_auto_lr_under_sign_descent_is_half_an_saes():
    from sae.config import TRANSCODER_SIGNUM_LR_FACTOR

    t = TrainConfig(batch_tokens=1024, tokens=100_000)
    assert t.resolved_lr(4096, 576, transcoder=True) == pytest.approx(
        TRANSCODER_SIGNUM_LR_FACTOR * t.resolved_lr(4096, 576)
    )
    adam = TrainConfig(batch_tokens=1024, tokens=100_000, optimizer="adam")
    assert adam.resolved_lr(4096, 576, transcoder=True) == adam.resolved_lr(4096, 576)
    assert TrainConfig(lr=3e-3).resolved_lr(4096, 576, transcoder=True) == 3e-3  # a given lr is the lr


def test_a_transcoders_dead_window_is_four_times_an_saes_and_its_trainer_counts_by_it():
    from sae.train import Trainer

    t = TrainConfig(batch_tokens=1024, tokens=100_000)
    assert t.dead_window(4096, 32) == 1024  # 8 firings of an average latent: one batch
    assert t.dead_window(4096, 32, transcoder=True) == 4096  # 32 firings
    assert TrainConfig(dead_tokens=500).dead_window(4096, 32, transcoder=True) == 500  # a given window is the window
    assert TrainConfig(tokens=10**10).dead_window(2**24, 8, transcoder=True) == 10_000_000  # the paper's cap holds
    tc, plain = Trainer(SAEConfig(8, 512, 4, transcoder=True), t), Trainer(SAEConfig(8, 512, 4), t)
    assert (tc.tracker.dead_tokens, plain.tracker.dead_tokens) == (4096, 1024)


def test_the_memory_plan_counts_the_target_and_the_skip_map():
    from sae.memory import plan_memory

    plain = plan_memory(576, 4096, 32, 4096)
    tc = plan_memory(576, 4096, 32, 4096, transcoder=True, skip_connection=True)
    assert tc.weights - plain.weights == 576 * 576 * 4  # W_skip in float32
    assert tc.optimizer - plain.optimizer == 576 * 576 * 4  # and its sign-descent z
    assert tc.batch - plain.batch == 4096 * 576 * 4 * 2  # the target and its normalised copy


def test_the_skip_lr_scale_is_the_typical_rows_share_of_the_scale():
    from sae.train import skip_lr_scale

    g = torch.Generator().manual_seed(0)
    plain = torch.randn(4000, 16, generator=g)
    assert skip_lr_scale(plain) == 1.0  # no row over 10x the median norm
    sinks = plain.clone()
    sinks[::1000] *= 500  # four attention-sink-like rows
    norm2 = sinks.pow(2).sum(-1)
    typical = norm2.sqrt() <= 10 * norm2.sqrt().median()
    assert typical.sum() == 3996
    assert skip_lr_scale(sinks) == pytest.approx(math.sqrt(norm2[typical].mean() / norm2.mean()), rel=1e-6)
    assert skip_lr_scale(sinks) < 0.1  # the rows 500x the others hold 99.6% of the squared norm


@pytest.mark.parametrize("transcoder", [True, False])
@pytest.mark.parametrize("init", ["data", "random"])
def test_auxk_leaves_out_the_latents_that_fired_in_the_batch_where_they_started_at_data_rows(transcoder, init):
    """Every latent counted dead: AuxK's term equals a dense reference in which, under decoder_init
    "data" (an SAE's and a transcoder's default), the picks among the latents that fired in the
    batch's code add nothing (under "random" all add), and those latents' encoder rows get the main
    loss's gradient alone."""
    from sae.loss import DeadLatents

    torch.manual_seed(0)
    d, n, k, aux_k = 12, 48, 4, 16
    sae = _transcoder(skip=False, d=d, n=n, k=k) if transcoder else TopKSAE(SAEConfig(d, n, k, encoder_bias=True))
    x, y = torch.randn(6, d), torch.randn(6, d)
    tcfg = TC(batch_tokens=6, aux_k=aux_k, aux_coef=1.0, decoder_init=init)
    assert TC(batch_tokens=6).resolved_decoder_init(sae.cfg) == "data"
    left_out = init == "data"
    dead = DeadLatents.counted(torch.ones(n, dtype=torch.bool))
    target = y if transcoder else None
    parts = sae_loss(sae, x, 1.0, tcfg, dead, target=target)

    pre = torch.relu(sae.encoder_input(x) @ sae.W_enc.T + sae.b_enc)
    main = torch.zeros_like(pre).scatter(1, pre.topk(k).indices, pre.gather(1, pre.topk(k).indices))
    fired = (main > 0).any(0)
    recon = main @ sae.W_dec + sae.b_pre
    aux_top = pre.topk(aux_k)
    kept = aux_top.values * (~fired[aux_top.indices] if left_out else 1)
    aux_recon = torch.zeros_like(pre).scatter(1, aux_top.indices, kept) @ sae.W_dec
    want = ((y if transcoder else x) - recon - aux_recon).pow(2).sum(-1).mean()
    assert fired.sum() > 1 and (fired[aux_top.indices]).any()  # some picks fired, so the case is live
    assert parts.aux.item() == pytest.approx(want.item(), rel=1e-5)

    def encoder_grad(aux_coef: float) -> torch.Tensor:
        sae.zero_grad()
        step = TC(batch_tokens=6, aux_k=aux_k, aux_coef=aux_coef, decoder_init=init)
        sae_loss(sae, x, 1.0, step, dead, target=target).loss.backward()
        return sae.W_enc.grad.clone()

    with_aux, without = encoder_grad(1.0), encoder_grad(0.0)
    same = torch.allclose(with_aux[fired], without[fired], atol=1e-6)
    assert same == left_out  # the fired latents: AuxK adds no gradient under "data", under "random" it does
    assert not torch.allclose(with_aux[~fired], without[~fired])  # the others are AuxK's to move


def _unit_scale(rows: torch.Tensor) -> float:
    return math.sqrt(rows.shape[1] / rows.pow(2).sum(-1).mean().item())


@pytest.mark.parametrize("layers", [1, 3])
def test_the_target_scale_is_the_geometric_mean_of_all_rows_and_the_typical_rows_scales(layers):
    """Per layer: the unit scale where no target row is massive, sqrt(unit x typical-rows' unit) where
    some are; the input keeps the unit scale of all its rows (checked against a direct computation)."""
    from sae.train import init_from_sample

    d, g = 16, torch.Generator().manual_seed(1)
    x = torch.randn(3000, layers * d, generator=g) * 2
    y = torch.randn(3000, layers * d, generator=g) * 3
    y[::500, -d:] *= 400  # six sink rows in the last layer's target alone
    cross = {"cross_layer": layers} if layers > 1 else {}
    sae = TopKSAE(SAEConfig(d, 96, 6, transcoder=True, **cross))
    init_from_sample(sae, torch.cat([x, y], -1), use_geometric_median=False, scale_encoder=False)
    got_in, got_out = sae.input_scale.reshape(-1), sae.target_scale.reshape(-1)
    for layer in range(layers):
        cols = slice(layer * d, (layer + 1) * d)
        assert got_in[layer].item() == pytest.approx(_unit_scale(x[:, cols]), rel=1e-6)
        want = _unit_scale(y[:, cols])
        if layer == layers - 1:
            typical = torch.ones(3000, dtype=torch.bool)
            typical[::500] = False
            assert want < 0.1 * _unit_scale(y[typical][:, cols])  # the sinks set the plain scale
            want = math.sqrt(want * _unit_scale(y[typical][:, cols]))
        assert got_out[layer].item() == pytest.approx(want, rel=1e-6)


def test_sign_descent_moves_a_skip_transcoders_skip_by_its_lr_scale():
    """The first step of two runs that differ only in the skip's lr scale: W_skip moves in proportion,
    every other parameter the same."""
    from sae.train import Trainer

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(512, 12, generator=g), torch.randn(512, 12, generator=g)
    y[::128] *= 300  # massive target rows: the scale comes out far below 1
    rows = torch.cat([x, y], dim=1)
    runs = []
    for keep_scale in (True, False):
        t = Trainer(
            SAEConfig(12, 48, 4, transcoder=True, skip_connection=True), TrainConfig(batch_tokens=256, tokens=512)
        )
        t.initialize(rows)
        (skip_group,) = [group for group in t.opt.param_groups if "lr_scale" in group and not group.get("encoder")]
        assert skip_group["params"] == [t.sae.W_skip]
        scale = skip_group["lr_scale"]
        if not keep_scale:
            skip_group["lr_scale"] = 1.0
        before = {name: p.detach().clone() for name, p in t.sae.named_parameters()}
        t.step(rows[:256])
        runs.append({name: p.detach() - before[name] for name, p in t.sae.named_parameters()})
    assert 0 < scale < 0.1
    scaled, plain = runs
    assert plain["W_skip"].abs().max() > 0
    assert torch.allclose(scaled["W_skip"], scale * plain["W_skip"], rtol=1e-5, atol=1e-9)
    for name in plain:
        if name != "W_skip":
            assert torch.equal(scaled[name], plain[name]), name


def test_the_skip_lr_and_init_rules_move_the_keys_of_their_transcoders_alone(
    tiny_model_dir, text_dir, tmp_path, monkeypatch
):
    import flows.spec
    from flows.spec import parse_spec

    body = _spec_body(tiny_model_dir, text_dir, tmp_path)
    specs = {
        "sae": parse_spec(body),
        "transcoder": parse_spec({**body, "sae": {**body["sae"], "transcoder": True}}),
        "skip": parse_spec({**body, "sae": {**body["sae"], "transcoder": True, "skip_connection": True}}),
    }
    before = {kind: spec.part_hash("sae", "train") for kind, spec in specs.items()}
    monkeypatch.setattr(flows.spec, "SKIP_LR_RULE", flows.spec.SKIP_LR_RULE + 1)
    after = {kind: spec.part_hash("sae", "train") for kind, spec in specs.items()}
    assert after["sae"] == before["sae"] and after["transcoder"] == before["transcoder"]
    assert after["skip"] != before["skip"]
    monkeypatch.setattr(flows.spec, "TRANSCODER_RULE", flows.spec.TRANSCODER_RULE + 1)
    init_moved = {kind: spec.part_hash("sae", "train") for kind, spec in specs.items()}
    assert init_moved["sae"] == after["sae"]
    assert init_moved["transcoder"] != after["transcoder"] and init_moved["skip"] != after["skip"]


def _jumprelu_transcoder(d: int = 32, n: int = 64) -> TopKSAE:
    """A JumpReLU skip-transcoder as SAELens's come in (storage.formats): raw input, a threshold per latent."""
    torch.manual_seed(0)
    cfg = SAEConfig(d, n, n, normalization="none", activation="jumprelu", transcoder=True, skip_connection=True)
    sae = TopKSAE(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(std=0.3)
        sae.threshold.uniform_(0, 1)
    return sae


def test_an_imported_jumprelu_transcoder_evaluates_against_a_dense_reference(tiny_model_dir, tiny_lm):
    """The evaluation (reconstruction, the LM's loss with the MLP's output replaced, ablation, feature
    pages) of a JumpReLU skip-transcoder: FVU, L0 and the feature sample's codes equal a dense
    computation of ReLU(pre) * (pre > threshold)."""
    from sae.evaluation import EvalPlan, EvalSource, evaluate_sae
    from sae.lm import load_lm

    sae = _jumprelu_transcoder()
    ids = torch.randint(3, 200, (6, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        rows = capture(tiny_lm, ids, [MLP + IO])[MLP + IO].reshape(-1, 64)
        x, y = rows.split(32, dim=-1)
        pre = x @ sae.W_enc.T + sae.b_enc
        codes = torch.relu(pre) * (pre > sae.threshold)
        predicted = codes @ sae.W_dec + sae.b_pre + x @ sae.W_skip.T
    fvu = ((y - predicted).double().pow(2).sum() / (y - y.mean(0)).double().pow(2).sum()).item()
    fired = (codes > 0).sum(1)
    assert fired.min() < fired.max()  # codes of varying width
    source = EvalSource(
        rows=lambda n: rows[:n].split(16),
        contexts=lambda n: ids[:n].numpy(),
        n_contexts=6,
        positions=10,
        first_position=0,
        hookpoint=MLP + IO,
        lm=lambda: (tiny_lm, load_lm(str(tiny_model_dir), "float32", "cpu")[1]),
        mean_activation=lambda n: rows[:n].mean(0),
    )
    plan = EvalPlan(60, downstream_contexts=2, batch_contexts=2, ablation_contexts=2, feature_tokens=60, probes=False)
    record = evaluate_sae(sae, plan, source, progress=False)
    assert record.metrics["normalized_mse"] == pytest.approx(fvu, rel=1e-4)
    assert record.metrics["l0"] == pytest.approx(fired.float().mean().item())
    assert record.metrics["ce_increase"] > 0 and record.metrics["ablation_sparsity_samples"] > 0
    sample = record.features
    assert sample is not None and sample.values.shape == (60, int(fired.max()))
    dense = torch.zeros(60, 64).scatter_(1, torch.from_numpy(sample.indices), torch.from_numpy(sample.values))
    assert torch.allclose(dense, codes, atol=1e-6)
