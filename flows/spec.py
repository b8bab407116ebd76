"""The YAML run spec: pydantic v2 models, validated before any model or data is loaded."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from sae.config import SAEConfig, TrainConfig


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Section):
    source: str = Field(
        "builtin:smollm2-135m",
        description="HF model id (offline cache) or local dir, a .gguf file, or builtin:smollm2-135m",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"


class DataSpec(Section):
    source: str = Field("builtin:python-docs", description="builtin:python-docs, local .txt/.jsonl/.parquet, hf:NAME")
    context_length: PositiveInt = 64  # §2.1: 64 tokens in all the paper's experiments
    tokens: PositiveInt = 100_000  # training tokens to cache per hookpoint
    drop_first_position: bool = True  # the first position's activations are outliers (attention sink)
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    batch_contexts: PositiveInt = 32
    store: str | None = None  # activation store root, any fsspec URL; default <workdir>/activations
    store_options: dict = Field(default_factory=dict)  # fsspec storage_options, e.g. S3 endpoint/credentials
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    shard_contexts: PositiveInt | None = None  # contexts per shard (the unit of work); default ~16 MB shards


class SAESpec(Section):
    n_latents: PositiveInt | None = None
    expansion_factor: PositiveInt | None = None
    k: PositiveInt = 32
    aux_k: PositiveInt | None = None  # default: d_model / 2, at most 512
    dead_tokens: PositiveInt | None = None  # default: 5% of the run, at most 10M (recipe paper: 10M)
    multi_topk: bool = False
    encoder_bias: bool = False
    normalization: Literal["none", "standardize", "dataset_scale"] = "standardize"
    activation: Literal["topk", "batchtopk"] = "topk"

    @model_validator(mode="after")
    def _size(self):
        if self.multi_topk and self.activation == "batchtopk":
            raise ValueError("sae.multi_topk applies to activation topk only: drop one of them")
        if (self.n_latents is None) == (self.expansion_factor is None):
            raise ValueError("give exactly one of sae.n_latents and sae.expansion_factor")
        if self.n_latents is not None and self.k > self.n_latents:
            raise ValueError(f"sae.k={self.k} exceeds sae.n_latents={self.n_latents}: lower k or raise n_latents")
        return self

    def latents(self, d_model: int) -> int:
        return self.n_latents or self.expansion_factor * d_model


class TrainSpec(Section):
    batch_tokens: PositiveInt = 4096
    recipe: Literal["default", "paper"] = "default"  # paper: the released recipe (constant lr, 10M window, tied init)
    optimizer: Literal["signum", "adam"] | None = None  # default: signum (schedule-free); paper: adam
    lr: float | Literal["auto"] = "auto"
    tokens: PositiveInt | None = None  # default: one pass over the cached tokens
    lr_warmup_tokens: int | None = Field(None, ge=0)  # default: 5% of the run with adam, else 0
    lr_decay: Literal["constant", "linear", "cosine"] | None = None  # default: linear to 0 with adam, else constant
    grad_clip: float | None = Field(None, gt=0)
    ema_decay: float | None = Field(None, gt=0, lt=1)  # e.g. 0.999: evaluate and register the weight EMA
    checkpoint_every_tokens: int = Field(1_000_000, ge=0)  # 0: no checkpoints
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU

    @model_validator(mode="after")
    def _lr(self):
        if self.lr != "auto" and not self.lr > 0:
            raise ValueError(f"train.lr must be positive or 'auto', got {self.lr}")
        return self


class EvalSpec(Section):
    tokens: PositiveInt = 8192
    downstream_contexts: int = Field(64, ge=0)  # contexts for the LM loss with the SAE spliced in
    batch_contexts: PositiveInt = 16
    report_latents: int = Field(16, ge=0)  # random latents in the feature browser (0: no report)
    ablation_contexts: int = Field(16, ge=0)  # sample size of the §4.4 ablation sparsity (0: skip)


class OrchestrationSpec(Section):
    dask_address: str | None = None  # an existing Dask scheduler, e.g. tcp://scheduler:8786
    dask_workers: int = Field(0, ge=0)  # > 0: start a local Dask cluster with this many worker processes


class RegistrySpec(Section):
    tracking_uri: str | None = None  # default: sqlite:///<workdir>/mlflow.db
    model_name: str | None = None  # default: the spec's name
    alias: str = "candidate"
    experiment: str | None = None  # default: the spec's name


class RunSpec(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    hookpoints: list[str] = Field(min_length=1)
    # one SAE, or several (n_latents, k, ...) trained together from one pass over the data
    sae: list[SAESpec] = Field(min_length=1)
    train: TrainSpec = TrainSpec()
    eval: EvalSpec = EvalSpec()
    registry: RegistrySpec = RegistrySpec()
    orchestration: OrchestrationSpec = OrchestrationSpec()
    workdir: str = ".saeflow"

    @field_validator("sae", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, dict) else value

    def part_hash(self, *parts: str) -> str:
        """Hash of the named sections or `section.field`s: a stage's key depends only on what it reads.

        `sae.I` names the I-th SAE. Settings that cannot change a stage's output (credentials,
        checkpoint interval, report size, batch sizes of evaluation) are left out.
        """
        dumped = self.model_dump(mode="json")
        for dotted in HASH_EXCLUDED:
            section, name = dotted.split(".")
            dumped[section].pop(name, None)
        payload = {}
        for part in parts:
            section, _, name = part.partition(".")
            value = dumped[section]
            payload[part] = (value[int(name)] if isinstance(value, list) else value[name]) if name else value
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    # paths and names derived from the spec -------------------------------------------------------
    @property
    def root(self) -> Path:
        return Path(self.workdir).resolve()

    def converted_model_dir(self) -> Path:
        """Where a GGUF model is kept once dequantised into transformers' format."""
        return self.root / "models" / safe_name(self.model.source)

    def tracking_uri(self) -> str:
        return self.registry.tracking_uri or f"sqlite:///{self.root / 'mlflow.db'}"

    def model_name(self, hookpoint: str, index: int = 0) -> str:
        """The registry name; the hookpoint and the SAE's size are added when there are several."""
        name = self.registry.model_name or self.name
        if len(self.hookpoints) > 1:
            name += f"-{hookpoint}"
        if len(self.sae) > 1:
            s = self.sae[index]
            name += f"-n{s.n_latents}-k{s.k}" if s.n_latents else f"-x{s.expansion_factor}-k{s.k}"
            name += "-batchtopk" if s.activation == "batchtopk" else ""
        return name

    @model_validator(mode="after")
    def _distinct_names(self):
        for h in self.hookpoints:
            names = [self.model_name(h, i) for i in range(len(self.sae))]
            if len(set(names)) < len(names):
                raise ValueError(f"sae: two SAEs would be registered as the same model ({names}): make them differ "
                                 "in n_latents, k or activation, or split them into two specs")
        return self

    def sae_config(self, d_model: int, index: int = 0) -> SAEConfig:
        s = self.sae[index]
        return SAEConfig(d_model, s.latents(d_model), s.k, s.encoder_bias, s.normalization, s.activation)

    def train_config(self, cached_tokens: int, device: str, index: int = 0) -> TrainConfig:
        t, s = self.train, self.sae[index]
        return TrainConfig(
            batch_tokens=t.batch_tokens,
            tokens=t.tokens or cached_tokens,
            recipe=t.recipe,
            optimizer=t.optimizer,
            lr=None if t.lr == "auto" else float(t.lr),
            lr_warmup_tokens=t.lr_warmup_tokens,
            lr_decay=t.lr_decay,
            grad_clip=t.grad_clip,
            aux_k=s.aux_k,
            dead_tokens=s.dead_tokens,
            multi_topk=s.multi_topk,
            ema_decay=t.ema_decay,
            seed=t.seed,
            device=device,
            precision=t.precision,
        )


def safe_name(name: str) -> str:
    """A file-system-safe name for a model source or hookpoint."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


HASH_EXCLUDED = ("data.store_options", "train.checkpoint_every_tokens", "eval.report_latents", "eval.batch_contexts")


class SpecError(ValueError):
    """A spec problem, phrased as 'field: what is wrong and how to fix it'."""


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(spec)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key: remove it or check its spelling"
        lines.append(f"{where}: {msg}")
    return "\n".join(lines)


def parse_spec(data: dict) -> RunSpec:
    try:
        return RunSpec.model_validate(data)
    except ValidationError as e:
        message = _format(e)
        if isinstance(data.get("sae"), dict):  # one SAE given as a mapping: name its fields as written
            message = re.sub(r"^sae\.0\b", "sae", message, flags=re.M)
        raise SpecError(message) from None


def load_spec(path: str | Path) -> RunSpec:
    """Parses and validates a YAML spec, including checks that need the model's config or the data."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{p} must hold a mapping of sections (name, model, data, hookpoints, sae, ...)")
    spec = parse_spec(data)
    check_resources(spec)
    return spec


def check_resources(spec: RunSpec) -> None:
    """Checks against the model's config (meta device, no weights) and the data source."""
    from sae.lm import load_config, module_names
    from storage.corpus import HF_PREFIX, PYTHON_DOCS, resolve_files

    src = spec.data.source
    if src != PYTHON_DOCS and not src.startswith(HF_PREFIX):
        try:
            resolve_files(src)
        except (OSError, ValueError) as e:
            raise SpecError(f"data.source: {e}") from None
    converted = spec.converted_model_dir()  # a GGUF converted earlier reads in milliseconds
    try:
        config = load_config(str(converted) if (converted / "config.json").exists() else spec.model.source)
        names, d_model = set(module_names(config)), config.hidden_size
    except (OSError, ValueError, KeyError) as e:
        raise SpecError(f"model.source: cannot read the model config of {spec.model.source!r}: {e}") from None
    for i, h in enumerate(spec.hookpoints):
        if h not in names:
            layers = sorted(n for n in names if n.count(".") == 2 and ".layers." in n)[:3]
            raise SpecError(
                f"hookpoints.{i}: {h!r} is not a module of {spec.model.source}; "
                f"decoder layers are named like {', '.join(layers) or sorted(names)[:5]}"
            )
    for i, s in enumerate(spec.sae):
        where = "sae" if len(spec.sae) == 1 else f"sae.{i}"
        if s.k > s.latents(d_model):
            raise SpecError(f"{where}.k={s.k} exceeds n_latents={s.latents(d_model)} (expansion_factor x d_model): lower k")
