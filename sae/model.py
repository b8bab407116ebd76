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
    # a skip-transcoder's W_skip x (normalised space, (B, d)): part of the prediction the latents do not carry
    skip: torch.Tensor | None = None

    def dense(self, n_latents: int) -> torch.Tensor:
        out = self.values.new_zeros(self.values.shape[0], n_latents)
        return out.scatter_(1, self.indices, self.values)

    def prefix(self, end: int) -> Codes:
        """The code of the first `end` latents alone (the others zeroed): what a Matryoshka SAE's prefix
        of that size reconstructs from."""
        return Codes(self.values * (self.indices < end), self.indices, self.stats, self.skip)

    def first(self, k: int) -> Codes:
        """The first k of each row's kept latents (codes from a wider encode are sorted descending)."""
        return Codes(self.values[:, :k], self.indices[:, :k], self.stats, self.skip)


class TopKSAE(nn.Module):
    """z = ReLU(TopK(W_enc (x - b_pre) [+ b_enc])), x_hat = W_dec^T z + b_pre, on normalised x.

    A transcoder (cfg.transcoder) reads x, an MLP's input, and predicts y, its output:
    z = ReLU(TopK(W_enc x + b_enc)), y_hat = W_dec^T z + b_pre [+ W_skip x], with x and y each scaled
    by its own dataset-level scalar. Its training rows are [x | y], 2 d_in wide (`split`).

    A cross-layer transcoder (cfg.cross_layer = L) reads x = [x_1 .. x_L], the MLP inputs of L
    consecutive layers, and predicts y = [y_1 .. y_L], their outputs: latent block l reads x_l alone
    and keeps its own top k / L, and decodes into y_l .. y_L only (its decoder row is zero on the
    earlier layers and gets no gradient there). Each layer's input and target have their own scalar.

    `encode`, `decode` and `forward` take and return raw activations; normalisation is applied and
    undone inside. Decoder rows (one per latent) have unit norm.
    """

    input_scale: torch.Tensor  # buffers (register_buffer below)
    threshold: torch.Tensor
    target_scale: torch.Tensor  # transcoders only

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None, fill: bool = True):
        """`generator`: the random init's source. `fill=False` leaves the weight matrices unset
        (torch.empty) for a copy or a load that overwrites them: the random init of a large SAE costs
        seconds of host time and its whole size in host memory (25M weights: 0.27 s on an H200's host)."""
        super().__init__()
        self.cfg = cfg
        n, d, width = cfg.n_latents, cfg.d_in, cfg.width()
        self.W_dec = nn.Parameter(torch.empty(n, width))
        self.W_enc = nn.Parameter(torch.empty(n, d))
        self.b_pre = nn.Parameter(torch.zeros(width))
        self.b_enc = nn.Parameter(torch.zeros(n)) if cfg.encoder_reads_bias() else None
        # (d_out, d_in), as sparsify stores it (one such block per layer, stacked, for a cross-layer
        # transcoder); zero at the start: the skip path grows only as it helps
        self.W_skip = nn.Parameter(torch.zeros(width, d)) if cfg.skip_connection else None
        # dataset_scale: a constant multiplier fixed before training (one per layer for a cross-layer
        # transcoder); 1 for the other modes
        scalar = () if not cfg.cross_layer else (cfg.layers(),)
        self.register_buffer("input_scale", torch.ones(scalar))
        # batchtopk: inference keeps latents above this (a running average of the training batches'
        # smallest kept activation); jumprelu: one threshold per latent
        self.register_buffer("threshold", torch.zeros(n if cfg.activation == "jumprelu" else ()))
        if cfg.transcoder:  # the target's dataset_scale multiplier (1 for normalization none)
            self.register_buffer("target_scale", torch.ones(scalar))
        self.metadata: dict = {}
        if fill:
            self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Decoder rows random unit vectors, encoder = decoder transpose (§A.1 tied init)."""
        w = torch.randn(self.W_dec.shape, generator=generator)
        if self.cfg.cross_layer:
            w = self._blocks(w).mul_(self._writes()).flatten(2).flatten(0, 1)
        self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        if self.cfg.cross_layer:  # each latent's encoder row: its decoder row's block on its own layer
            self.W_enc.copy_(torch.diagonal(self._blocks(self.W_dec), dim1=0, dim2=2).permute(2, 0, 1).flatten(0, 1))
        else:
            self.W_enc.copy_(self.W_dec)

    # a cross-layer transcoder's blocks ---------------------------------------------------------------
    def _blocks(self, w: torch.Tensor) -> torch.Tensor:
        """A (n_latents, width) decoder-shaped tensor as (source layer, latent, target layer, d)."""
        L = self.cfg.layers()
        return w.view(L, self.cfg.n_latents // L, L, self.cfg.d_in)

    def _writes(self) -> torch.Tensor:
        """(L, 1, L, 1): whether latents of the source layer write into the target layer (l' >= l)."""
        L = self.cfg.layers()
        return torch.ones(L, L, device=self.W_dec.device).triu()[:, None, :, None]

    @torch.no_grad()
    def restrict_decoder_grad(self) -> None:
        """A cross-layer transcoder's latents write into their own and later layers only: the decoder's
        gradient on earlier layers is dropped, so those blocks stay zero (nothing for other coders)."""
        if self.cfg.cross_layer and self.W_dec.grad is not None:
            self._blocks(self.W_dec.grad).mul_(self._writes())

    def output_directions(self) -> torch.Tensor:
        """(n_latents, d_in): what each latent adds to the model's activations per unit of activation:
        its decoder row, or a cross-layer transcoder's blocks summed over the layers it writes into,
        each in that layer's raw scale (all of them add to one residual stream)."""
        if not self.cfg.cross_layer:
            return self.W_dec
        return (self._blocks(self.W_dec) / self.target_scale[None, None, :, None]).sum(2).flatten(0, 1)

    def _per_column(self, scale: torch.Tensor) -> torch.Tensor:
        """A per-layer scale (L,) as one factor per column of a row (width,); a scalar as it is."""
        return scale if scale.dim() == 0 else scale.repeat_interleave(self.cfg.d_in)

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
            zero, scale = x.new_zeros(()), self._per_column(self.input_scale)
            return x * scale, NormStats(shift=zero, scale=1 / scale)
        one, zero = x.new_ones(()), x.new_zeros(())
        return x, NormStats(shift=zero, scale=one)

    def normalize_target(self, y: torch.Tensor) -> tuple[torch.Tensor, NormStats]:
        """A transcoder's target in its normalised space (its own scalar); an SAE's target is its input."""
        if not self.cfg.transcoder:
            return self.normalize(y)
        y, scale = y.to(self.W_enc.dtype), self._per_column(self.target_scale)
        return y * scale, NormStats(shift=y.new_zeros(()), scale=1 / scale)

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, target) of training rows: [x | y] halves for a transcoder, (x, x) for an SAE."""
        if not self.cfg.transcoder:
            return rows, rows
        d = self.cfg.width()
        if rows.shape[-1] != 2 * d:
            raise ValueError(
                f"a transcoder of input width {d} trains on rows [input | target] of width {2 * d}, "
                f"got {rows.shape[-1]}"
            )
        return rows[..., :d], rows[..., d:]

    # the autoencoder on normalised inputs ------------------------------------------------------------
    def encoder_input(self, x_norm: torch.Tensor) -> torch.Tensor:
        """What W_enc reads: x - b_pre for an SAE; a transcoder's input as it is (b_pre is in the
        target's space; its encoder bias does the centring)."""
        return x_norm if self.cfg.transcoder else x_norm - self.b_pre

    def skip(self, x_norm: torch.Tensor) -> torch.Tensor | None:
        """A skip-transcoder's W_skip x (None without a skip connection); a cross-layer one's maps each
        layer's input to its own layer's output."""
        if self.W_skip is None:
            return None
        if not self.cfg.cross_layer:
            return x_norm @ self.W_skip.T
        L, d = self.cfg.layers(), self.cfg.d_in
        per_layer = torch.einsum("...li,loi->...lo", x_norm.unflatten(-1, (L, d)), self.W_skip.view(L, d, d))
        return per_layer.flatten(-2)

    def select(
        self,
        x_in: torch.Tensor,
        k: int,
        aux_k: int = 0,
        aux_mask: torch.Tensor | None = None,
        aux_latents: torch.Tensor | None = None,
        open_latents: int | None = None,
    ):
        """(values, indices, aux_values, aux_indices): ReLU(TopK) of the encoder on x_in and, for AuxK,
        the top aux_k among the latents of aux_mask (or aux_latents); sae.kernels.topk_encode. With
        `open_latents`, only the first that many latents take part (a Matryoshka ramp's open groups).

        A cross-layer transcoder selects per layer: block l reads x_l and keeps its top k / L (and
        AuxK picks its share of aux_k among block l's dead latents); the codes are the blocks' side by
        side, each sorted descending, with indices into all n_latents."""
        if not self.cfg.cross_layer:
            if open_latents is not None and open_latents < self.cfg.n_latents:
                b = None if self.b_enc is None else self.b_enc[:open_latents]
                mask = None if aux_mask is None else aux_mask[:open_latents]
                return topk_encode(x_in, self.W_enc[:open_latents], b, k, aux_k, mask, aux_latents)
            return topk_encode(x_in, self.W_enc, self.b_enc, k, aux_k, aux_mask, aux_latents)
        L, d = self.cfg.layers(), self.cfg.d_in
        m = self.cfg.n_latents // L
        if k % L:
            raise ValueError(f"a cross-layer transcoder keeps k / {L} per layer: k {k} must divide by {L}")
        parts = []
        for layer in range(L):
            rows = slice(layer * m, (layer + 1) * m)
            b = None if self.b_enc is None else self.b_enc[rows]
            share = aux_k // L + (layer < aux_k % L)  # the layers' shares add up to aux_k
            mask = aux_mask[rows] if share and aux_mask is not None else None
            if share and mask is None:
                raise ValueError("aux_k > 0 needs aux_mask (which latents may be picked)")
            x_l = x_in[..., layer * d : (layer + 1) * d]
            values, indices, aux_values, aux_indices = topk_encode(x_l, self.W_enc[rows], b, k // L, share, mask)
            parts.append((values, indices + layer * m, aux_values, aux_indices + layer * m))
        return tuple(torch.cat(column, dim=1) for column in zip(*parts))

    def preactivations(self, x_in: torch.Tensor) -> torch.Tensor:
        """(B, n_latents) encoder outputs before any bias or selection (a cross-layer transcoder's
        block l reads x_l)."""
        if not self.cfg.cross_layer:
            return x_in @ self.W_enc.T
        L, d = self.cfg.layers(), self.cfg.d_in
        blocks = self.W_enc.view(L, -1, d)
        return torch.einsum("bli,lmi->blm", x_in.unflatten(-1, (L, d)), blocks).flatten(1)

    def encode_normalized(self, x_norm: torch.Tensor, k: int | None = None) -> Codes:
        """The top k latents per token (default cfg.k; for batchtopk, up to 4k above the threshold;
        for jumprelu, every latent above its threshold)."""
        if self.cfg.activation == "jumprelu":
            return self._thresholded(x_norm, k)
        batch_topk = self.cfg.activation == "batchtopk"
        width = k or (min(4 * self.cfg.k, self.cfg.n_latents) if batch_topk else self.cfg.k)
        values, indices, _, _ = self.select(self.encoder_input(x_norm), width)
        if batch_topk:
            values = values * (values > self.threshold)
        return Codes(values, indices, skip=self.skip(x_norm))

    def _thresholded(self, x_norm: torch.Tensor, k: int | None) -> Codes:
        """JumpReLU: ReLU(pre) where pre exceeds the latent's threshold, as SAELens computes it. The code
        is as wide as the row with the most such latents (sorted descending, zeros after a row's own),
        or `k` wide at most."""
        pre = self.preactivations(self.encoder_input(x_norm))
        if self.b_enc is not None:
            pre = pre + self.b_enc
        kept = torch.where((pre > self.threshold) & (pre > 0), pre, 0.0)
        width = max(int((kept > 0).sum(dim=1).max()), 1) if len(kept) else 1
        values, indices = kept.topk(min(width, k or width), dim=1)
        return Codes(values, indices, skip=self.skip(x_norm))

    def decode_normalized(self, codes: Codes) -> torch.Tensor:
        out = sparse_decode(codes.values, codes.indices, self.W_dec) + self.b_pre
        return out if codes.skip is None else out + codes.skip

    # raw-space API ------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, k: int | None = None) -> Codes:
        """Codes of raw activations (a transcoder's: of the MLP's input); they carry the normalisation
        (and a skip-transcoder's skip term), so `decode(encode(x))` is raw: the reconstruction, or the
        transcoder's prediction of the MLP's output."""
        x_norm, stats = self.normalize(x)
        codes = self.encode_normalized(x_norm, k)
        codes.stats = self._target_stats(x_norm) if self.cfg.transcoder else stats
        return codes

    def _target_stats(self, like: torch.Tensor) -> NormStats:
        return NormStats(shift=like.new_zeros(()), scale=1 / self._per_column(self.target_scale))

    def predict(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """A transcoder's prediction of the MLP's output from its input (an SAE's reconstruction)."""
        return self(x, k)

    def decode(self, codes: Codes, stats: NormStats | None = None) -> torch.Tensor:
        """Raw reconstruction of codes from `encode` (or of normalised codes with their `stats`)."""
        if self.W_skip is not None and codes.skip is None:
            raise ValueError("decode: a skip-transcoder's codes carry W_skip x: decode codes from encode")
        stats = stats or codes.stats
        if stats is None:
            if self.cfg.normalization == "standardize":
                raise ValueError(
                    "decode: these codes carry no per-token normalisation (they did not come "
                    "from encode); pass stats=, or use decode_normalized for the normalised space"
                )
            stats = self._target_stats(self.b_pre) if self.cfg.transcoder else self.normalize(self.b_pre[None])[1]
        return stats.undo(self.decode_normalized(codes))

    def forward(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Raw activations in, raw reconstruction (a transcoder's: prediction) out."""
        return self.decode(self.encode(x, k))

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
