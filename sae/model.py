"""The TopK sparse autoencoder (Gao et al. 2024, §2.3), carrying its own input normalisation."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn

from sae.config import SAEConfig
from sae.files import CHECKSUM, CONFIG_FILE, WEIGHTS_FILE
from sae.kernels import sparse_decode, topk_encode


class DamagedWeights(ValueError):
    """An SAE's weights file is unreadable or no longer the one its config.json was written with."""


def read_weights(directory: Path, sha256: str | None) -> dict[str, torch.Tensor]:
    """The tensors of directory/sae.safetensors, checked against `sha256` when there is one (SAEs
    saved before checksums, or by other tools, have none)."""
    path = directory / WEIGHTS_FILE
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise DamagedWeights(
            f"{path} does not match the sha256 in its {CONFIG_FILE} (damaged, or changed since it was saved): "
            "train it again, or pull it again"
        )
    try:
        return load(data)
    except SafetensorError as e:
        raise DamagedWeights(
            f"{path} is not a readable safetensors file ({e}): train it again, or pull it again"
        ) from None


def shape_misfits(cfg: SAEConfig, tensors: dict[str, torch.Tensor]) -> list[str]:
    """How `tensors` disagree with the shapes an SAE of `cfg` has, one phrase each (empty when they fit);
    the config's shapes come from a meta-device model, so a huge config allocates nothing."""
    expected = expected_shapes(cfg)
    return [
        f"{name} has shape {tuple(t.shape)}, but the config says {expected[name]}"
        for name, t in sorted(tensors.items())
        if name in expected and tuple(t.shape) != expected[name]
    ]


def expected_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in an SAE of `cfg`."""
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in TopKSAE(cfg).state_dict().items()}


STANDARDIZE_EPS = 1e-5  # as in the released GPT-2 SAEs
SOURCES_GROUP = "saeflow.sae_sources"  # entry points: ref -> TopKSAE | None (from_pretrained)


@dataclass
class NormStats:
    """What decode needs to map a normalised reconstruction back to the raw activation space."""

    shift: torch.Tensor  # (B, 1) or scalar
    scale: torch.Tensor  # (B, 1) or scalar

    def undo(self, x_norm: torch.Tensor) -> torch.Tensor:
        return x_norm * self.scale + self.shift


@dataclass
class Codes:
    """A sparse code: the k kept (post-ReLU) values per token and their latent indices, and, from
    `TopKSAE.encode`, the per-token normalisation that `decode` undoes to return raw activations."""

    values: torch.Tensor  # (B, k)
    indices: torch.Tensor  # (B, k) int64
    stats: NormStats | None = None

    def dense(self, n_latents: int) -> torch.Tensor:
        out = self.values.new_zeros(self.values.shape[0], n_latents)
        return out.scatter_(1, self.indices, self.values)

    def prefix(self, end: int) -> Codes:
        """The code of the first `end` latents alone (the others zeroed): what a Matryoshka SAE's prefix
        of that size reconstructs from."""
        return Codes(self.values * (self.indices < end), self.indices, self.stats)


class TopKSAE(nn.Module):
    """z = ReLU(TopK(W_enc (x - b_pre) [+ b_enc])), x_hat = W_dec^T z + b_pre, on normalised x.

    `encode`, `decode` and `forward` take and return raw activations; normalisation is applied and
    undone inside. Decoder rows (one per latent) have unit norm.
    """

    input_scale: torch.Tensor  # buffers (register_buffer below)
    threshold: torch.Tensor

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        n, d = cfg.n_latents, cfg.d_in
        self.W_dec = nn.Parameter(torch.empty(n, d))
        self.W_enc = nn.Parameter(torch.empty(n, d))
        self.b_pre = nn.Parameter(torch.zeros(d))
        self.b_enc = nn.Parameter(torch.zeros(n)) if cfg.encoder_bias else None
        # dataset_scale: a constant multiplier fixed before training; 1 for the other modes
        self.register_buffer("input_scale", torch.ones(()))
        # batchtopk: inference keeps latents above this (a running average of the training batches'
        # smallest kept activation)
        self.register_buffer("threshold", torch.zeros(()))
        self.metadata: dict = {}
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Decoder rows random unit vectors, encoder = decoder transpose (§A.1 tied init)."""
        w = torch.randn(self.W_dec.shape, generator=generator)
        self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        self.W_enc.copy_(self.W_dec)

    # normalisation -------------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, NormStats]:
        x = x.to(self.W_enc.dtype)
        mode = self.cfg.normalization
        if mode == "standardize":
            # as the released code's LN (and SAELens' layer_norm): divide by std + eps, undo with std
            mean = x.mean(dim=-1, keepdim=True)
            std = x.std(dim=-1, keepdim=True)
            return (x - mean) / (std + STANDARDIZE_EPS), NormStats(shift=mean, scale=std)
        if mode == "dataset_scale":
            zero = x.new_zeros(())
            return x * self.input_scale, NormStats(shift=zero, scale=1 / self.input_scale)
        one, zero = x.new_ones(()), x.new_zeros(())
        return x, NormStats(shift=zero, scale=one)

    # the autoencoder on normalised inputs ------------------------------------------------------------
    def encode_normalized(self, x_norm: torch.Tensor, k: int | None = None) -> Codes:
        """The top k latents per token (default cfg.k; for batchtopk, up to 4k above the threshold)."""
        batch_topk = self.cfg.activation == "batchtopk"
        width = k or (min(4 * self.cfg.k, self.cfg.n_latents) if batch_topk else self.cfg.k)
        values, indices, _, _ = topk_encode(x_norm - self.b_pre, self.W_enc, self.b_enc, width)
        if batch_topk:
            values = values * (values > self.threshold)
        return Codes(values, indices)

    def decode_normalized(self, codes: Codes) -> torch.Tensor:
        return sparse_decode(codes.values, codes.indices, self.W_dec) + self.b_pre

    # raw-space API ------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, k: int | None = None) -> Codes:
        """Codes of raw activations; they carry the normalisation, so `decode(encode(x))` is raw."""
        x_norm, stats = self.normalize(x)
        codes = self.encode_normalized(x_norm, k)
        codes.stats = stats
        return codes

    def decode(self, codes: Codes, stats: NormStats | None = None) -> torch.Tensor:
        """Raw reconstruction of codes from `encode` (or of normalised codes with their `stats`)."""
        stats = stats or codes.stats
        if stats is None:
            if self.cfg.normalization == "standardize":
                raise ValueError(
                    "decode: these codes carry no per-token normalisation (they did not come "
                    "from encode); pass stats=, or use decode_normalized for the normalised space"
                )
            _, stats = self.normalize(self.b_pre[None])
        return stats.undo(self.decode_normalized(codes))

    def forward(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Raw activations in, raw reconstruction out."""
        x_norm, stats = self.normalize(x)
        return self.decode(self.encode_normalized(x_norm, k), stats)

    # persistence: safetensors + JSON, loadable without MLflow or Prefect ----------------------------
    def save(self, directory: str | os.PathLike, metadata: dict | None = None) -> Path:
        """Writes sae.safetensors and config.json into `directory` (written to temp names first)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise FloatingPointError(f"not saving an SAE with non-finite weights ({', '.join(bad)}) to {out}")
        tmp_w, tmp_c = out / (WEIGHTS_FILE + ".tmp"), out / (CONFIG_FILE + ".tmp")
        data = save(tensors)
        tmp_w.write_bytes(data)
        config = {"sae": self.cfg.to_dict(), "metadata": metadata or {}, CHECKSUM: hashlib.sha256(data).hexdigest()}
        tmp_c.write_text(json.dumps(config, indent=2))
        os.replace(tmp_w, out / WEIGHTS_FILE)
        os.replace(tmp_c, out / CONFIG_FILE)
        return out

    @classmethod
    def from_pretrained(
        cls, ref: str | os.PathLike, device: str | torch.device = "cpu", tracking_uri: str | None = None
    ) -> TopKSAE:
        """A saeflow SAE directory, or any reference an installed source resolves: saeflow's storage
        package adds models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN/PATH (from `tracking_uri`,
        else $MLFLOW_TRACKING_URI, else ./.saeflow/mlflow.db) and SAELens or sparsify directories
        (entry point group `saeflow.sae_sources`; this package imports none of them)."""
        from importlib.metadata import entry_points

        for source in entry_points(group=SOURCES_GROUP):
            found = source.load()(str(ref), tracking_uri=tracking_uri)
            if found is not None:
                return found.to(device)
        if (Path(ref) / CONFIG_FILE).is_file():
            return cls.load(ref, device)
        raise FileNotFoundError(
            f"{ref}: not an SAE directory, nor a reference an installed source resolves "
            "(models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN/PATH need saeflow's storage package)"
        )

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> TopKSAE:
        """Loads what `save` (or `saeflow pull`) wrote: `TopKSAE.load("path/to/dir")`."""
        d = Path(directory)
        meta = json.loads((d / CONFIG_FILE).read_text())
        cfg = SAEConfig(**meta["sae"])
        tensors = read_weights(d, meta.get(CHECKSUM))
        wrong = shape_misfits(cfg, tensors)  # before any allocation
        if wrong:
            raise DamagedWeights(f"{d / WEIGHTS_FILE} does not fit {d / CONFIG_FILE}: {'; '.join(wrong)}")
        sae = cls(cfg)
        sae.load_state_dict(tensors)
        sae.metadata = meta.get("metadata", {})
        return sae.to(device)
