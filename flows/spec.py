"""The YAML run spec: pydantic v2 models, validated before any model or data is loaded."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from sae.config import (
    IO,
    JOIN,
    RECIPE_VERSION,
    SAEConfig,
    TrainConfig,
    cuda_graph_blockers,
    fused_topk_blockers,
    graphs_by_default,
    matryoshka_problem,
    modules_of,
    resolve_optimizer,
)
from storage.shuffle import SHUFFLE_BUFFER_MB

# A skip-transcoder's W_skip lr follows its targets' typical rows (sae.train.skip_lr_scale; a cross-layer
# one's per layer since it joined the rule, which moved its keys); bumped when that rule changes, so that
# only skip-transcoders' stage keys move.
SKIP_LR_RULE = 1
# How a transcoder is started and trained where it differs from an SAE: 1: its latents start at sample
# pairs (TrainConfig.decoder_init unset resolves to "data" for it); 2: attention sinks' pairs first and
# sized to their targets, cross-layer ones too; 3: the target scale is the geometric mean of all rows'
# and the typical rows' (sae.train.target_scales); 4: AuxK leaves out the latents that fired in the
# batch (sae.loss._fired); 5: its dead window is 4x an SAE's (TRANSCODER_DEAD_WINDOW_FACTOR); 6: its
# dead latents are restarted at the worst-predicted pairs in its first 100 steps (sae/resample.py).
# Bumped when that changes, so that only transcoders' stage keys move.
TRANSCODER_RULE = 6

if TYPE_CHECKING:  # imported where used: sae.evaluation loads torch
    from sae.evaluation import EvalPlan


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


DEVICE = r"^(auto|cpu|mps|cuda(:\d+)?)$"
DEVICE_HELP = "write auto, cpu, cuda, cuda:N or mps"


def _device(value: str) -> str:
    if not re.fullmatch(DEVICE, value):
        raise ValueError(f"{value!r} is not a device: {DEVICE_HELP}")  # the error's location names the field
    return value


def _known_protocol(location: str) -> str:
    """A local path, or a URL whose protocol fsspec knows and whose package is installed."""
    if "://" not in location:
        return location
    import fsspec

    protocol = location.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as e:
        raise ValueError(f"{protocol}:// needs a package that is not installed ({e})") from None
    except ValueError:
        raise ValueError(
            f"{protocol}:// is not a file system fsspec knows: use a local path, s3://, gs://, file://, ..."
        ) from None
    return location


class ModelSpec(Section):
    source: str = Field(
        default="builtin:smollm2-135m",
        description="HF model id (offline cache) or local dir, a .gguf file, or builtin:smollm2-135m",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"

    @field_validator("device")
    @classmethod
    def _dev(cls, v: str) -> str:
        return _device(v)


class DataSpec(Section):
    source: str = Field(
        default="builtin:python-docs", description="builtin:python-docs, local .txt/.jsonl/.parquet, hf:NAME"
    )
    context_length: PositiveInt = 64  # §2.1: 64 tokens in all the paper's experiments
    tokens: PositiveInt = 100_000  # training tokens to cache per hookpoint
    drop_first_position: bool = True  # the first position's activations are outliers (attention sink)
    eval_fraction: float = Field(default=0.1, gt=0, lt=1)
    batch_contexts: PositiveInt = 32
    store: str | None = None  # activation store root, any fsspec URL; default <workdir>/activations
    store_options: dict = Field(default_factory=dict)  # fsspec storage_options, e.g. S3 endpoint/credentials
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    shard_contexts: PositiveInt | None = None  # contexts per shard (the unit of work); default ~16 MB shards
    # activations barely compress (ratio ~1.0, docs/benchmarks.md) and every read pays to decode them;
    # a store keeps the compression it was written with
    compression: Literal["none", "lz4", "zstd"] = "none"
    # set: runs larger than the disk (docs/window.md): the train split is cached while the SAEs train on
    # it, one pass, at most this many train shards on disk, each deleted once a checkpoint covers it
    window_shards: int | None = None

    @field_validator("window_shards")
    @classmethod
    def _window(cls, v: int | None) -> int | None:
        if v is not None and v < 2:
            raise ValueError(
                f"{v} holds fewer than two shards: use at least 2 (the SAEs train on half of the window while "
                "the other half is cached)"
            )
        return v

    @field_validator("store")
    @classmethod
    def _store(cls, v: str | None) -> str | None:
        return None if v is None else _known_protocol(v)

    @model_validator(mode="after")
    def _positions(self):
        if self.context_length - int(self.drop_first_position) < 1:
            raise ValueError(
                f"data.context_length={self.context_length} keeps no position once the first is dropped: "
                "use at least 2 (or drop_first_position: false)"
            )
        return self


MAX_LATENTS = 2**25  # twice the paper's largest SAE (16M latents)
LearningRate = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class SAESpec(Section):
    n_latents: int | None = Field(default=None, gt=0, le=MAX_LATENTS)
    expansion_factor: PositiveInt | None = None
    k: PositiveInt = 32
    aux_k: PositiveInt | None = None  # default: d_model / 2, at most 512
    dead_tokens: PositiveInt | None = None  # default: 8 n/k tokens, from one batch to 10M (recipe paper: 10M)
    multi_topk: bool = False
    encoder_bias: bool = True  # off: the paper's §2.3 equation (an SAE's sink latents then go ungated)
    # default: standardize for an SAE, dataset_scale for a transcoder (its target cannot be standardised)
    normalization: Literal["none", "standardize", "dataset_scale"] = "standardize"
    activation: Literal["topk", "batchtopk"] = "topk"
    lr: LearningRate | None = None  # this SAE's learning rate (default: train.lr); a sweep's lr axis sets it
    tokens: PositiveInt | None = None  # this SAE's training tokens (default: train.tokens); a sweep's tokens axis
    # Matryoshka group sizes (e.g. [512, 1536, 6144] for 8192 latents): each prefix of groups learns to
    # reconstruct alone; they must not decrease and must sum to n_latents
    matryoshka: list[PositiveInt] | None = None
    # the groups join the top-k one by one over this fraction of the run (e.g. 0.3), so that each
    # prefix takes its features first: prefixes closer to SAEs of their size, at a cost to the whole
    matryoshka_ramp: float | None = Field(default=None, ge=0, lt=1)
    # a transcoder on each hookpoint, which must name an MLP module: the latents read its input and
    # predict its output; skip_connection adds W_skip x (a skip-transcoder, Paulo et al. 2025)
    transcoder: bool = False
    skip_connection: bool = False
    # one cross-layer transcoder over the hookpoints, consecutive MLPs (Ameisen et al. 2025): each
    # layer's latents read its MLP input and predict its and every later MLP's output; n_latents and k
    # count all layers (each has n_latents / L latents and keeps k / L per token). Implies transcoder.
    cross_layer: bool = False

    @model_validator(mode="before")
    @classmethod
    def _transcoder_scales(cls, data):
        if isinstance(data, dict) and data.get("cross_layer") is True and "transcoder" not in data:
            data = {**data, "transcoder": True}
        if isinstance(data, dict) and data.get("transcoder") is True and data.get("normalization") is None:
            return {**data, "normalization": "dataset_scale"}
        return data

    @model_validator(mode="after")
    def _size(self):
        if self.skip_connection and not self.transcoder:
            raise ValueError("sae.skip_connection belongs to a transcoder: set sae.transcoder: true, or drop it")
        if self.cross_layer:
            if not self.transcoder:
                raise ValueError("sae.cross_layer trains a transcoder: drop sae.transcoder: false")
            if self.n_latents is None:
                raise ValueError("sae.cross_layer: give sae.n_latents (all layers' latents), not expansion_factor")
            for name in ("matryoshka", "multi_topk"):
                if getattr(self, name):
                    raise ValueError(f"sae.{name} is not built for cross-layer transcoders: drop it")
            if self.activation != "topk":
                raise ValueError("sae.cross_layer keeps k / L latents per layer (topk): drop activation: batchtopk")
        if self.transcoder and self.normalization == "standardize":
            raise ValueError(
                "sae.normalization: standardize is per token and cannot be undone on a transcoder's target "
                "(the MLP's output, unknown at inference): use dataset_scale (its default) or none"
            )
        if self.multi_topk and self.activation == "batchtopk":
            raise ValueError("sae.multi_topk applies to activation topk only: drop one of them")
        if self.matryoshka is not None:
            if self.n_latents is None:
                raise ValueError("sae.matryoshka needs sae.n_latents (its group sizes sum to it): give n_latents")
            problem = matryoshka_problem(self.matryoshka, self.n_latents)
            if problem:
                raise ValueError(f"sae.matryoshka: {problem}")
            if self.multi_topk:
                raise ValueError("sae.matryoshka and sae.multi_topk are two different losses: drop one of them")
        elif self.matryoshka_ramp:
            raise ValueError("sae.matryoshka_ramp belongs to a Matryoshka SAE: give sae.matryoshka, or drop it")
        if (self.n_latents is None) == (self.expansion_factor is None):
            raise ValueError("give exactly one of sae.n_latents and sae.expansion_factor")
        if self.n_latents is not None and self.k > self.n_latents:
            raise ValueError(f"sae.k={self.k} exceeds sae.n_latents={self.n_latents}: lower k or raise n_latents")
        return self

    def latents(self, d_model: int) -> int:
        if self.n_latents is not None:
            return self.n_latents
        assert self.expansion_factor is not None  # the validator above asks for exactly one
        return self.expansion_factor * d_model


class TrainSpec(Section):
    batch_tokens: PositiveInt = 4096
    recipe: Literal["default", "paper"] = "default"  # paper: the released recipe (constant lr, 10M window, tied init)
    optimizer: Literal["signum", "adam"] | None = None  # default: signum (schedule-free); paper: adam
    lr: float | Literal["auto"] = "auto"

    @field_validator("lr", mode="before")
    @classmethod
    def _lr_value(cls, v):
        """One message for every bad lr (not one per member of the union)."""
        if v == "auto":
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
            raise ValueError(f"train.lr must be a positive finite number or 'auto', got {v!r}")
        return float(v)

    @field_validator("device")
    @classmethod
    def _dev(cls, v: str) -> str:
        return _device(v)

    tokens: PositiveInt | None = None  # default: one pass over the cached tokens
    lr_warmup_tokens: int | None = Field(default=None, ge=0)  # default: 5% of run (adam), 4 steps (signum)
    lr_decay: Literal["constant", "linear", "cosine"] | None = None  # default: linear to 0 with adam, else constant
    grad_clip: float | None = Field(default=None, gt=0)
    ema_decay: float | None = Field(default=None, gt=0, lt=1)  # e.g. 0.999: evaluate and register the weight EMA
    checkpoint_every_tokens: int = Field(default=1_000_000, ge=0)  # 0: no checkpoints
    seed: int = Field(default=0, ge=0)
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    # CUDA: replay the step as a CUDA graph. null: where it can be (signum, a TopK SAE, one process);
    # true: required; false: eager (sae/cuda_graph.py)
    cuda_graph: bool | None = None
    triton: bool = True  # CUDA: Triton kernels for the sparse backward and the optimizer (false: PyTorch's forms)
    fused_topk: bool = False  # CUDA, bf16: the encoder matmul and TopK in one Triton kernel (k <= 64)
    # several processes (docs/distributed.md): devices per node (GPUs, or CPU processes),
    # nodes joined at rdzv_endpoint, and the latents split into latent_shards (a grid of
    # devices x nodes / latent_shards data-parallel replicas by latent_shards shards)
    devices: PositiveInt = 1
    nodes: PositiveInt = 1
    rdzv_endpoint: str | None = None  # HOST:PORT of the first node (torch.distributed.run's c10d rendezvous)
    latent_shards: PositiveInt = 1
    # grid: every SAE of the spec trained on the whole grid, one after the other; spread: the spec's SAEs
    # placed on the processes (SAE i on process i mod devices x nodes), each reading the batches itself
    sae_placement: Literal["grid", "spread"] = "grid"
    device_memory_gib: float | None = Field(
        default=None, gt=0
    )  # refuse at validation a grid that needs more per device
    # the train stage's reader (docs/benchmarks.md): rows are shuffled inside blocks of whole chunks
    # of about this size (a batch then draws on as many documents as a uniform shuffle does when a
    # block holds the whole store: the demo's is 115 MB), by this many threads (default min(4, cores))
    shuffle_buffer_mb: PositiveInt = SHUFFLE_BUFFER_MB
    readers: PositiveInt | None = None

    @field_validator("readers")
    @classmethod
    def _readers(cls, v: int | None) -> int | None:
        cores = os.cpu_count() or 1
        if v is not None and v > cores:
            raise ValueError(
                f"train.readers={v} is more threads than this machine's {cores} cores: use at most {cores}"
            )
        return v

    @model_validator(mode="after")
    def _grid(self):
        world = self.devices * self.nodes
        if world % self.latent_shards:
            raise ValueError(
                f"train.latent_shards={self.latent_shards} does not divide the {world} processes "
                f"(devices x nodes): use a divisor of {world}"
            )
        replicas = world // self.latent_shards if self.sae_placement == "grid" else 1
        if self.batch_tokens % replicas:
            raise ValueError(
                f"train.batch_tokens={self.batch_tokens} does not split over {replicas} data-parallel "
                f"replicas (devices x nodes / latent_shards): use a multiple of {replicas}"
            )
        if self.nodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"train.nodes={self.nodes} needs train.rdzv_endpoint (HOST:PORT of the first node)")
        if self.rdzv_endpoint and not re.fullmatch(r"[^\s:/]+:\d+", self.rdzv_endpoint):
            raise ValueError(f"train.rdzv_endpoint {self.rdzv_endpoint!r}: write HOST:PORT")
        return self

    def distributed(self) -> bool:
        return self.devices * self.nodes > 1

    def replicas(self) -> int:
        return self.devices * self.nodes // self.latent_shards

    @model_validator(mode="after")
    def _budget(self):
        if self.tokens is not None and self.tokens < self.batch_tokens:
            raise ValueError(
                f"train.tokens={self.tokens} is less than one batch (train.batch_tokens={self.batch_tokens}): "
                "raise tokens or lower batch_tokens"
            )
        if self.tokens is not None and self.lr_warmup_tokens is not None and self.lr_warmup_tokens >= self.tokens:
            raise ValueError(
                f"train.lr_warmup_tokens={self.lr_warmup_tokens} is not below train.tokens={self.tokens}: "
                "the lr would never leave its warmup; lower it"
            )
        return self


class EvalSpec(Section):
    tokens: PositiveInt = 8192
    downstream_contexts: int = Field(default=64, ge=0)  # contexts for the LM loss with the SAE spliced in
    batch_contexts: PositiveInt = 16
    ablation_contexts: int = Field(default=16, ge=0)  # sample size of the §4.4 ablation sparsity (0: skip)
    # held-out tokens (whole contexts; the first half fits, the second half scores) for the probe
    # loss, the N2G explanations and the feature browser
    feature_tokens: PositiveInt = 16384
    probes: bool = True  # §4.2 probe loss
    n2g: bool = True  # §4.3 N2G explanations, precision and recall
    browser: bool = True  # the all-latent feature browser (browser/index.html)

    def plan(self) -> EvalPlan:
        from sae.evaluation import EvalPlan

        return EvalPlan(**self.model_dump())


STAGE_NAMES = ("cache", "train", "evaluate", "register")


class SweepSpec(Section):
    """A grid over latents and k: the one `sae` entry is the template, every (n_latents, k) pair becomes
    an SAE of the spec (trained together in one pass over the cache, evaluated and registered each)."""

    n_latents: list[PositiveInt] = Field(min_length=1)
    k: list[PositiveInt] = Field(min_length=1)
    lr: list[LearningRate] | None = Field(
        default=None, min_length=1
    )  # optional third axis: each SAE's learning rate (default: train.lr)
    # optional axis: each SAE's training tokens; SAEs of one budget share a pass, each budget its own
    tokens: list[PositiveInt] | None = Field(default=None, min_length=1)
    # all: every SAE of the sweep is registered; frontier: only those on the normalized-MSE-vs-L0
    # frontier of their hookpoint (no other SAE has an L0 at most as large and a lower MSE)
    registered: Literal["all", "frontier"] = "all"
    # held-out normalized MSE of every SAE at tokens/2, /4, ... (this many points) while it trains:
    # loss-vs-tokens curves and the compute frontier L(C) in the report
    milestones: int = Field(default=4, ge=0, le=12)


class OrchestrationSpec(Section):
    dask_address: str | None = None  # an existing Dask scheduler, e.g. tcp://scheduler:8786
    dask_workers: int = Field(default=0, ge=0)  # > 0: start a local Dask cluster with this many worker processes
    # stage -> Prefect work pool: each named stage runs as its own flow run of the deployment
    # saeflow-stage/<pool> (deploy/prefect.yaml), e.g. {cache: gpu, train: gpu, evaluate: gpu, register: cpu}
    pools: dict[str, str] = Field(default_factory=dict)

    @field_validator("pools")
    @classmethod
    def _pools(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(v) - set(STAGE_NAMES))
        if unknown:
            raise ValueError(f"{', '.join(map(repr, unknown))} is not a stage: name pools for {', '.join(STAGE_NAMES)}")
        bad = sorted(pool for pool in v.values() if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", pool))
        if bad:
            raise ValueError(f"{bad[0]!r} is not a work pool name: use letters, digits, _, . or -")
        return v

    @field_validator("dask_address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"(tcp|tls|ucx|ws|wss|inproc)://[^\s/:]+(:\d+)?/?", v):
            raise ValueError(f"{v!r} is not a scheduler address: write tcp://HOST:PORT")
        return v


TRACKING_SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks")


# the evaluation's metrics a promotion can compare; where more is better (the rest: errors and losses)
RANKED_METRICS = (
    "normalized_mse",
    "fraction_variance_explained",
    "dead_fraction",
    "dense_fraction",
    "ce_increase",
    "kl_divergence",
    "loss_recovered_vs_zero",
    "loss_recovered_vs_mean",
    "ablation_sparsity",
)
HIGHER_IS_BETTER = ("fraction_variance_explained", "loss_recovered_vs_zero", "loss_recovered_vs_mean")


def alias_name(v: str) -> str:
    # MLflow reserves `latest` and v<N> (they name versions)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", v) or re.fullmatch(r"[vV]\d+", v) or v.lower() == "latest":
        raise ValueError(
            f"{v!r} cannot be an alias: use letters, digits, _ or -, starting with a "
            "letter, and not `latest` or v<N> (MLflow reserves them), e.g. candidate"
        )
    return v


class PromoteRule(Section):
    """Promote a newly registered version to `alias` only when it beats the version there now, on the
    same evaluation tokens, by at least `margin` (relative: 0.02 = 2% better)."""

    metric: str = "normalized_mse"
    margin: float = Field(default=0.0, ge=0)
    alias: str = "champion"

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if v not in RANKED_METRICS:
            raise ValueError(f"{v!r} is not a metric the evaluation ranks by: use one of {', '.join(RANKED_METRICS)}")
        return v

    @field_validator("alias")
    @classmethod
    def _alias(cls, v: str) -> str:
        return alias_name(v)

    def better(self, new: float, old: float) -> bool:
        if self.metric in HIGHER_IS_BETTER:
            return new > old + self.margin * abs(old)
        return new < old - self.margin * abs(old)


class RegistrySpec(Section):
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db
    model_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # default: the spec's name
    alias: str = "candidate"
    experiment: str | None = None  # default: the spec's name
    promote_if: PromoteRule | None = None  # e.g. {metric: normalized_mse, margin: 0.01, alias: champion}

    @field_validator("alias")
    @classmethod
    def _alias(cls, v: str) -> str:
        return alias_name(v)

    @model_validator(mode="after")
    def _two_aliases(self):
        if self.promote_if is not None and self.promote_if.alias == self.alias:
            raise ValueError(
                f"promote_if.alias is {self.alias!r}, the alias every new version gets: promote to "
                "another alias (e.g. champion)"
            )
        return self

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is None:
            return v
        scheme = re.match(r"([a-z][a-z0-9+]*)://", v)
        base = scheme.group(1).split("+")[0] if scheme else None
        if v == "databricks" or (
            base in TRACKING_SCHEMES and (base not in ("http", "https") or re.match(r"https?://[^/\s]+", v))
        ):
            return v
        raise ValueError(
            f"{v!r} is not an MLflow tracking URI: write http://HOST:PORT, "
            "sqlite:///PATH, postgresql://... or leave it out for the embedded default"
        )


class RunSpec(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    hookpoints: list[str] = Field(min_length=1)
    # one SAE, or several (n_latents, k, ...) trained together from one pass over the data
    sae: list[SAESpec] = Field(min_length=1)
    sweep: SweepSpec | None = None  # expands the one sae entry over n_latents x k (flows/sweep.py reports it)
    train: TrainSpec = TrainSpec()
    eval: EvalSpec = EvalSpec()
    registry: RegistrySpec = RegistrySpec()
    orchestration: OrchestrationSpec = OrchestrationSpec()
    # a local path, or an fsspec URL (s3://bucket/prefix) that stages on several machines share
    workdir: str = ".saeflow"
    workdir_options: dict = Field(default_factory=dict)  # fsspec storage_options of a URL workdir

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("is empty: name a directory (the default is .saeflow)")
        return _known_protocol(v)

    @field_validator("sae", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, dict) else value

    @model_validator(mode="before")
    @classmethod
    def _join_cross_layer(cls, data):
        """A cross-layer transcoder reads its MLPs as one site: hookpoints [A, B, C] become ["A+B+C"]."""
        if not isinstance(data, dict) or not isinstance(data.get("hookpoints"), list):
            return data
        saes = data.get("sae")
        saes = [saes] if not isinstance(saes, list) else saes
        hooks = data["hookpoints"]
        crossing = any(getattr(s, "cross_layer", None) or (isinstance(s, dict) and s.get("cross_layer")) for s in saes)
        if crossing and len(hooks) > 1 and all(isinstance(h, str) for h in hooks):
            return {**data, "hookpoints": [JOIN.join(hooks)]}
        return data

    @model_validator(mode="before")
    @classmethod
    def _expand_sweep(cls, data):
        """A sweep turns the sae template into one SAE per (n_latents, k), kept k <= n_latents."""
        if not isinstance(data, dict) or not data.get("sweep"):
            return data
        template = data.get("sae")
        if isinstance(template, list):
            if len(template) != 1:
                return data  # expanded already (a spec dumped and read again)
            template = template[0]
        if not isinstance(template, dict):
            return data
        grid = data["sweep"]
        if (
            not isinstance(grid, dict)
            or not isinstance(grid.get("n_latents"), list)
            or not isinstance(grid.get("k"), list)
        ):
            return data  # SweepSpec's own validation names what is missing
        base = {key: v for key, v in template.items() if key not in ("n_latents", "expansion_factor", "k")}
        lrs = grid.get("lr")
        if not (
            isinstance(lrs, list)
            and lrs
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf for v in lrs)
        ):
            lrs = [base.get("lr")]  # none, or a bad axis: SweepSpec's own validation names it once
        budgets = grid.get("tokens")
        if not (
            isinstance(budgets, list)
            and budgets
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in budgets)
        ):
            budgets = [base.get("tokens")]
        saes = [
            {**base, "n_latents": n, "k": k, "lr": lr, "tokens": t}
            for n in grid["n_latents"]
            for k in grid["k"]
            for lr in lrs
            for t in budgets
            if isinstance(n, int) and isinstance(k, int) and k <= n
        ]
        return {**data, "sae": saes or [template]}

    def part_hash(self, *parts: str) -> str:
        """Hash of the named sections or `section.field`s: a stage's key depends only on what it reads.

        `sae.I` names the I-th SAE. Settings that cannot change a stage's output (credentials,
        checkpoint interval, report size, batch sizes of evaluation) are left out.
        """
        dumped = self.model_dump(mode="json")
        dumped["hookpoints"] = self.sites()  # a transcoder's store holds other arrays than an SAE's
        for dotted in HASH_EXCLUDED:
            section, name = dotted.split(".")
            dumped[section].pop(name, None)
        for dotted, default in HASHED_WHEN_SET.items():
            section, name = dotted.split(".")
            for entry in dumped[section] if isinstance(dumped[section], list) else [dumped[section]]:
                if entry.get(name) == default:
                    entry.pop(name)
        payload = {}
        for part in parts:
            section, _, name = part.partition(".")
            value = dumped[section]
            payload[part] = (value[int(name)] if isinstance(value, list) else value[name]) if name else value
        if "train" in parts:  # an SAE trained by older defaults is not this spec's SAE
            payload["recipe_version"] = RECIPE_VERSION
            hashed = [v for k, v in payload.items() if k.startswith("sae")]
            entries = [e for v in hashed for e in (v if isinstance(v, list) else [v])]
            if any(e.get("skip_connection") for e in entries):  # skip-transcoders trained before its rule differ
                payload["skip_lr"] = SKIP_LR_RULE
            if any(e.get("transcoder") for e in entries):
                payload["transcoder_rule"] = TRANSCODER_RULE
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    # paths and names derived from the spec -------------------------------------------------------
    @property
    def work(self):
        from storage.workdir import Workdir

        return Workdir(self.workdir, self.workdir_options)

    @property
    def root(self) -> Path:
        """Local files of this machine: the work dir itself, or for a URL work dir its local mirror (the
        converted model, locks and an embedded registry stay per machine)."""
        return self.work.local()

    def store_location(self) -> tuple[str, dict]:
        """The activation store's root and its fsspec options: data.store, else <workdir>/activations."""
        if self.data.store:
            return self.data.store, self.data.store_options
        return self.work.location("activations"), self.workdir_options

    def converted_model_dir(self) -> Path:
        """Where a GGUF model is kept once dequantised into transformers' format."""
        return self.root / "models" / safe_name(self.model.source)

    def tracking_uri(self) -> str:
        return self.tracking_uri_and_source()[0]

    def tracking_uri_and_source(self) -> tuple[str, str]:
        """The MLflow tracking URI and where it came from: the spec, then $MLFLOW_TRACKING_URI, then
        the embedded SQLite database in the work dir."""
        if self.registry.tracking_uri:
            return self.registry.tracking_uri, "registry.tracking_uri in the spec"
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"], "$MLFLOW_TRACKING_URI"
        return f"sqlite:///{self.root / 'mlflow.db'}", "the embedded default"

    def model_name(self, hookpoint: str, index: int = 0) -> str:
        """The registry name; the hookpoint and the SAE's size are added when there are several."""
        name = self.registry.model_name or self.name
        if len(self.hookpoints) > 1:
            name += f"-{hookpoint}"
        if len(self.sae) > 1:
            s = self.sae[index]
            name += f"-n{s.n_latents}-k{s.k}" if s.n_latents else f"-x{s.expansion_factor}-k{s.k}"
            name += "-batchtopk" if s.activation == "batchtopk" else ""
            name += "-matryoshka" if s.matryoshka else ""
            name += "-skip" if s.skip_connection else ""
            name += f"-lr{s.lr:g}" if s.lr is not None else ""
            name += f"-t{s.tokens}" if s.tokens is not None else ""
        return name

    @model_validator(mode="after")
    def _across_sections(self):
        repeated = sorted({h for h in self.hookpoints if self.hookpoints.count(h) > 1})
        if repeated:
            raise ValueError(f"hookpoints: {', '.join(repeated)} listed twice: list each hookpoint once")
        if self.train.tokens is None and self.data.tokens < self.train.batch_tokens:
            raise ValueError(
                f"data.tokens={self.data.tokens} is less than one training batch "
                f"(train.batch_tokens={self.train.batch_tokens}): raise data.tokens or lower batch_tokens"
            )
        if self.train.tokens is None and (self.train.lr_warmup_tokens or 0) >= self.data.tokens:
            raise ValueError(
                f"train.lr_warmup_tokens={self.train.lr_warmup_tokens} is not below the run's "
                f"{self.data.tokens} tokens: the lr would never leave its warmup; lower it"
            )
        for i, s in enumerate(self.sae):
            where = "sae" if len(self.sae) == 1 else f"sae.{i}"
            if s.tokens is not None and s.tokens < self.train.batch_tokens:
                raise ValueError(
                    f"{where}.tokens={s.tokens} is less than one batch (train.batch_tokens="
                    f"{self.train.batch_tokens}): raise tokens or lower batch_tokens"
                )
            if s.tokens is not None and (self.train.lr_warmup_tokens or 0) >= s.tokens:
                raise ValueError(
                    f"train.lr_warmup_tokens={self.train.lr_warmup_tokens} is not below {where}.tokens="
                    f"{s.tokens}: the lr would never leave its warmup; lower it"
                )
        if len({s.transcoder for s in self.sae}) > 1:
            raise ValueError(
                "sae: some SAEs are transcoders and some not, but every SAE of a spec reads the same cached "
                "activations: give them one sae.transcoder, or split them into two specs"
            )
        if len({s.cross_layer for s in self.sae}) > 1:
            raise ValueError(
                "sae: some SAEs are cross-layer transcoders and some not, but every SAE of a spec reads the same "
                "cached activations: give them one sae.cross_layer, or split them into two specs"
            )
        if self.sae[0].cross_layer:
            self._check_cross_layer()
        if self.transcodes() and self.train.latent_shards > 1:
            raise ValueError("sae.transcoder trains each transcoder's latents in one process: drop train.latent_shards")
        if self.train.distributed() and len({s.tokens for s in self.sae}) > 1:
            raise ValueError(
                "sae: SAEs with different tokens train on one process (each budget its own pass): give "
                "them one budget, or train.devices: 1"
            )
        return self

    @model_validator(mode="after")
    def _window(self):
        """A bounded window streams the train split once, for one training pass on one process."""
        if self.data.window_shards is None:
            return self
        w = f"data.window_shards={self.data.window_shards}"
        if len(self.hookpoints) > 1:
            raise ValueError(
                f"{w} streams one hookpoint's activations once: give one hookpoint (a spec each), or drop it"
            )
        if len({s.tokens or self.train.tokens for s in self.sae}) > 1:
            raise ValueError(f"{w} streams the activations once: give every SAE one token budget, or drop it")
        if self.train.distributed():
            raise ValueError(f"{w} trains on one process: use train.devices: 1 and train.nodes: 1, or drop it")
        needed = self.sae[0].tokens or self.train.tokens or 0
        if needed > self.data.tokens:
            raise ValueError(
                f"{w} reads each cached token once, but the SAEs train on {needed} tokens, more than "
                f"data.tokens={self.data.tokens}: raise data.tokens, or train fewer tokens"
            )
        return self

    @model_validator(mode="after")
    def _spread(self):
        world = self.train.devices * self.train.nodes
        if self.train.latent_shards > 1 and any(s.matryoshka for s in self.sae):
            raise ValueError("sae.matryoshka trains each SAE's latents in one process: drop train.latent_shards")
        if self.train.sae_placement == "spread":
            if self.train.latent_shards > 1:
                raise ValueError("train.sae_placement spread puts each SAE whole on one process: drop latent_shards")
            if world > len(self.sae):
                raise ValueError(
                    f"train.sae_placement spread: {world} processes (devices x nodes) for {len(self.sae)} "
                    "SAEs would leave some idle: use at most as many processes as SAEs"
                )
        return self

    @model_validator(mode="after")
    def _kernels(self):
        t = self.train
        if t.fused_topk:
            problems = dict.fromkeys(
                why for s in self.sae for why in fused_topk_blockers(t.device, t.precision, t.triton, s.k)
            )
            if problems:
                raise ValueError(f"train.fused_topk: not with {'; '.join(problems)}: set it to false")
        if t.cuda_graph:
            problems = dict.fromkeys(
                why
                for s in self.sae
                for why in cuda_graph_blockers(
                    t.device,
                    resolve_optimizer(t.optimizer, t.recipe),
                    s.activation,
                    t.devices * t.nodes,
                    t.fused_topk,
                    t.triton,
                )
            )
            if problems:
                raise ValueError(f"train.cuda_graph: not with {'; '.join(problems)}: set it to false")
        return self

    @model_validator(mode="after")
    def _shared_storage(self):
        pools = self.orchestration.pools
        if pools:
            local = [
                (field, where)
                for field, where in (("workdir", self.workdir), ("data.store", self.data.store))
                if where is not None and ("://" not in where or where.startswith("file://"))
            ]
            if local:
                field, where = local[0]
                raise ValueError(
                    f"{field}={where!r} is a local path, but orchestration.pools runs stages on other "
                    f"machines, which cannot see it: use a shared URL (s3://bucket/prefix, gs://...)"
                )
        return self

    @model_validator(mode="after")
    def _distinct_names(self):
        for h in self.hookpoints:
            names = [self.model_name(h, i) for i in range(len(self.sae))]
            if len(set(names)) < len(names):
                raise ValueError(
                    f"sae: two SAEs would be registered as the same model ({names}): make them differ "
                    "in n_latents, k, activation or matryoshka, or split them into two specs"
                )
        return self

    def planned_device(self) -> str:
        """train.device, with auto read as CUDA where there is one."""
        if self.train.device != "auto":
            return self.train.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def memory_plan(self, d_model: int, index: int = 0, shards: int | None = None, device: str = "cuda"):
        """Per-device memory of training SAE `index` on this spec's grid (or with `shards` instead)."""
        from sae.memory import plan_memory

        t, s = self.train, self.sae[index]
        shards = shards or t.latent_shards
        replicas = max(t.devices * t.nodes // shards, 1) if t.sae_placement == "grid" else 1
        bf16 = t.precision == "bf16" or (t.precision == "auto" and device.startswith("cuda"))
        return plan_memory(
            d_model,
            s.latents(d_model),
            s.k,
            t.batch_tokens,
            replicas,
            shards,
            resolve_optimizer(t.optimizer, t.recipe),
            bool(t.ema_decay),
            bf16,
            multi_topk=s.multi_topk,
            cuda=device.startswith("cuda") and t.triton,
            fused=t.fused_topk,
            reader_bytes=t.shuffle_buffer_mb * 2**20,
            transcoder=s.transcoder,
            skip_connection=s.skip_connection,
            layers=self.layers(),
            graphs=self.graphs(d_model, index, device),
        )

    def graphs(self, d_model: int, index: int, device: str) -> bool:
        """Whether SAE `index` trains with its step replayed as CUDA graphs on `device`."""
        if self.train.cuda_graph is not None:
            return self.train.cuda_graph and device.startswith("cuda")
        tcfg = self.train_config(1, device, index)
        return graphs_by_default(self.sae_config(d_model, index), tcfg, self.train.devices * self.train.nodes)

    def sae_config(self, d_model: int, index: int = 0) -> SAEConfig:
        s = self.sae[index]
        return SAEConfig(
            d_model,
            s.latents(d_model),
            s.k,
            s.encoder_bias,
            s.normalization,
            s.activation,
            tuple(s.matryoshka or ()),
            s.transcoder,
            s.skip_connection,
            self.layers() if s.cross_layer else 0,
        )

    def _check_cross_layer(self) -> None:
        modules = modules_of(self.hookpoints[0])
        if len(self.hookpoints) > 1 or len(modules) < 2:
            raise ValueError(
                "hookpoints: sae.cross_layer reads two or more consecutive MLPs: list them in hookpoints "
                "(e.g. model.layers.3.mlp, model.layers.4.mlp)"
            )
        problem = consecutive_problem(modules)
        if problem:
            raise ValueError(f"hookpoints: sae.cross_layer: {problem}")
        layers = len(modules)
        for i, s in enumerate(self.sae):
            where = "sae" if len(self.sae) == 1 else f"sae.{i}"
            if (s.n_latents or 0) % layers or s.k % layers:
                raise ValueError(
                    f"{where}: n_latents {s.n_latents} and k {s.k} count all {layers} layers and must both divide "
                    f"by {layers} (each layer has n_latents / {layers} latents and keeps k / {layers})"
                )

    def layers(self) -> int:
        """How many MLPs one dictionary reads: the cross-layer transcoder's, else 1."""
        return len(modules_of(self.hookpoints[0])) if self.sae[0].cross_layer else 1

    def transcodes(self) -> bool:
        """Whether this spec trains transcoders (every SAE of a spec reads the same activations)."""
        return self.sae[0].transcoder

    def site(self, hookpoint: str) -> str:
        """Where the store keeps a hookpoint's rows: the MLP's [input | output] for transcoders."""
        return hookpoint + IO if self.transcodes() else hookpoint

    def sites(self) -> list[str]:
        return [self.site(h) for h in self.hookpoints]

    def d_model_of(self, width: int) -> int:
        """d_model from the width of a hookpoint's stored rows (twice it for a transcoder's, 2 L times it
        for a cross-layer transcoder's over L layers)."""
        return width // (2 * self.layers()) if self.transcodes() else width

    def lr_setting(self, index: int = 0) -> float | str:
        """SAE `index`'s lr as the spec sets it: its own (a sweep's lr axis), else train.lr (maybe "auto")."""
        own = self.sae[index].lr
        return own if own is not None else self.train.lr

    def train_config(self, cached_tokens: int, device: str, index: int = 0) -> TrainConfig:
        t, s = self.train, self.sae[index]
        return TrainConfig(
            batch_tokens=t.batch_tokens,
            tokens=s.tokens or t.tokens or cached_tokens,
            recipe=t.recipe,
            optimizer=t.optimizer,
            lr=None if self.lr_setting(index) == "auto" else float(self.lr_setting(index)),
            lr_warmup_tokens=t.lr_warmup_tokens,
            lr_decay=t.lr_decay,
            grad_clip=t.grad_clip,
            aux_k=s.aux_k,
            dead_tokens=s.dead_tokens,
            multi_topk=s.multi_topk,
            ema_decay=t.ema_decay,
            matryoshka_ramp=s.matryoshka_ramp or 0.0,
            seed=t.seed,
            device=device,
            precision=t.precision,
            cuda_graph=t.cuda_graph,
            triton=t.triton,
            fused_topk=t.fused_topk,
        )

    def resolved_training(self, d_model: int, index: int = 0) -> dict:
        """What SAE `index` trains with, every default resolved as the train stage resolves it (one
        pass: the rows the cache plans for data.tokens)."""
        from storage.layout import planned_rows

        d = self.data
        cached = planned_rows(d.tokens, d.context_length, int(d.drop_first_position))
        tcfg = self.train_config(cached, "cpu", index)  # no value below depends on the device
        cfg = self.sae_config(d_model, index)
        tokens = tcfg.budget()
        return {
            "n_latents": cfg.n_latents,
            "k": cfg.k,
            "tokens": tokens,
            "steps": -(-tokens // tcfg.batch_tokens),  # the last batch may be short
            "optimizer": tcfg.resolved_optimizer(),
            "lr": tcfg.lr_for(cfg),
            "lr_auto": tcfg.lr is None,
            "warmup_tokens": tcfg.warmup_tokens(),
            "decay": tcfg.decay(),
            "dead_tokens": tcfg.dead_window(cfg.n_latents, cfg.k, cfg.transcoder),
            "aux_k": tcfg.resolved_aux_k(d_model),
            "resample_dead": tcfg.resolved_resample_dead(cfg),
        }


def consecutive_problem(modules: list[str]) -> str | None:
    """Why module names are not consecutive layers of one stack, in order (None: they are): names
    that differ in one number only, which rises by one from each to the next."""
    shapes = [re.split(r"(\d+)", m) for m in modules]
    first = shapes[0]
    if any(len(parts) != len(first) for parts in shapes):
        return f"{', '.join(modules)} are not one module of consecutive layers: name the same MLP of each layer"
    varying = {i for parts in shapes for i, part in enumerate(parts) if part != first[i]}
    if len(varying) != 1 or (at := varying.pop()) % 2 == 0:  # odd places hold the numbers
        return f"{', '.join(modules)} are not one module of consecutive layers: name the same MLP of each layer"
    numbers = [int(parts[at]) for parts in shapes]
    if any(b != a + 1 for a, b in zip(numbers, numbers[1:])):
        return f"layers {numbers} are not consecutive: list each layer's MLP once, in order"
    return None


def safe_name(name: str) -> str:
    """A file-system-safe name for a model source or hookpoint."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


# kernel choices change a trained SAE's bits, so they key the train stage; at their defaults they are
# left out, so that the keys of specs written before they were options stay the same
# settings added after stores and SAEs were keyed: at their default they leave the keys as they were
HASHED_WHEN_SET = {
    "train.triton": True,
    "train.fused_topk": False,
    "sae.matryoshka": None,
    "sae.matryoshka_ramp": None,
    "sae.transcoder": False,
    "sae.skip_connection": False,
}
HASH_EXCLUDED = (
    "data.store_options",
    "data.compression",  # how the same values are stored
    "train.readers",
    "train.rdzv_endpoint",
    "train.checkpoint_every_tokens",
    "train.cuda_graph",
    "eval.browser",
    "eval.batch_contexts",
)


class SpecError(ValueError):
    """A spec problem, phrased as 'field: what is wrong and how to fix it'."""


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key: remove it or check its spelling"
        # a cross-field rule's message starts with the field it names (within the section it checks)
        lines.append(f"{where}: {msg}" if where and not msg.startswith(f"{where}.") else msg)
    return "\n".join(lines)


def parse_spec(data: dict) -> RunSpec:
    try:
        return RunSpec.model_validate(data)
    except ValidationError as e:
        message = _format(e)
        if isinstance(data.get("sae"), dict):  # one SAE given as a mapping: name its fields as written
            message = re.sub(r"^sae\.0\b", "sae", message, flags=re.M)
        raise SpecError(message) from None


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (instead of keeping the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice: keep one", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_spec(path: str | Path, online: bool = True) -> RunSpec:
    """Parses and validates a YAML spec, including checks that need the model's config or the data.
    online=False reads a hub model's config from the local cache only (fails at once, no requests)."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file {p} does not exist")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except UnicodeDecodeError as e:
        raise SpecError(f"{p} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{p} is not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise SpecError(f"{p} nests deeper than Python can read: a spec is a few levels of mappings") from None
    if not isinstance(data, dict):
        raise SpecError(f"{p} must hold a mapping of sections (name, model, data, hookpoints, sae, ...)")
    spec = parse_spec(data)
    check_resources(spec, online)
    return spec


def _check_workdir(workdir: str) -> None:
    if "://" in workdir and not workdir.startswith("file://"):
        return  # a URL: checked when the run first reaches it (storage.workdir), with the credentials' names
    path = Path(workdir.removeprefix("file://")).resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise SpecError(f"workdir: {existing} is a file, not a directory: choose another workdir")
    import tempfile

    try:  # a probe, not os.access: permission bits say nothing of read-only or virtual file systems
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise SpecError(f"workdir: cannot write in {existing} ({e.strerror}): choose a writable workdir") from None


def model_outline(spec: RunSpec, online: bool = False):
    """The spec's model's width and module names (storage/model_outline.py); online=False reads the
    local cache only."""
    from storage.model_outline import model_outline as outline

    return outline(spec.model.source, spec.converted_model_dir(), online)


def transcoder_problem(spec: RunSpec, hookpoint: str, online: bool = False) -> str | None:
    """Why `hookpoint` cannot feed a transcoder (a module with one tensor input and one tensor output
    of equal width; a forward on the meta device shows them), None when it can."""
    from sae.lm import io_problem, load_config

    converted = spec.converted_model_dir()
    source = str(converted) if (converted / "config.json").is_file() else spec.model.source
    return io_problem(load_config(source, local_only=not online), hookpoint)


def check_resources(spec: RunSpec, online: bool = True) -> None:
    """Checks against the model's config (meta device, no weights), the data source and the work dir."""
    from storage.corpus import HF_PREFIX, PYTHON_DOCS, resolve_files

    _check_workdir(spec.workdir)
    src = spec.data.source
    if src != PYTHON_DOCS and not src.startswith(HF_PREFIX):
        try:
            resolve_files(src)
        except (OSError, ValueError) as e:
            raise SpecError(f"data.source: {e}") from None
    try:
        outline = model_outline(spec, online)
        names, d_model = set(outline.modules), outline.d_model
    except (OSError, ValueError, KeyError) as e:
        hint = "" if online else " (validation reads the local cache only; `saeflow validate --online` may download)"
        raise SpecError(
            f"model.source: cannot read the model config of {spec.model.source!r}{hint}: "
            f"{' '.join(str(e).split())[:300]}"
        ) from None
    for i, h in enumerate(m for hook in spec.hookpoints for m in modules_of(hook)):
        if h not in names:
            layers = sorted(n for n in names if n.count(".") == 2 and ".layers." in n)[:3]
            raise SpecError(
                f"hookpoints.{i}: {h!r} is not a module of {spec.model.source}; "
                f"decoder layers are named like {', '.join(layers) or sorted(names)[:5]}"
            )
        if spec.transcodes() and (problem := transcoder_problem(spec, h, online)):
            mlps = sorted(n for n in names if n.endswith(".mlp"))[:2]
            raise SpecError(
                f"hookpoints.{i}: sae.transcoder: {problem}" + (f" (like {', '.join(mlps)})" if mlps else "")
            )
    for i, s in enumerate(spec.sae):
        where = "sae" if len(spec.sae) == 1 else f"sae.{i}"
        if s.k > s.latents(d_model):
            raise SpecError(
                f"{where}.k={s.k} exceeds n_latents={s.latents(d_model)} (expansion_factor x d_model): lower k"
            )
        limit = spec.train.device_memory_gib
        if limit is not None:
            plan = spec.memory_plan(d_model, i, device=spec.planned_device())
            if plan.total > limit * 2**30:
                parts = ", ".join(f"{name} {size / 2**30:.2f}" for name, size in plan.rows()[:-1])
                raise SpecError(
                    f"train.device_memory_gib={limit:g}: {where} needs {plan.total / 2**30:.2f} GiB per device "
                    f"on a {spec.train.replicas()} x {spec.train.latent_shards} grid ({parts} GiB): raise "
                    "train.latent_shards (with devices), or lower train.batch_tokens (saeflow plan-memory)"
                )
        shards = spec.train.latent_shards
        if s.latents(d_model) % shards:
            raise SpecError(
                f"{where}: n_latents={s.latents(d_model)} does not split into train.latent_shards={shards} "
                f"equal shards: use a multiple of {shards}"
            )
