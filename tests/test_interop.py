"""SAEs out to and in from SAELens and sparsify, checked in the peers' own code: their loaders open
what saeflow exports and compute the same codes and reconstructions, and saeflow imports what their
own code made and computes what they compute. The peers live in their own venv (.bench-peers/,
built on first use, as the peer benchmarks build it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae.config import SAEConfig, TrainConfig
from sae.model import TopKSAE
from sae.train import train_sae
from storage import formats, hook_names

HERE = Path(__file__).parent
D, N, K = 24, 96, 6


@pytest.fixture(scope="session")
def peers_python():
    sys.path.insert(0, str(HERE.parent / "benchmarks"))
    from train_throughput import peers_python as build

    return build(None)


def inputs(tmp_path) -> tuple[torch.Tensor, Path]:
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(1)) * 3 + 1
    path = tmp_path / "inputs.safetensors"
    save_file({"x": x}, path)
    return x, path


def in_peer(python, action, library, directory, inputs_path, tmp_path, *extra) -> dict[str, torch.Tensor]:
    out = tmp_path / f"{library}-{action}-out.safetensors"
    done = subprocess.run(
        [
            python,
            str(HERE / "peer_roundtrip.py"),
            action,
            library,
            str(directory),
            str(inputs_path),
            str(out),
            *map(str, extra),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(out)


def ours(sae: TopKSAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        codes = sae.encode(x)
        return codes.dense(sae.cfg.n_latents), sae.decode(codes)


def random_sae(normalization: str) -> TopKSAE:
    g = torch.Generator().manual_seed(2)
    sae = TopKSAE(SAEConfig(D, N, K, encoder_bias=True, normalization=normalization))
    sae.reset_parameters(generator=g)
    with torch.no_grad():
        sae.W_enc.mul_(torch.rand(N, 1, generator=g) + 0.5)
        sae.b_enc.copy_(torch.randn(N, generator=g) * 0.1)
        sae.b_pre.copy_(torch.randn(D, generator=g) * 0.2)
        sae.input_scale.fill_(0.37 if normalization == "dataset_scale" else 1.0)
    sae.metadata = {"model": "tiny-lm", "hookpoint": "model.layers.1"}
    return sae


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5)


CASES = [
    ("saelens", "none"),
    ("saelens", "dataset_scale"),
    ("saelens", "standardize"),
    ("sparsify", "none"),
    ("sparsify", "dataset_scale"),
]


@pytest.mark.parametrize("library, normalization", CASES)
def test_export_opens_in_the_peers_loader_and_computes_the_same(peers_python, tmp_path, library, normalization):
    sae = random_sae(normalization)
    x, x_path = inputs(tmp_path)
    out = formats.export(sae, library, tmp_path / library)
    theirs = in_peer(peers_python, "load", library, out, x_path, tmp_path)
    codes, recon = ours(sae, x)
    assert close(theirs["codes"], codes), (theirs["codes"] - codes).abs().max()
    assert close(theirs["recon"], recon), (theirs["recon"] - recon).abs().max()
    back = formats.read(out)  # and the exported files read back into the same SAE
    assert close(ours(back, x)[1], recon)


@pytest.mark.parametrize(
    "library, normalization", [("saelens", "none"), ("saelens", "layer_norm"), ("sparsify", "none")]
)
def test_import_of_an_sae_made_by_the_peers_code_computes_what_theirs_does(
    peers_python, tmp_path, library, normalization
):
    x, x_path = inputs(tmp_path)
    theirs = in_peer(peers_python, "make", library, tmp_path / library, x_path, tmp_path, N, K, normalization)
    sae = TopKSAE.from_pretrained(tmp_path / library)
    assert sae.metadata["imported_from"] == library
    codes, recon = ours(sae, x)
    assert close(codes, theirs["codes"]), (codes - theirs["codes"]).abs().max()
    assert close(recon, theirs["recon"]), (recon - theirs["recon"]).abs().max()


def random_transcoder(skip: bool, normalization: str) -> TopKSAE:
    g = torch.Generator().manual_seed(3)
    sae = TopKSAE(SAEConfig(D, N, K, normalization=normalization, transcoder=True, skip_connection=skip))
    sae.reset_parameters(generator=g)
    with torch.no_grad():
        sae.W_enc.mul_(torch.rand(N, 1, generator=g) + 0.5)
        sae.W_dec.mul_(torch.rand(N, 1, generator=g) + 0.5)  # imported transcoders need not have unit rows
        sae.b_enc.copy_(torch.randn(N, generator=g) * 0.1)
        sae.b_pre.copy_(torch.randn(D, generator=g) * 0.2)
        if sae.W_skip is not None:
            sae.W_skip.copy_(torch.randn(D, D, generator=g) / D)
        sae.input_scale.fill_(0.37 if normalization == "dataset_scale" else 1.0)
        sae.target_scale.fill_(2.3 if normalization == "dataset_scale" else 1.0)
    sae.metadata = {"model": "tiny-lm", "hookpoint": "model.layers.1.mlp"}
    return sae


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("normalization", ["none", "dataset_scale"])
def test_transcoders_round_trip_through_sparsify_exactly(peers_python, tmp_path, skip, normalization):
    """saeflow's transcoder exported: sparsify's loader and forward predict what saeflow predicts; and a
    transcoder made by sparsify's own code imports and predicts what sparsify's forward does."""
    sae = random_transcoder(skip, normalization)
    x, x_path = inputs(tmp_path)
    out = formats.export(sae, "sparsify", tmp_path / "exported")
    assert json.loads((out / "cfg.json").read_text())["transcode"] is True
    theirs = in_peer(peers_python, "load", "sparsify", out, x_path, tmp_path)
    codes, predicted = ours(sae, x)
    assert close(theirs["codes"], codes), (theirs["codes"] - codes).abs().max()
    assert close(theirs["recon"], predicted), (theirs["recon"] - predicted).abs().max()
    back = formats.read(out)
    assert back.cfg.transcoder and back.cfg.skip_connection == skip
    assert close(ours(back, x)[1], predicted)

    kind = "skip" if skip else "transcode"
    made = in_peer(peers_python, "make", "sparsify", tmp_path / "made", x_path, tmp_path, N, K, "none", kind)
    imported = TopKSAE.from_pretrained(tmp_path / "made")
    assert imported.cfg.transcoder and imported.cfg.skip_connection == skip
    codes, predicted = ours(imported, x)
    assert close(codes, made["codes"]), (codes - made["codes"]).abs().max()
    assert close(predicted, made["recon"]), (predicted - made["recon"]).abs().max()


SAELENS_THRESHOLDED = [
    "standard",
    "jumprelu",
    "transcoder",
    "skip_transcoder",
    "jumprelu_transcoder",
    "jumprelu_skip_transcoder",
]


def in_peer_many(python, jobs: list[list], tmp_path, name: str) -> list[dict[str, torch.Tensor]]:
    """Several peer_roundtrip.py jobs (action, library, directory, inputs, *extra) in one process: each
    job's outputs (written as NAME-i)."""
    outs = [tmp_path / f"{name}-{i}.safetensors" for i in range(len(jobs))]
    listed = [[str(a) for a in job[:4]] + [str(out)] + [str(a) for a in job[4:]] for job, out in zip(jobs, outs)]
    (tmp_path / f"{name}.json").write_text(json.dumps(listed))
    done = subprocess.run(
        [python, str(HERE / "peer_roundtrip.py"), "many", str(tmp_path / f"{name}.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [load_file(out) for out in outs]


def test_saelens_relu_and_jumprelu_dictionaries_round_trip_exactly(peers_python, tmp_path):
    """Each SAELens ReLU or JumpReLU SAE or (skip-)transcoder made by its own classes imports and
    computes SAELens's codes and outputs; exported again, SAELens's loader opens it as the same
    architecture and computes them again (one peer process makes all six, one loads them back)."""
    x, x_path = inputs(tmp_path)
    norm = {"jumprelu": "layer_norm"}  # the others take raw activations
    made = in_peer_many(
        peers_python,
        [["make", "saelens", tmp_path / a, x_path, N, K, norm.get(a, "none"), a] for a in SAELENS_THRESHOLDED],
        tmp_path,
        "made",
    )
    for architecture, theirs in zip(SAELENS_THRESHOLDED, made):
        sae = TopKSAE.from_pretrained(tmp_path / architecture)
        transcoder = "transcoder" in architecture
        kind = (sae.cfg.activation, sae.cfg.transcoder, sae.cfg.skip_connection)
        assert kind == ("jumprelu", transcoder, "skip" in architecture), architecture
        assert sae.metadata["hookpoint"] == ("model.layers.1.mlp" if transcoder else "model.layers.1")
        codes, out = ours(sae, x)
        fired = (codes > 0).sum(1)
        assert fired.min() < fired.max() and fired.max() > K  # codes of varying width, wider than any k here
        assert close(codes, theirs["codes"]), (architecture, (codes - theirs["codes"]).abs().max())
        assert close(out, theirs["recon"]), (architecture, (out - theirs["recon"]).abs().max())
        back = formats.export(sae, "saelens", tmp_path / "back" / architecture)
        config = json.loads((back / "cfg.json").read_text())
        assert config["architecture"] == architecture
        if transcoder:
            assert config["metadata"]["hook_name_out"] == "blocks.1.hook_mlp_out"
    again = in_peer_many(
        peers_python,
        [["load", "saelens", tmp_path / "back" / a, x_path] for a in SAELENS_THRESHOLDED],
        tmp_path,
        "loaded",
    )
    for architecture, theirs, loaded in zip(SAELENS_THRESHOLDED, made, again):
        assert close(loaded["codes"], theirs["codes"]), (architecture, (loaded["codes"] - theirs["codes"]).abs().max())
        assert close(loaded["recon"], theirs["recon"]), (architecture, (loaded["recon"] - theirs["recon"]).abs().max())


def jumprelu_transcoder() -> TopKSAE:
    g = torch.Generator().manual_seed(4)
    sae = TopKSAE(
        SAEConfig(D, N, N, activation="jumprelu", normalization="none", transcoder=True, skip_connection=True)
    )
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(N, generator=g) * 0.1)
        sae.threshold.copy_(torch.rand(N, generator=g))
        sae.W_skip.copy_(torch.randn(D, D, generator=g) / D)
    return sae


def test_a_jumprelu_code_is_every_latent_above_its_threshold_and_saves_and_loads(tmp_path):
    """Against a dense reference: ReLU(pre) * (pre > threshold); k bounds the width when given; the
    per-latent thresholds survive save and load; training one is refused in one line."""
    sae = jumprelu_transcoder()
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(5)) * 3
    pre = x @ sae.W_enc.T + sae.b_enc
    reference = torch.relu(pre) * (pre > sae.threshold)
    with torch.no_grad():
        codes = sae.encode(x)
        assert torch.equal(codes.dense(N), reference)
        assert codes.values.shape[1] == int((reference > 0).sum(1).max())
        prediction = reference @ sae.W_dec + sae.b_pre + x @ sae.W_skip.T
        assert torch.allclose(sae.predict(x), prediction, atol=1e-5)
        assert sae.encode(x, k=3).values.shape[1] == 3
        loaded = TopKSAE.load(sae.save(tmp_path / "jump"))
        assert torch.equal(loaded.threshold, sae.threshold) and torch.equal(loaded.predict(x), sae.predict(x))
    with pytest.raises(ValueError, match="activation jumprelu: saeflow trains topk and batchtopk"):
        train_sae(sae.cfg, TrainConfig(batch_tokens=8), x, target=x, progress=False)
    with pytest.raises(formats.FormatError, match="activation jumprelu: only topk dictionaries export to sparsify"):
        formats.export(sae, "sparsify", tmp_path / "out")


def test_a_topk_transcoder_is_refused_by_saelens_export_naming_why(tmp_path):
    with pytest.raises(formats.FormatError, match="SAELens's transcoders are ReLU or JumpReLU"):
        formats.export(random_transcoder(True, "none"), "saelens", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_standardizing_sae_is_refused_by_sparsify_export_naming_why(tmp_path):
    with pytest.raises(formats.FormatError, match="normalization standardize: sparsify's SparseCoder takes raw"):
        formats.export(random_sae("standardize"), "sparsify", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# the names other tools attach by ----------------------------------------------------------------------
def test_hook_and_model_names_other_tools_use(tmp_path):
    assert hook_names.transformer_lens_hook("model.layers.20") == "blocks.20.hook_resid_post"
    assert hook_names.transformer_lens_hook("transformer.h.3") == "blocks.3.hook_resid_post"
    assert hook_names.transformer_lens_hook("model.layers.5.mlp") == "blocks.5.hook_mlp_out"
    assert hook_names.transformer_lens_hook("model.layers.5.self_attn") == "blocks.5.hook_attn_out"
    assert hook_names.transformer_lens_hook("model.norm") is None
    for module in ("model.layers.20", "model.layers.5.mlp", "model.layers.5.self_attn", "model.embed_tokens"):
        assert hook_names.hf_module(hook_names.transformer_lens_hook(module) or "") == module
    assert hook_names.hub_id("builtin:smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hook_names.hub_id("EleutherAI/pythia-70m") == "EleutherAI/pythia-70m"
    local = tmp_path / "lm"
    local.mkdir()
    (local / "config.json").write_text('{"_name_or_path": "gpt2"}')  # not a hub id of the org/name form
    assert hook_names.hub_id(str(local)) is None
    (local / "config.json").write_text('{"_name_or_path": "openai-community/gpt2"}')
    assert hook_names.hub_id(str(local)) == "openai-community/gpt2"


def test_saelens_export_carries_the_names_saelens_attaches_by_and_imports_back(tmp_path):
    sae = random_sae("standardize")
    sae.metadata = {"model": "builtin:smollm2-135m", "hookpoint": "model.layers.20", "model_revision": "abc123"}
    out = formats.export(sae, "saelens", tmp_path / "lens")
    meta = json.loads((out / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "blocks.20.hook_resid_post" and meta["hf_hook_name"] == "model.layers.20"
    assert meta["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["model_from_pretrained_kwargs"] == {"revision": "abc123"}
    back = formats.read(out)
    assert (back.metadata["model"], back.metadata["hookpoint"]) == ("builtin:smollm2-135m", "model.layers.20")


def test_saelens_hooked_sae_transformer_attaches_the_export(peers_python, tmp_path):
    """SAELens' own HookedSAETransformer puts the export at the hook its config names, and the SAE
    there computes saeflow's codes of what reaches it."""
    sae = random_sae("standardize")
    sae.metadata = {"model": "tiny-lm", "hookpoint": "model.layers.1"}
    out = formats.export(sae, "saelens", tmp_path / "lens")
    tokens = tmp_path / "tokens.safetensors"
    save_file({"tokens": torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(3))}, tokens)
    theirs = in_peer(peers_python, "attach", "saelens", out, tokens, tmp_path)
    codes, _ = ours(sae, theirs["resid"])
    assert theirs["resid"].shape == (32, D) and close(theirs["codes"], codes), (theirs["codes"] - codes).abs().max()
