"""SAEs in and out of the field's other on-disk formats: SAELens (`SAE.load_from_disk`) and EleutherAI
sparsify (`SparseCoder.load_from_disk`), each in its own file names, keys, orientation and config.

The three models compute the same thing on their inputs, z = ReLU(TopK(W_enc (x - b_dec) + b_enc)) and
x_hat = W_dec^T z + b_dec; they differ in what they do to the input first. saeflow's `dataset_scale`
(one constant s) is folded into the weights exactly, so that codes and reconstructions are unchanged:
W_enc -> s W_enc, W_dec -> W_dec / s, b_dec -> b_dec / s. Per-token standardisation is SAELens'
`layer_norm` (the same arithmetic); sparsify has no input normalisation, so an SAE that standardises
is refused there rather than silently changed.

Transcoders go to and come from sparsify (`transcode`, `skip_connection`): its encoder reads the input
as it is and its W_skip (d_out, d_in) adds to the prediction, as saeflow's do; the input's and the
target's scales are folded in likewise. SAELens's transcoders (and its `standard` and `jumprelu`
SAEs, Gemma Scope's form) are ReLU or JumpReLU, z = ReLU(pre) * (pre > threshold): they come in as
saeflow's `activation: jumprelu` (ReLU: thresholds 0) and go back out as what they were. A TopK
transcoder has no SAELens form, so its export there is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from sae.config import Activation, Normalization, SAEConfig
from sae.files import CHECKSUM as WEIGHTS_CHECKSUM
from sae.files import CONFIG_FILE, WEIGHTS_FILE
from sae.model import DamagedWeights, TopKSAE, expected_shapes, read_weights, shape_misfits
from storage.hook_names import hf_module, hub_id, transformer_lens_hook, transformer_lens_mlp_hooks
from storage.outputs import staged

FORMATS = ("saeflow", "saelens", "sparsify")
# SAELens architecture -> (saeflow activation, transcoder, skip_connection); its ReLU dictionaries
# (standard, transcoder, skip_transcoder) are JumpReLU ones with thresholds 0
SAELENS_KINDS: dict[str, tuple[Activation, bool, bool]] = {
    "topk": ("topk", False, False),
    "standard": ("jumprelu", False, False),
    "jumprelu": ("jumprelu", False, False),
    "transcoder": ("jumprelu", True, False),
    "skip_transcoder": ("jumprelu", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False),
    "jumprelu_skip_transcoder": ("jumprelu", True, True),
}
SAELENS_CONFIG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
SPARSIFY_CONFIG, SPARSIFY_WEIGHTS = "cfg.json", "sae.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"  # the config layout SAELens 6 reads without converting it


class FormatError(ValueError):
    """A directory, config or weights file that is not what its format says: one line naming it."""


def detect(directory: str | Path) -> str:
    d = Path(directory)
    if (d / CONFIG_FILE).is_file() and (d / WEIGHTS_FILE).is_file():
        return "saeflow"
    if (d / SAELENS_CONFIG).is_file() and (d / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if (d / SPARSIFY_CONFIG).is_file() and (d / SPARSIFY_WEIGHTS).is_file():
        return "sparsify"
    if not d.is_dir():
        raise FormatError(f"{d}: no such directory")
    raise FormatError(
        f"{d}: not an SAE directory in a known format: expected {CONFIG_FILE} + {WEIGHTS_FILE} (saeflow), "
        f"{SAELENS_CONFIG} + {SAELENS_WEIGHTS} (SAELens) or {SPARSIFY_CONFIG} + {SPARSIFY_WEIGHTS} (sparsify)"
    )


def read(directory: str | Path) -> TopKSAE:
    """An SAE from a directory in any of the three formats (float32, on the CPU)."""
    d = Path(directory)
    fmt = detect(d)
    if fmt == "saeflow":
        config = _json(d / CONFIG_FILE)
        cfg = _config(d / CONFIG_FILE, lambda: SAEConfig(**config["sae"]))
        try:
            tensors = read_weights(d, config.get(WEIGHTS_CHECKSUM))
        except DamagedWeights as e:
            raise FormatError(str(e)) from None
        sae = _load_into(cfg, tensors, d / WEIGHTS_FILE)
        sae.metadata = config.get("metadata", {})
        return sae
    return (_read_saelens if fmt == "saelens" else _read_sparsify)(d)


# export ---------------------------------------------------------------------------------------------
def export(sae: TopKSAE, fmt: str, out: str | Path) -> Path:
    """Writes `sae` in `fmt`'s own layout into `out` (whole, or not at all: storage/outputs.py);
    raises FormatError where the format cannot say exactly what the SAE computes."""
    if fmt not in FORMATS:
        raise FormatError(f"format {fmt!r}: use one of {', '.join(FORMATS)}")
    with staged(out) as folder:
        _write(sae, fmt, folder)
    return Path(out)


def _write(sae: TopKSAE, fmt: str, out: Path) -> Path:
    if fmt == "saeflow":
        return sae.save(out, sae.metadata)
    if sae.cfg.cross_layer:
        raise FormatError(
            f"cross_layer: {fmt} has no cross-layer transcoder file that this one maps to exactly (sparsify "
            "1.3.3, the newest release, has none): keep it in saeflow's format"
        )
    if fmt == "saelens" and sae.cfg.transcoder and sae.cfg.activation == "topk":
        raise FormatError(
            "transcoder: SAELens's transcoders are ReLU or JumpReLU (no TopK), so no SAELens file computes what "
            "this TopK transcoder does: export to sparsify (its transcode format) or saeflow"
        )
    exports = ("topk", "jumprelu") if fmt == "saelens" else ("topk",)
    if sae.cfg.activation not in exports:
        raise FormatError(
            f"activation {sae.cfg.activation}: only {' and '.join(exports)} dictionaries export to {fmt} (it has "
            f"no inference that computes what saeflow's {sae.cfg.activation} does)"
        )
    if fmt == "sparsify" and sae.cfg.normalization == "standardize":
        raise FormatError(
            "normalization standardize: sparsify's SparseCoder takes raw activations and no linear map "
            "can express a per-token standardisation; export to saelens (its layer_norm), or train with "
            "normalization: none or dataset_scale"
        )
    out.mkdir(parents=True, exist_ok=True)
    return (_write_saelens if fmt == "saelens" else _write_sparsify)(sae, out, *_raw_weights(sae))


def _write_sparsify(sae: TopKSAE, out: Path, W_enc, b_enc, W_dec, b_dec, W_skip) -> Path:
    unit = bool(torch.allclose(W_dec.norm(dim=1), torch.ones(W_dec.shape[0]), atol=1e-4))
    config = {
        "activation": "topk",
        "expansion_factor": max(sae.cfg.n_latents // sae.cfg.d_in, 1),
        "normalize_decoder": unit,
        "num_latents": sae.cfg.n_latents,
        "k": sae.cfg.k,
        "multi_topk": False,
        "skip_connection": sae.cfg.skip_connection,
        "transcode": sae.cfg.transcoder,
        "d_in": sae.cfg.d_in,
    }
    weights = {"encoder.weight": W_enc, "encoder.bias": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if W_skip is not None:
        weights["W_skip"] = W_skip
    (out / SPARSIFY_WEIGHTS).write_bytes(save(weights))
    (out / SPARSIFY_CONFIG).write_text(json.dumps(config, indent=2))
    return out


def _write_saelens(sae: TopKSAE, out: Path, W_enc, b_enc, W_dec, b_dec, W_skip) -> Path:
    cfg, meta = sae.cfg, sae.metadata
    weights = {"W_enc": W_enc.T.contiguous(), "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    # the names SAELens' tooling attaches by (HookedSAETransformer: TransformerLens hooks)
    module = meta.get("hookpoint") or ""
    names = {"hook_name": transformer_lens_hook(module) or meta.get("hookpoint"), "hf_hook_name": meta.get("hookpoint")}
    config = {"d_in": cfg.d_in, "d_sae": cfg.n_latents, "dtype": "float32", "device": "cpu"}
    if cfg.activation == "topk":
        config.update(architecture="topk", k=cfg.k, rescale_acts_by_decoder_norm=False)
    else:
        thresholds = sae.threshold.detach().float().cpu().contiguous()
        relu = not bool(thresholds.any())  # thresholds 0: SAELens's ReLU form, as it came in
        kind = ("jumprelu", cfg.transcoder, cfg.skip_connection)
        names_of_kind = [name for name, of in SAELENS_KINDS.items() if of == kind]  # the ReLU one and the JumpReLU one
        config["architecture"] = next(name for name in names_of_kind if name.startswith("jumprelu") != relu)
        if not relu:
            weights["threshold"] = thresholds
    if cfg.transcoder:  # its encoder reads the MLP's input as it is; SAELens refuses b_dec there
        config.update(d_out=cfg.d_in, apply_b_dec_to_input=False, normalize_activations="none")
        hook_in, hook_out = transformer_lens_mlp_hooks(module)
        names.update(hook_name=hook_in or module, hook_name_out=hook_out or module, hf_hook_name_out=module)
        if W_skip is not None:
            weights["W_skip"] = W_skip
    else:
        normalize = "layer_norm" if cfg.normalization == "standardize" else "none"
        config.update(apply_b_dec_to_input=True, normalize_activations=normalize)
    config.update(
        reshape_activations="none",
        metadata={
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": SAELENS_FORMAT_VERSION,
            "model_name": hub_id(meta.get("model")) or meta.get("model"),
            **names,
            "model_source": meta.get("model"),
            "model_from_pretrained_kwargs": {"revision": meta["model_revision"]} if meta.get("model_revision") else {},
            "exported_by": "saeflow",
        },
    )
    (out / SAELENS_WEIGHTS).write_bytes(save(weights))  # (save_file writes 0600)
    (out / SAELENS_CONFIG).write_text(json.dumps(config, indent=2))
    return out


def _raw_weights(sae: TopKSAE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(W_enc, b_enc, W_dec, b_dec, W_skip or None) of the same map on the raw input (an SAE's, or a
    transcoder's), predicting the raw target."""
    W_enc, W_dec, b_pre = (t.detach().float().cpu() for t in (sae.W_enc, sae.W_dec, sae.b_pre))
    b_enc = sae.b_enc.detach().float().cpu() if sae.b_enc is not None else torch.zeros(sae.cfg.n_latents)
    W_skip = sae.W_skip.detach().float().cpu() if sae.W_skip is not None else None
    if sae.cfg.normalization == "dataset_scale":
        s_in = float(sae.input_scale)  # pyright: ignore[reportArgumentType]  (a registered buffer: a tensor)
        s_out = float(sae.target_scale) if sae.cfg.transcoder else s_in  # pyright: ignore[reportArgumentType]
        W_enc, W_dec, b_pre = W_enc * s_in, W_dec / s_out, b_pre / s_out
        W_skip = W_skip * (s_in / s_out) if W_skip is not None else None
    W_enc, b_enc, W_dec, b_pre = (t.contiguous() for t in (W_enc, b_enc, W_dec, b_pre))
    return W_enc, b_enc, W_dec, b_pre, (W_skip.contiguous() if W_skip is not None else None)


# import ---------------------------------------------------------------------------------------------
def _read_saelens(d: Path) -> TopKSAE:
    cfg = _json(d / SAELENS_CONFIG)
    where, path = d / SAELENS_CONFIG, d / SAELENS_WEIGHTS
    kind = SAELENS_KINDS.get(str(cfg.get("architecture")))
    if kind is None:
        raise FormatError(
            f"{where}: architecture {cfg.get('architecture')!r}: saeflow imports SAELens's {', '.join(SAELENS_KINDS)}"
        )
    activation, transcoder, skip = kind
    norm = _saelens_normalization(cfg, where, transcoder)
    if cfg.get("reshape_activations", "none") != "none":
        raise FormatError(f"{where}: reshape_activations {cfg['reshape_activations']!r}: only flat activations import")
    if transcoder and cfg.get("d_out", cfg.get("d_in")) != cfg.get("d_in"):
        raise FormatError(
            f"{where}: d_out {cfg.get('d_out')} is not d_in {cfg.get('d_in')}: saeflow's transcoders predict an "
            "MLP's output from its input, of one width"
        )
    k = "k" if activation == "topk" else "d_sae"  # JumpReLU codes have no k: every latent may fire
    sae_cfg = _config(
        where,
        lambda: SAEConfig(
            cfg["d_in"], cfg["d_sae"], cfg[k], True, norm, activation, transcoder=transcoder, skip_connection=skip
        ),
    )
    n, d_in = sae_cfg.n_latents, sae_cfg.d_in
    names = ("W_enc", "W_dec", "b_enc", "b_dec")
    expected = {"W_enc": (d_in, n), "W_dec": (n, d_in), "b_enc": (n,), "b_dec": (d_in,)}
    thresholds = cfg["architecture"].startswith("jumprelu")
    if thresholds:
        expected["threshold"] = (n,)
    if skip:
        expected["W_skip"] = (d_in, d_in)
    _check_sizes(path, where, expected)
    w = _tensors(path)
    W_enc, W_dec, b_enc, b_dec = (_key(w, name, path) for name in names)
    W_enc = W_enc.T
    if cfg.get("rescale_acts_by_decoder_norm"):  # decoder taken as normalised: fold its norms in (exact)
        norms = W_dec.norm(dim=1)
        W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
    if not transcoder and not cfg.get("apply_b_dec_to_input", True):  # saeflow's SAEs subtract b_dec: add it back
        b_enc = b_enc + W_enc @ b_dec
    weights = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_pre": b_dec}
    if thresholds:
        weights["threshold"] = _key(w, "threshold", path)
    if skip:
        weights["W_skip"] = _key(w, "W_skip", path)
    sae = _load_into(sae_cfg, weights, path)
    meta = cfg.get("metadata") or {}
    sae.metadata = {
        "imported_from": "saelens",
        "source": str(d),
        "model": meta.get("model_source") or meta.get("model_name"),
        "hookpoint": _saelens_hookpoint(meta, transcoder),
    }
    return sae


def _saelens_normalization(cfg: dict, where: Path, transcoder: bool) -> Normalization:
    """saeflow's name for a SAELens config's input normalisation; a transcoder's must be none (SAELens
    normalises its input but not its prediction, which no saeflow transcoder does)."""
    given = cfg.get("normalize_activations", "none")
    ours: dict[str, Normalization] = {"none": "none"} if transcoder else {"none": "none", "layer_norm": "standardize"}
    if given not in ours:
        raise FormatError(
            f"{where}: normalize_activations {given!r} has no saeflow equivalent for "
            f"{'a transcoder' if transcoder else 'an SAE'} ({' and '.join(ours)} {'has' if transcoder else 'have'})"
        )
    return ours[given]


def _saelens_hookpoint(meta: dict, transcoder: bool) -> str | None:
    """The HF module a SAELens dictionary reads: a transcoder's MLP (by its output hook), an SAE's
    module by its hook."""
    found = transcoder and (meta.get("hf_hook_name_out") or hf_module(meta.get("hook_name_out") or ""))
    if found:
        return found
    hook = meta.get("hook_name")
    return meta.get("hf_hook_name") or hf_module(hook or "") or hook


def _read_sparsify(d: Path) -> TopKSAE:
    cfg = _json(d / SPARSIFY_CONFIG)
    where = d / SPARSIFY_CONFIG
    if cfg.get("activation", "topk") != "topk":
        raise FormatError(f"{where}: activation {cfg['activation']!r}: saeflow imports TopK SAEs only")
    transcode, skip = bool(cfg.get("transcode")), bool(cfg.get("skip_connection"))
    if skip and not transcode:
        raise FormatError(f"{where}: skip_connection without transcode: saeflow imports skip-transcoders only")
    n = cfg.get("num_latents") or cfg.get("d_in", 0) * cfg.get("expansion_factor", 32)
    sae_cfg = _config(
        where,
        lambda: SAEConfig(cfg["d_in"], n, cfg.get("k", 32), True, "none", transcoder=transcode, skip_connection=skip),
    )
    d_in = sae_cfg.d_in
    expected = {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)}
    if skip:
        expected["W_skip"] = (d_in, d_in)
    _check_sizes(d / SPARSIFY_WEIGHTS, where, expected)
    w = _tensors(d / SPARSIFY_WEIGHTS)
    weights = {
        "W_enc": _key(w, "encoder.weight", d / SPARSIFY_WEIGHTS),
        "b_enc": _key(w, "encoder.bias", d / SPARSIFY_WEIGHTS),
        "W_dec": _key(w, "W_dec", d / SPARSIFY_WEIGHTS),
        "b_pre": _key(w, "b_dec", d / SPARSIFY_WEIGHTS),
    }
    if skip:
        weights["W_skip"] = _key(w, "W_skip", d / SPARSIFY_WEIGHTS)
    sae = _load_into(sae_cfg, weights, d / SPARSIFY_WEIGHTS)
    sae.metadata = {"imported_from": "sparsify", "source": str(d)}
    return sae


# reading with errors that name the file -------------------------------------------------------------
def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return data


def _config(path: Path, build) -> SAEConfig:
    try:
        return build()
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{path}: incomplete or invalid SAE config ({type(e).__name__}: {e})") from None


def _check_sizes(path: Path, config: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """The tensors' shapes in the file's header against what its config says, before anything of
    the config's size is allocated (a 200-byte config can claim billions of weights)."""
    try:
        with safe_open(str(path), "pt") as f:
            found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as e:
        raise FormatError(f"{path}: not a readable safetensors file (truncated or damaged?): {e}") from None
    wrong = [
        f"{k} {found[k]} where {config.name} says {v}" for k, v in expected.items() if k in found and found[k] != v
    ]
    if wrong:
        raise FormatError(f"{path} does not fit {config}: {', '.join(wrong)}")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as e:
        raise FormatError(f"{path}: not a readable safetensors file (truncated or damaged?): {e}") from None


def _key(weights: dict, key: str, path: Path) -> torch.Tensor:
    if key not in weights:
        raise FormatError(f"{path}: no tensor {key!r} (it has {', '.join(sorted(weights))})")
    return weights[key].float()


def _load_into(cfg: SAEConfig, weights: dict[str, torch.Tensor], path: Path) -> TopKSAE:
    """An SAE of `cfg` holding `weights`, made once they fit it (the config alone allocates nothing)."""
    wrong = shape_misfits(cfg, weights)
    if wrong:
        raise FormatError(f"{path}: {'; '.join(wrong)}")
    missing = sorted(set(expected_shapes(cfg)) - set(weights) - {"input_scale", "threshold", "target_scale"})
    if missing:
        raise FormatError(f"{path}: missing {', '.join(missing)}")
    sae = TopKSAE(cfg, fill=False)  # every weight matrix is in `weights`, checked above
    with torch.no_grad():
        state = sae.state_dict()
        for name, t in weights.items():
            if name in state:
                state[name].copy_(t.float())
    return sae
