"""Plain configuration records for the SAE and its trainer (no I/O, no framework)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Literal

# A store site "MODULE:io" holds a module's input and output side by side, [input | output]: a
# transcoder's training rows, from one forward (sae/lm.py captures it).
IO = ":io"
# A cross-layer transcoder's site joins its MLPs, in layer order: "A+B+C:io" holds [inputs | outputs].
JOIN = "+"


def module_of(site: str) -> str:
    """The module a store site reads (a hookpoint is its own site)."""
    return site.removesuffix(IO)


def modules_of(site: str) -> list[str]:
    """The modules a store site or hookpoint reads: one, or a cross-layer transcoder's MLPs in order."""
    return module_of(site).split(JOIN)


Normalization = Literal["none", "standardize", "dataset_scale"]
Activation = Literal["topk", "batchtopk", "jumprelu"]
Precision = Literal["auto", "fp32", "bf16"]


@dataclass(frozen=True)
class SAEConfig:
    """Shape and architecture of one TopK SAE.

    normalization:
      - "standardize": per token, (x - mean_d(x)) / (std_d(x) + eps), undone on decode as
        x_hat * std_d(x) + mean_d(x), as the released GPT-2 TopK SAEs do (the paper's §2.1
        mean-subtraction + unit norm, up to sqrt(d)); SAELens calls it layer_norm.
      - "dataset_scale": one scalar s computed once from a sample so that E||s x||^2 = d.
      - "none": raw activations.
      A transcoder's target (the MLP's output) is unknown at inference, so a per-token standardisation
      of it could not be undone: a transcoder scales its input and its target by one dataset-level
      scalar each (dataset_scale, its default) or takes them raw.

    transcoder: the latents read one activation (an MLP's input) and reconstruct another (its
    output) instead of their own input, as in Dunefsky et al. 2024; skip_connection adds an affine
    skip W_skip x to the prediction, initialised at zero (Paulo et al. 2025's skip-transcoder).

    cross_layer: a cross-layer transcoder over this many consecutive MLPs (Ameisen et al. 2025): the
    latents come in one block per layer, each block reading its layer's MLP input and keeping k / L of
    its latents per token, each latent decoding into its own layer's MLP output and every later one's.
    d_in is one layer's width; n_latents and k count all the layers. 0: one layer (a plain transcoder).
    """

    d_in: int
    n_latents: int
    k: int
    # the paper's §2.3 equation has none; the released code has one, and an SAE started at data rows
    # gates its attention-sink latents with it (sae.train.size_sink_latents)
    encoder_bias: bool = True
    normalization: Normalization | None = None  # None: standardize for an SAE, dataset_scale for a transcoder
    # batchtopk: the k*B largest pre-activations of a training batch; at inference, the latents above
    # a threshold learnt in training (at most 4k per token). jumprelu: every latent above its own
    # threshold (ReLU: thresholds 0), as SAELens's JumpReLU and ReLU dictionaries (Gemma Scope's)
    # compute; saeflow imports, evaluates and serves them but does not train them (k: the width of
    # codes from encode(x, k) at most; by default a code holds every latent that fires)
    activation: Activation = "topk"
    # Matryoshka (Bussmann et al. 2025): the sizes of consecutive latent groups; each prefix of groups
    # is trained to reconstruct on its own (the loss sums the prefixes' losses). (): a plain SAE
    matryoshka: tuple[int, ...] = ()
    transcoder: bool = False
    skip_connection: bool = False
    cross_layer: int = 0

    def __post_init__(self) -> None:
        if self.normalization is None:
            object.__setattr__(self, "normalization", "dataset_scale" if self.transcoder else "standardize")
        if self.transcoder and self.normalization == "standardize":
            raise ValueError(
                "normalization: standardize is per token and cannot be undone on a transcoder's target "
                "(unknown at inference): use dataset_scale (the default for transcoders) or none"
            )
        if self.skip_connection and not self.transcoder:
            raise ValueError("skip_connection: a skip connection belongs to a transcoder: set transcoder too")
        if self.d_in <= 0 or self.n_latents <= 0 or self.k <= 0:
            raise ValueError(f"d_in, n_latents and k must be positive, got {self}")
        if self.k > self.n_latents:
            raise ValueError(f"k={self.k} must not exceed n_latents={self.n_latents}")
        problem = cross_layer_problem(self)
        if problem:
            raise ValueError(f"cross_layer: {problem}")
        object.__setattr__(self, "matryoshka", tuple(int(g) for g in self.matryoshka))  # a list from JSON
        problem = matryoshka_problem(self.matryoshka, self.n_latents)
        if problem:
            raise ValueError(f"matryoshka: {problem}")

    def prefix_ends(self) -> list[int]:
        """Where each Matryoshka prefix ends (the last is n_latents); [n_latents] for a plain SAE."""
        ends, end = [], 0
        for size in self.matryoshka:
            end += size
            ends.append(end)
        return ends or [self.n_latents]

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("matryoshka", "transcoder", "skip_connection", "cross_layer"):
            if not d[name]:  # a plain SAE's config reads as before
                d.pop(name)
        return d

    def layers(self) -> int:
        """How many layers' MLPs the coder reads and predicts (1 unless cross_layer)."""
        return max(1, self.cross_layer)

    def width(self) -> int:
        """The width of the input rows, and of the target rows: d_in per layer."""
        return self.d_in * self.layers()

    def encoder_reads_bias(self) -> bool:
        """Whether the encoder has a bias: a transcoder always does (its input is not centred by b_pre,
        which lives in the target's space)."""
        return self.encoder_bias or self.transcoder


def cross_layer_problem(cfg: SAEConfig) -> str | None:
    """What keeps cfg from being a cross-layer transcoder when it asks to be one (None: nothing)."""
    layers = cfg.cross_layer
    if layers == 0:
        return None
    if layers < 2:
        return f"{layers} layer is a transcoder: give 2 or more layers, or leave cross_layer out"
    if not cfg.transcoder:
        return "a cross-layer transcoder is a transcoder: set transcoder too"
    if cfg.n_latents % layers or cfg.k % layers:
        return (
            f"n_latents {cfg.n_latents} and k {cfg.k} count all {layers} layers and must both divide by "
            f"{layers} (each layer has n_latents / {layers} latents and keeps k / {layers})"
        )
    if cfg.matryoshka:
        return "Matryoshka groups are not built for cross-layer transcoders: drop matryoshka"
    if cfg.activation != "topk":
        return "a cross-layer transcoder keeps k / L latents per layer (topk): drop activation batchtopk"
    return None


def matryoshka_problem(groups, n_latents: int) -> str | None:
    """What is wrong with Matryoshka group sizes for n_latents latents (None: nothing): at least two
    groups, each at least as large as the one before, summing to n_latents."""
    if not groups:
        return None
    if len(groups) < 2:
        return "one group is a plain SAE: give two or more group sizes, or leave it out"
    if any(g <= 0 for g in groups):
        return f"group sizes must be positive, got {list(groups)}"
    if any(b < a for a, b in zip(groups, groups[1:])):
        return (
            f"group sizes must not decrease (each prefix adds at least as many latents as the last), got {list(groups)}"
        )
    if sum(groups) != n_latents:
        return f"group sizes sum to {sum(groups)}, not to the {n_latents} latents: make them add up to n_latents"
    return None


# Bumped whenever a default of the training recipe changes what a spec that leaves it unset trains
# (the pipeline's stage keys include it: SAEs trained by older defaults are retrained, not reused).
# 2: the dead-latent window of 8 n/k tokens. 3: signum's short-run lr factor (128 / steps)^(3/8).
# 4: the store's reader shuffles rows in blocks of 256 MB (was 8 chunks), each block's batches its own.
# 5: signum's lr at most MAX_SIGN_ROW_STEP / sqrt(d_in). 6: an SAE starts at distinct sample rows,
# its attention sinks' latents gated by an encoder bias (now on by default), and AuxK leaves out the
# latents that fired in the batch (TrainConfig.resolved_decoder_init). 7: an SAE's sample rows are
# drawn as spread as the sample allows (cosine bounds 0.5, then 0.6, then 0.7: sae.train.spread_rows).
# 8: the end of a run refits an SAE's sink latents' decoder rows by least squares (sae.sinks).
# 9: sign descent warms its lr up over the first SIGNUM_WARMUP_STEPS steps.
RECIPE_VERSION = 9

Recipe = Literal["default", "paper"]
Decay = Literal["constant", "linear", "cosine"]
Optimizer = Literal["signum", "adam"]

# The paper's released config: Adam lr 1e-4 at n_latents = 2**15 and batches of 131,072 tokens, lr
# ~ 1/sqrt(n) (PAPER-NOTES); constant; dead after 10M tokens; tied encoder init, not rescaled.
PAPER_LR_AT_32K = 1e-4
PAPER_DEAD_TOKENS = 10_000_000

# Adam's lr at 4096 latents and batches of 4096 tokens (warmup, linear decay to zero); scaled as
# 1/sqrt(n), sqrt(batch) and up to 2x in short runs. The sweeps: docs/method.md.
ADAM_LR_AT_4K = 6e-3
# Schedule-free sign descent's lr at 4096 latents: 1/sqrt(n), (128 / steps)^(3/8) in runs shorter than
# SHORT_RUN_STEPS (at most 2x), no batch scaling. The sweeps: docs/method.md.
SIGNUM_LR_AT_4K = 2e-2 / math.sqrt(2)
SHORT_RUN_STEPS = 128
# A sign step moves every weight by lr, so a unit-norm decoder row by lr * sqrt(d_in). Above about a
# third of the row per step, latents die faster than AuxK revives them (on SmolLM2 at d 576 the short-run
# factor took 11-23% of the latents dead at batches of 4096; docs/method.md): signum's lr is capped there.
MAX_SIGN_ROW_STEP = 0.35

# Sign descent's lr rises linearly over this many first steps (at most half the run): the first full
# steps, while the rows still sit at their sample rows, silence latents started at rows that are rare
# off the training contexts (SmolLM2 layer 12, batches of 4096, 100k tokens: 1.07% of the latents dead
# on held-out rows without it, 0.37% with it; docs/method.md).
SIGNUM_WARMUP_STEPS = 4

# A transcoder's sign-descent lr, as a fraction of an SAE's: on SmolLM2's MLPs (layers 12 and 20, 100k
# and 400k tokens) half the lr leaves half as many latents dead with an equal or lower FVU
# (benchmarks/transcoder_quality.py; docs/dictionaries.md).
TRANSCODER_SIGNUM_LR_FACTOR = 0.5

# A latent is dead (AuxK trains it) after the tokens in which a latent of average frequency k/n fires
# this many times (one batch to 10M): fewer dead latents and lower MSE than 5% of the run (docs/method.md).
DEAD_FIRINGS = 8
# A transcoder's window is this many times longer: its AuxK steps turned rare latents that still fired
# away from their sample pair, and at 4x (32 firings) SmolLM2's MLPs 12 and 20 had a half and three
# quarters of the dead latents at 100k tokens, as many at 200k and 400k (docs/dictionaries.md).
TRANSCODER_DEAD_WINDOW_FACTOR = 4


def auto_lr(
    n_latents: int,
    batch_tokens: int = 4096,
    recipe: Recipe = "default",
    tokens: int | None = None,
    optimizer: Optimizer = "signum",
    d_in: int | None = None,
) -> float:
    """The default lr; signum's is capped by d_in (MAX_SIGN_ROW_STEP) when it is given."""
    if recipe == "paper":
        return PAPER_LR_AT_32K * math.sqrt(2**15 / n_latents)
    steps = max(1, tokens // batch_tokens) if tokens is not None else SHORT_RUN_STEPS
    short = max(1.0, SHORT_RUN_STEPS / steps)
    if optimizer == "signum":
        lr = SIGNUM_LR_AT_4K * math.sqrt(2**12 / n_latents) * min(2.0, short**0.375)
        return lr if d_in is None else min(lr, MAX_SIGN_ROW_STEP / math.sqrt(d_in))
    return ADAM_LR_AT_4K * math.sqrt(2**12 / n_latents) * math.sqrt(batch_tokens / 4096) * min(2.0, short**0.5)


@dataclass(frozen=True)
class TrainConfig:
    """How to train; every field left at None is derived from the run (n_latents, batch, tokens).

    recipe "default": sign descent with schedule-free averaging (sae/optim.py) at a constant lr from
    `auto_lr` after a warmup of SIGNUM_WARMUP_STEPS steps (with optimizer "adam": a warmup over 5% of
    the run and linear decay to zero), a dead-latent window of 8 n/k tokens (see DEAD_FIRINGS; at most
    the paper's 10M) so that AuxK acts in short runs too, and the tied encoder scaled by least squares
    at init. recipe "paper": the paper's released recipe, to reproduce its numbers (Adam, constant lr,
    10M-token window, tied init).
    """

    batch_tokens: int = 4096
    tokens: int | None = None  # None: one pass over the data (an iterator of unknown length needs it)
    recipe: Recipe = "default"
    optimizer: Optimizer | None = None  # None: signum (default recipe), adam (paper)
    lr: float | None = None  # None: auto_lr(n_latents, batch_tokens, recipe, tokens, optimizer, d_in)
    # None: 5% of tokens with adam; SIGNUM_WARMUP_STEPS batches (at most half the run) with signum; 0 (paper)
    lr_warmup_tokens: int | None = None
    lr_decay: Decay | None = None  # None: linear to zero with adam; constant with signum and for the paper
    betas: tuple[float, float] = (0.9, 0.999)  # adam
    eps: float = 6.25e-10  # adam; gradients are batch means, hence the small eps
    momentum: float = 0.95  # signum: the weight of the average x in y = (1 - m) z + m x
    grad_clip: float | None = None
    aux_k: int | None = None  # None: d_in / 2 (at most 512); the released config has 256, the paper's text 512
    aux_coef: float = 1 / 32
    dead_tokens: int | None = None  # None: 8 n/k tokens (a transcoder's 32), within [one batch, 10M]; 10M (paper)
    fire_threshold: float = 1e-3  # "fired" = kept value above this, as in the released code
    multi_topk: bool = False  # L(k) + L(4k)/8 (§5.3)
    ema_decay: float | None = None  # e.g. 0.999: train with, and return, a bias-corrected weight EMA
    encoder_init: Literal["least_squares", "tied"] | None = None  # None: least_squares (default), tied (paper)
    # random: unit random decoder rows (§A.1); data: an SAE's rows at distinct centred sample rows (a
    # transcoder's at sample pairs, a cross-layer one's per layer block, attention sinks' pairs sized
    # to their targets), and the encoder's step sized to its norm (fewer steps to a good fit;
    # sae.train.decoder_rows_from_data, size_sink_latents, encoder_step_scale).
    # None: data, random under the paper recipe for an SAE (resolved_decoder_init)
    decoder_init: Literal["random", "data"] | None = None
    # a transcoder's dead latents restarted at the batch's worst-predicted pairs every 10 steps of its
    # first 100 (sae/resample.py). None: on for transcoders under sign descent (resolved_resample_dead)
    resample_dead: bool | None = None
    # a Matryoshka SAE's groups join the top-k one by one over this fraction of the run (group m of M
    # at ramp x m / (M - 1)), so that each group takes its features before later groups can
    # (sae.loss.matryoshka_open); 0: all from the start (docs/dictionaries.md)
    matryoshka_ramp: float = 0.0
    geometric_median_samples: int = 32768
    seed: int = 0
    device: str = "cpu"
    # bf16: the encoder matmul and the top-k selection run under bf16 autocast; parameters, Adam
    # state, the sparse decoder and every gradient product stay float32. auto: bf16 on CUDA only
    # (on CPU bf16 matmuls are rarely faster and fp32 keeps resumes bitwise exact).
    precision: Precision = "auto"
    # CUDA: capture the training step as a CUDA graph and replay it (no per-kernel launch cost on the
    # host). None: wherever it can be captured and a GPU has checked it (graphs_by_default); True:
    # required (refused with the reason where it cannot be); False: eager steps.
    cuda_graph: bool | None = None
    # CUDA kernels (sae/kernels.py): triton, the Triton kernels of the sparse backward and the optimizer
    # (False: PyTorch's embedding_bag and foreach forms, the reference); fused_topk, the encoder matmul
    # and TopK in one kernel (bf16, k <= 64; off: slower at small d, docs/benchmarks.md)
    triton: bool = True
    fused_topk: bool = False
    log_every: int = 20

    def __post_init__(self) -> None:
        if self.recipe not in ("default", "paper"):
            raise ValueError(f"recipe must be 'default' or 'paper', got {self.recipe!r}")
        if self.decoder_init not in (None, "random", "data"):
            raise ValueError(f"decoder_init must be 'random' or 'data', got {self.decoder_init!r}")
        if self.optimizer not in (None, "signum", "adam"):
            raise ValueError(f"optimizer must be 'signum' or 'adam', got {self.optimizer!r}")
        if not 0 <= self.matryoshka_ramp < 1:
            raise ValueError(f"matryoshka_ramp must be in [0, 1) (a fraction of the run), got {self.matryoshka_ramp}")
        if self.resample_dead and self.resolved_optimizer() != "signum":
            raise ValueError(
                "resample_dead: restarts rows of the sign-descent optimizer's state; "
                "with optimizer adam leave it unset (AuxK alone revives the dead latents)"
            )
        for name in ("batch_tokens", "tokens", "dead_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")

    @property
    def paper(self) -> bool:
        return self.recipe == "paper"

    def with_tokens(self, tokens: int) -> TrainConfig:
        return replace(self, tokens=tokens)

    def resolved_lr(self, n_latents: int, d_in: int | None = None, transcoder: bool = False) -> float:
        if self.lr is not None:
            return self.lr
        lr = auto_lr(n_latents, self.batch_tokens, self.recipe, self.tokens, self.resolved_optimizer(), d_in)
        if transcoder and self.resolved_optimizer() == "signum" and not self.paper:
            lr *= TRANSCODER_SIGNUM_LR_FACTOR
        return lr

    def lr_for(self, cfg: SAEConfig) -> float:
        """The lr of an SAE of cfg: a cross-layer transcoder's from one layer's dictionary (n / L
        latents) and its widest decoder row (L d_in wide: a sign step moves it by lr sqrt(L d_in))."""
        return self.resolved_lr(cfg.n_latents // cfg.layers(), cfg.width(), cfg.transcoder)

    def encoder_lr_ratio(self, cfg: SAEConfig) -> float:
        """The encoder's own lr over lr_for's when it has its own step (decoder_init "data"): a
        cross-layer transcoder's lr is capped for its L d_in-wide decoder rows, its encoder rows are
        d_in wide, so they step by the lr of their own width (sqrt(L) x at SmolLM2's MLPs; at half of
        it the encoder of data rows lagged: FVU up to 3x random rows' at 100k tokens, 1.1-1.4x at
        200k, docs/dictionaries.md). 1 for every other coder, and where the lr is set."""
        if self.lr is not None or not cfg.cross_layer:
            return 1.0
        return self.resolved_lr(cfg.n_latents // cfg.layers(), cfg.d_in, cfg.transcoder) / self.lr_for(cfg)

    def resolved_optimizer(self) -> Optimizer:
        return resolve_optimizer(self.optimizer, self.recipe)

    def _scheduled(self) -> bool:
        """Adam in the default recipe: a warmup over 5% of the run and decay to zero (signum averages
        instead of decaying)."""
        return not self.paper and self.resolved_optimizer() == "adam"

    def warmup_tokens(self) -> int:
        if self.lr_warmup_tokens is not None:
            return self.lr_warmup_tokens
        if self.paper:
            return 0
        if self._scheduled():
            return self.budget() // 20
        return min(SIGNUM_WARMUP_STEPS, self.budget() // self.batch_tokens // 2) * self.batch_tokens

    def decay(self) -> Decay:
        return self.lr_decay or ("linear" if self._scheduled() else "constant")

    def dead_window(self, n_latents: int, k: int, transcoder: bool = False) -> int:
        if self.dead_tokens is not None:
            return self.dead_tokens
        if self.paper:
            return PAPER_DEAD_TOKENS
        firings = DEAD_FIRINGS * (TRANSCODER_DEAD_WINDOW_FACTOR if transcoder else 1)
        return max(self.batch_tokens, min(PAPER_DEAD_TOKENS, firings * n_latents // k))

    def resolved_decoder_init(self, cfg: SAEConfig) -> Literal["random", "data"]:
        """decoder_init unset: "data" (on SmolLM2's residual stream nMSE* lower in all 36 cells of the
        quality table and at most 1% dead in most short runs at large batches, docs/method.md; on its
        MLPs a third to a fifteenth of a transcoder's dead latents, docs/dictionaries.md); "random"
        for an SAE under the paper recipe, whose §A.1 init it is."""
        if self.decoder_init is not None:
            return self.decoder_init
        return "random" if self.paper and not cfg.transcoder else "data"

    def resolved_resample_dead(self, cfg: SAEConfig) -> bool:
        """resample_dead unset: on for a transcoder under sign descent (on SmolLM2's MLPs 12 and 20 at
        100k tokens 1.3% / 3.8% dead -> 0.2% / 0.1% at an FVU within 0.0005, docs/dictionaries.md);
        off for an SAE, whose AuxK keeps them few (docs/method.md)."""
        if self.resample_dead is not None:
            return self.resample_dead
        return cfg.transcoder and self.resolved_optimizer() == "signum"

    def resolved_aux_k(self, d_in: int) -> int:
        if self.aux_k is not None:
            return self.aux_k
        return 256 if self.paper else min(512, max(1, d_in // 2))

    def scaled_encoder_init(self) -> bool:
        return (self.encoder_init or ("tied" if self.paper else "least_squares")) == "least_squares"

    def budget(self) -> int:
        if self.tokens is None:
            raise ValueError("TrainConfig.tokens is unknown: give tokens=... (or train on data of known length)")
        return self.tokens

    def bf16(self) -> bool:
        """Whether the training forward runs under bf16 autocast."""
        return self.precision == "bf16" or (self.precision == "auto" and self.device.startswith("cuda"))


def resolve_optimizer(optimizer: Optimizer | None, recipe: str) -> Optimizer:
    """The optimizer a run uses: the one set, else the recipe's (the paper's Adam, or signum)."""
    return optimizer or ("adam" if recipe == "paper" else "signum")


def _not_cuda(device: str) -> list[str]:
    """device "auto" passes (it may resolve to CUDA)."""
    return [] if device == "auto" or device.startswith("cuda") else [f"device {device} (CUDA only)"]


def cuda_graph_blockers(
    device: str,
    optimizer: Optimizer,
    activation: str,
    processes: int = 1,
    fused_topk: bool = False,
    triton: bool = True,
) -> list[str]:
    """What keeps a training step from being captured as a CUDA graph (sae/cuda_graph.py); empty: nothing."""
    problems = _not_cuda(device)
    if optimizer == "adam":
        problems.append("optimizer adam (the default, signum, reads its lr on the device)")
    if activation == "batchtopk":
        problems.append("activation batchtopk (its code size changes from batch to batch)")
    if processes > 1:
        problems.append("several processes (devices x nodes)")
    if fused_topk:
        problems.append("fused_topk (its AuxK gathers the dead latents, a host sync)")
    if not triton:
        problems.append("triton false (the optimizer's one-pass Triton kernel is what reads the lr on the device)")
    return problems


# Above this many decoder weights the step is GPU-bound (launches are a small share of it) and the
# graphs' own memory pools (a batch's temporaries per AuxK phase) would only take memory from the SAE.
GRAPH_MAX_WEIGHTS = 2**27


def graphs_by_default(cfg: SAEConfig, tcfg: TrainConfig, processes: int = 1) -> bool:
    """train.cuda_graph unset: graphs where the step can be captured, is small enough to gain, and its
    graphed training was checked equal to the eager one on a GPU (a TopK SAE; 1.07x-5.1x the eager
    step on an H200 at 1M and 25M weights, docs/benchmarks.md). Transcoders, Matryoshka and
    multi_topk keep eager steps until a GPU run checks them; `cuda_graph: true` asks for a graph anyway."""
    checked = not cfg.matryoshka and not cfg.transcoder and not tcfg.multi_topk
    checked = checked and cfg.n_latents * cfg.width() <= GRAPH_MAX_WEIGHTS
    blockers = cuda_graph_blockers(
        tcfg.device, tcfg.resolved_optimizer(), cfg.activation, processes, tcfg.fused_topk, tcfg.triton
    )
    return checked and tcfg.device.startswith("cuda") and not blockers


FUSED_MAX_K = 64  # the fused encoder + TopK kernel keeps a block's running top k in registers


def fused_topk_blockers(device: str, precision: Precision, triton: bool, k: int) -> list[str]:
    """What keeps the fused encoder + TopK kernel (train.fused_topk) from running; empty: nothing."""
    problems = _not_cuda(device)
    if precision == "fp32":  # auto is bf16 on CUDA
        problems.append("precision fp32 (the kernel runs in bf16)")
    if not triton:
        problems.append("triton false (it is a Triton kernel)")
    if k > FUSED_MAX_K:
        problems.append(f"k {k} (at most {FUSED_MAX_K})")
    return problems
