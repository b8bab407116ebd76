"""The whole evaluation of one SAE in one call: a plan in, a metrics record (and what the feature
browser shows) out. The caller supplies the data as an `EvalSource` (storage/ reads the store, the
pipeline loads the LM); nothing here knows where the data lives."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from sae.evaluate import ablation_sparsity, downstream_metrics, reconstruction_metrics
from sae.features import LogitEffects, decoder_neighbours, logit_effects
from sae.model import TopKSAE
from sae.n2g import Explanations, explain
from sae.probes import MIN_LABELS, probe_metrics, task_labels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalPlan:
    tokens: int = 8192  # held-out rows for the reconstruction metrics
    downstream_contexts: int = 64  # §4.1 LM loss with the SAE spliced in (0: skip)
    batch_contexts: int = 16
    ablation_contexts: int = 16  # §4.4 sample size (0: skip)
    feature_tokens: int = 16384  # rows (whole contexts) for probes, N2G and the browser
    probes: bool = True  # §4.2
    n2g: bool = True  # §4.3
    browser: bool = True  # collect what the all-latent browser shows

    def needs_features(self) -> bool:
        return self.feature_tokens > 0 and (self.probes or self.n2g or self.browser)


@dataclass
class EvalSource:
    """The held-out data. rows(n): float32 batches of the first n activation rows, context after
    context, `positions` rows per context (positions from first_position on); contexts(n): the first
    n contexts' token ids (n, length); lm(): (model, tokenizer), asked for only when needed."""

    rows: Callable[[int], Iterable[torch.Tensor]]
    contexts: Callable[[int], np.ndarray]
    n_contexts: int
    positions: int
    first_position: int
    hookpoint: str
    lm: Callable[[], tuple]
    mean_activation: Callable[[int], torch.Tensor]  # the mean of the first n rows


@dataclass
class FeatureSample:
    """The codes of whole held-out contexts and what the browser shows about every latent."""

    tokens: np.ndarray  # (contexts, length) token ids
    first_position: int
    values: np.ndarray  # (contexts * positions, k) kept activations
    indices: np.ndarray  # (contexts * positions, k) their latents
    token_text: Callable[[int], str]
    explanations: Explanations | None = None
    logit_effects: LogitEffects | None = None
    neighbours: tuple[np.ndarray, np.ndarray] | None = None  # (n, 10) latents nearest by decoder cosine, cosines


@dataclass
class EvalRecord:
    metrics: dict[str, float]
    features: FeatureSample | None = None
    details: dict = field(default_factory=dict)  # per-task probe latents, N2G distributions


def evaluate_sae(sae: TopKSAE, plan: EvalPlan, source: EvalSource, progress: bool = True) -> EvalRecord:
    sae = sae.eval()
    metrics = reconstruction_metrics(sae, source.rows(plan.tokens), progress=progress)
    if "train_dead_fraction" in sae.metadata:
        metrics["train_dead_fraction"] = sae.metadata["train_dead_fraction"]
    if plan.downstream_contexts > 0:
        model, _ = source.lm()
        contexts = torch.from_numpy(source.contexts(plan.downstream_contexts))
        metrics.update(
            downstream_metrics(
                sae,
                model,
                contexts,
                source.hookpoint,
                source.first_position,
                sae.split(source.mean_activation(plan.tokens)[None])[1][0],  # a transcoder's: the target's mean
                plan.batch_contexts,
                progress,
            )
        )
    if plan.ablation_contexts > 0:
        model, _ = source.lm()
        contexts = torch.from_numpy(source.contexts(plan.ablation_contexts))
        metrics.update(ablation_sparsity(sae, model, contexts, source.hookpoint, source.first_position))
    record = EvalRecord(metrics)
    if plan.needs_features():
        record.features, acts = collect_features(sae, plan, source)
        _feature_metrics(sae, plan, record, acts, progress)
    return record


def collect_features(sae: TopKSAE, plan: EvalPlan, source: EvalSource) -> tuple[FeatureSample, torch.Tensor]:
    """The codes (and raw activations) of the first feature_tokens rows, in whole contexts; the
    explanations and logit effects when the plan asks for them."""
    n_contexts = min(source.n_contexts, max(2, plan.feature_tokens // source.positions))
    acts = sae.split(torch.cat(list(source.rows(n_contexts * source.positions))))[0]  # what the encoder reads
    values, indices = [], []
    with torch.no_grad():
        for batch in acts.split(4096):
            codes = sae.encode(batch)
            values.append(codes.values.float().numpy())
            indices.append(codes.indices.numpy())
    model, tokenizer = source.lm()
    pieces: dict[int, str] = {}

    def token_text(token: int) -> str:
        if token not in pieces:
            pieces[token] = tokenizer.decode([token])
        return pieces[token]

    width = max(v.shape[1] for v in values)  # a JumpReLU code's width varies from batch to batch
    sample = FeatureSample(
        source.contexts(n_contexts).astype(np.int64),
        source.first_position,
        np.concatenate([np.pad(v, ((0, 0), (0, width - v.shape[1]))) for v in values]),
        np.concatenate([np.pad(i, ((0, 0), (0, width - i.shape[1]))) for i in indices]),
        token_text,
    )
    if plan.n2g or plan.browser:
        vocab = max(int(sample.tokens.max()) + 1, len(tokenizer))
        sample.explanations = explain(
            sample.tokens,
            sample.first_position,
            sample.values,
            sample.indices,
            sae.cfg.n_latents,
            n_contexts // 2,
            vocab,
        )
    if plan.browser:
        sample.logit_effects = logit_effects(sae, model.get_output_embeddings().weight)
        sample.neighbours = decoder_neighbours(sae)
    return sample, acts


def _feature_metrics(sae: TopKSAE, plan: EvalPlan, record: EvalRecord, acts: torch.Tensor, progress: bool) -> None:
    sample = record.features
    if sample is None:
        raise ValueError("feature metrics need the record's feature sample (collect_features)")
    n_contexts = len(sample.tokens)
    n_train = n_contexts // 2 * (sample.tokens.shape[1] - sample.first_position)
    if plan.probes:
        texts = [[sample.token_text(int(t)) for t in context] for context in sample.tokens]
        labels = {task: y.reshape(-1) for task, y in task_labels(texts, sample.first_position).items()}
        probes = probe_metrics(
            labels,
            (torch.from_numpy(sample.values), torch.from_numpy(sample.indices)),
            acts,
            sae.cfg.n_latents,
            n_train,
            progress=progress,
        )
        record.details["probe_latents"] = {
            k.split(".", 1)[1]: int(v) for k, v in probes.items() if k.startswith("probe_latent.")
        }
        record.metrics.update({k: v for k, v in probes.items() if not k.startswith("probe_latent.")})
        if probes["probe_tasks"] == 0:
            log.warning(
                "probe loss: no task has %d positive and negative tokens in each half of the %d contexts; "
                "raise eval.feature_tokens",
                MIN_LABELS,
                n_contexts,
            )
    if plan.n2g and sample.explanations is not None:
        n2g = sample.explanations.metrics()
        record.metrics.update({k: v for k, v in n2g.items() if math.isfinite(v)})
