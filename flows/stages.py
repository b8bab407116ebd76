"""The four pipeline stages as plain functions of the spec: each writes its output atomically under a
path derived from the spec sections it reads, and returns at once when that output already exists."""

from __future__ import annotations

import json
import logging
import math
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flows import distributed, interrupt
from flows.done import (
    SCORED_FILE,
    check_finite_metrics,
    decided,
    find_version,
    is_done,
    read_metrics,
    registry_lock,
    scored_weights,
    stored_metrics,
    weights_sha256,
)
from flows.paths import (
    BROWSER_DIR,
    CACHE_SECTIONS,
    EVAL_SPLIT_SECTIONS,
    METRICS_FILE,
    eval_dir,
    eval_rel,
    fetch_sae,
    metrics_path,
    register_parts,
    sae_dir,
    sae_rel,
    store_options,
    store_url,
)
from flows.spec import RunSpec
from flows.training import Alone, train_hookpoint, write_json
from sae.browser import HISTOGRAM_FILE
from sae.config import IO, RECIPE_VERSION
from sae.files import CHECKSUM as WEIGHTS_CHECKSUM
from sae.lm import load_lm, resolve_device
from storage import activations as store
from storage import reading, shard_writer
from storage.corpus import split_contexts
from storage.registry import dictionary_tags, file_sha256, register_sae

if TYPE_CHECKING:
    from sae.evaluation import EvalSource

log = logging.getLogger(__name__)

STAGES = ("cache", "train", "evaluate", "register")


_LMS: dict[tuple, tuple] = {}
_LMS_LOCK = threading.Lock()


def _lm(spec: RunSpec):
    """(model, tokenizer), loaded once per process and shared by the tasks that run in it."""
    key = (spec.model.source, spec.model.dtype, spec.model.device)
    with _LMS_LOCK:
        if key not in _LMS:
            _LMS[key] = load_lm(*key, spec.converted_model_dir())
        return _LMS[key]


# stages -------------------------------------------------------------------------------------------
def plan_cache(spec: RunSpec) -> list[tuple[str, int]]:
    """Plans the store (tokenised contexts, empty sharded arrays) unless a plan for this spec exists;
    returns the (split, shard) pairs still to compute."""
    url, opts = store_url(spec), store_options(spec)
    if is_done("cache", spec):
        return []
    digest, eval_digest = spec.part_hash(*CACHE_SECTIONS), spec.part_hash(*EVAL_SPLIT_SECTIONS)
    train_as_planned = store.planned_hash(url, opts) == digest  # the store's attributes, read once each
    if train_as_planned and store.planned_hash(url, opts, "eval_hash") == eval_digest:
        missing = store.missing_shards(url, opts)
        log.info("resuming the activation store at %s: %d shards to compute", url, len(missing))
        return missing
    model, tokenizer = _lm(spec)
    d = spec.data
    positions = d.context_length - int(d.drop_first_position)
    n_train = math.ceil(d.tokens / positions)
    n_eval = max(math.ceil(spec.eval.tokens / positions), spec.eval.downstream_contexts)
    # the train split's contexts do not depend on n_eval: one pass fills each split from its own documents
    train_ctx, eval_ctx = split_contexts(d.source, tokenizer, d.context_length, n_train, n_eval, d.eval_fraction)
    if train_as_planned:  # only the evaluation settings changed
        log.info("the evaluation settings changed: caching the held-out split of %s again, not the train split", url)
        store.replan_split(
            url,
            "eval",
            eval_ctx,
            attrs={"eval_hash": eval_digest},
            shard_contexts=d.shard_contexts,
            compression=d.compression,
            storage_options=opts,
        )
        return store.missing_shards(url, opts)
    store.plan_store(
        url,
        {"train": train_ctx, "eval": eval_ctx},
        spec.sites(),
        d_model=model.config.hidden_size,
        first_position=int(d.drop_first_position),
        dtype=d.dtype,
        shard_contexts=d.shard_contexts,
        compression=d.compression,
        window_shards=d.window_shards,
        attrs={
            "model": spec.model.source,
            "model_revision": getattr(model.config, "_commit_hash", None) or "",
            "tokenizer": getattr(tokenizer, "name_or_path", ""),
            "data": d.source,
            "spec_hash": digest,
            "eval_hash": eval_digest,
        },
        storage_options=opts,
    )
    return store.missing_shards(url, opts)


def reverify_cache(spec: RunSpec) -> list[str]:
    """Checks every shard of a finished store against its checksums; the bad ones lose their markers
    (and the store its `complete` flag), so that caching recomputes exactly those. Returns them."""
    url, opts = store_url(spec), store_options(spec)
    if not store.is_complete(url, opts):
        return []
    problems = store.reopen_bad_shards(url, opts)
    if problems:
        log.warning(
            "the activation store at %s has %d bad shards, recomputing them:\n  %s",
            url,
            len(problems),
            "\n  ".join(problems),
        )
    return problems


def cache_shard(spec: RunSpec, split: str, index: int) -> None:
    model, _ = _lm(spec)
    url, options = store_url(spec), store_options(spec)
    with interrupt.stoppable():
        shard_writer.write_shard(url, split, index, model, spec.data.batch_contexts, options, True, interrupt.requested)


def cache(spec: RunSpec) -> str:
    """Finishes the cache stage: checks every shard, computes statistics, marks the store complete."""
    url, opts = store_url(spec), store_options(spec)
    if is_done("cache", spec):
        log.info("activations already cached at %s", url)
        return url
    store.finalize_store(url, opts)  # logs where the store is
    return url


def train(spec: RunSpec, hookpoint: str, group: list[int] | None = None, progress: bool = True) -> list[str]:
    """Trains the SAEs of `group` (default all) at one hookpoint from one pass over its activations;
    checkpoints every train.checkpoint_every_tokens and resumes from the last checkpoint all of them
    share. With train.devices / nodes > 1, on a grid of processes (flows/distributed.py)."""
    if spec.train.distributed() and not is_done("train", spec, hookpoint):
        distributed.launch(spec, hookpoint)
        return [spec.work.location(sae_rel(spec, hookpoint, i)) for i in range(len(spec.sae))]
    return train_here(spec, hookpoint, progress, only=group)


def train_groups(spec: RunSpec, hookpoint: str) -> list[list[int]]:
    """The SAEs of a hookpoint in groups trained by a task each: one per token budget (SAEs of one
    budget share a pass over the cache), each split further into groups that fit
    train.device_memory_gib together (sae/memory.py) when a limit is set on one process."""
    budgets: dict = {}
    for i, s in enumerate(spec.sae):
        budgets.setdefault(s.tokens, []).append(i)
    if spec.train.device_memory_gib is None or spec.train.distributed():
        return list(budgets.values())
    from sae.memory import pack_groups

    width = store.activations(
        store.open_group_for_status(store_url(spec), store_options(spec)), "train", spec.site(hookpoint)
    ).shape[1]
    d_model = spec.d_model_of(width)
    groups = []
    for members in budgets.values():
        plans = [spec.memory_plan(d_model, i, device=spec.planned_device()) for i in members]
        groups += [[members[j] for j in g] for g in pack_groups(plans, int(spec.train.device_memory_gib * 2**30))]
    return groups


def train_here(
    spec: RunSpec, hookpoint: str, progress: bool = True, only: list[int] | None = None, device: str | None = None
) -> list[str]:
    """The train stage in this process: the SAEs `only` (default all) on `device` (default the spec's)."""
    indices = only if only is not None else list(range(len(spec.sae)))
    return train_hookpoint(
        spec, hookpoint, indices, device or str(resolve_device(spec.train.device)), Alone(), progress
    )


def evaluate(spec: RunSpec, hookpoint: str, index: int = 0, progress: bool = True) -> dict[str, float]:
    from sae.evaluation import evaluate_sae
    from sae.model import TopKSAE

    path, rel = metrics_path(spec, hookpoint, index), eval_rel(spec, hookpoint, index)
    if is_done("evaluate", spec, hookpoint, index):
        log.info("metrics for %s already at %s", hookpoint, spec.work.location(f"{rel}/{METRICS_FILE}"))
        return stored_metrics(spec, hookpoint, index)
    sae = TopKSAE.load(fetch_sae(spec, hookpoint, index))
    # the eval split's checksums: damaged bytes could decode without error into wrong metrics
    group = store.open_store(store_url(spec), store_options(spec), verify=("eval",))
    source = eval_source(group, spec.site(hookpoint), lambda: _lm(spec))
    record = evaluate_sae(sae, spec.eval.plan(), source, progress)
    check_finite_metrics(record.metrics, f"the evaluation of {sae_dir(spec, hookpoint, index)}")
    if spec.eval.browser:
        write_browser(record, sae.cfg.n_latents, path.parent, f"{spec.name} · {hookpoint}")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path.parent / SCORED_FILE, {WEIGHTS_CHECKSUM: weights_sha256(spec, hookpoint, index)})
    write_json(path, record.metrics)
    spec.work.publish(rel, marker=METRICS_FILE)
    log.info("metrics for %s written to %s", hookpoint, spec.work.location(f"{rel}/{METRICS_FILE}"))
    return record.metrics


def eval_source(group, hookpoint: str, lm) -> EvalSource:
    """The store's eval split as the evaluation reads it (rows, contexts, their mean); `hookpoint` is
    the store's site (a transcoder's "MODULE:io")."""
    from sae.evaluation import EvalSource

    layout = store.layout_of(group, "eval")
    acts = store.activations(group, "eval", hookpoint)
    return EvalSource(
        rows=lambda n: reading.iter_rows(acts, 4096, stop=n),
        contexts=lambda n: np.asarray(group["eval/tokens"][:n]),
        n_contexts=layout.n_contexts,
        positions=layout.positions,
        first_position=layout.first_position,
        hookpoint=hookpoint,
        lm=lm,
        mean_activation=lambda n: reading.column_mean(acts, stop=n),
    )


def write_browser(record, n_latents: int, eval_folder: Path, title: str) -> Path:
    """The all-latent feature browser into eval_folder/browser/, its density histogram also beside it
    (logged to the MLflow run on its own)."""
    from sae.browser import build_browser

    index = build_browser(eval_folder / BROWSER_DIR, record.features, n_latents, title, record.metrics, record.details)
    shutil.copyfile(index.parent / HISTOGRAM_FILE, eval_folder / HISTOGRAM_FILE)
    log.info("feature browser of %d latents written to %s", n_latents, index)
    return index


def register(spec: RunSpec, hookpoint: str, index: int = 0) -> str:
    uri, source = spec.tracking_uri_and_source()
    with registry_lock(uri):
        found = find_version(spec, hookpoint, index)  # also when a run that held the lock before us registered it
        if found is not None:
            log.info("already registered as %s (version %s)", found.uri, found.version)
            if not decided(spec, found):  # registered, then killed before promote_if decided
                apply_promotion(spec, hookpoint, index, found, uri)
            return found.uri
        log.info("registering into %s (from %s)", uri, source)
        registered = _register(spec, hookpoint, index, uri)
        if spec.registry.promote_if is not None:
            apply_promotion(spec, hookpoint, index, registered, uri)
        return registered.uri


def eval_data_hash(spec: RunSpec) -> str:
    """Which held-out tokens an evaluation used: versions are compared only when theirs are the same."""
    return spec.part_hash(*CACHE_SECTIONS, "eval")


def apply_promotion(spec: RunSpec, hookpoint: str, index: int, registered, uri: str) -> bool:
    """registry.promote_if: moves its alias to the new version only if that beats the version there
    now on the same evaluation tokens; the decision and its numbers go into the version's description,
    and a tag records that it was made (a run killed before it decides on the next run)."""
    from storage.registry import decided, describe, promote

    rule = spec.registry.promote_if
    if rule is None:
        return False
    promoted, line = promotion_decision(spec, hookpoint, index, registered.name)
    if promoted:
        promote(uri, registered.name, registered.version, rule.alias, line)
    else:
        describe(registered.name, registered.version, line)
    log.info("version %s: %s", registered.version, line)
    decided(registered.name, registered.version, rule.alias)
    return promoted


def promotion_decision(spec: RunSpec, hookpoint: str, index: int, name: str) -> tuple[bool, str]:
    """(promote?, the reason in one line) for registry.promote_if."""
    from storage.registry import NotRegistered, is_complete, model_version, version_metrics

    rule = spec.registry.promote_if
    assert rule is not None
    new = stored_metrics(spec, hookpoint, index).get(rule.metric)
    if new is None:
        return False, f"not promoted to {rule.alias}: the evaluation has no {rule.metric}"
    try:
        current = model_version(f"models:/{name}@{rule.alias}")
    except NotRegistered:
        return True, f"promoted to {rule.alias}: the first version ranked by {rule.metric} ({new:.6g})"
    if not is_complete(current):
        return True, f"promoted to {rule.alias}: version {current.version} there is an interrupted registration"
    if current.tags.get("eval_data") != eval_data_hash(spec):
        return False, (
            f"not promoted to {rule.alias}: version {current.version} there was evaluated on other tokens, "
            "so the two are not comparable"
        )
    old = version_metrics(current).get(rule.metric)
    if old is None:
        return False, (
            f"not promoted to {rule.alias}: version {current.version} there has no {rule.metric} to compare "
            f"with; `saeflow promote` moves the alias by hand"
        )
    verdict = f"{rule.metric} {new:.6g} vs {old:.6g} of version {current.version} (margin {rule.margin:g})"
    return rule.better(
        new, old
    ), f"{'promoted' if rule.better(new, old) else 'not promoted'} to {rule.alias}: {verdict}"


def _register(spec: RunSpec, hookpoint: str, index: int, uri: str):
    directory = fetch_sae(spec, hookpoint, index)
    if spec.work.remote:
        spec.work.fetch(eval_rel(spec, hookpoint, index))
    cfg = json.loads((directory / "config.json").read_text())["sae"]
    metrics = read_metrics(metrics_path(spec, hookpoint, index))
    if weights_sha256(spec, hookpoint, index) and scored_weights(spec, hookpoint, index) != file_sha256(
        directory / "sae.safetensors"
    ):
        raise ValueError(
            f"the metrics in {metrics_path(spec, hookpoint, index)} were not measured on the weights "
            f"{directory / 'sae.safetensors'} holds now: run `saeflow run SPEC` (it trains and evaluates again)"
        )
    sae_meta = json.loads((directory / "config.json").read_text()).get("metadata", {})
    trained = spec.resolved_training(cfg["d_in"], index)  # the values the run used, not "auto"
    params = {
        "model": spec.model.source,
        "hookpoint": hookpoint,
        "data": spec.data.source,
        "context_length": spec.data.context_length,
        "train_tokens": sae_meta.get("train_tokens", trained["tokens"]),
        "batch_tokens": spec.train.batch_tokens,
        "recipe": spec.train.recipe,
        "optimizer": trained["optimizer"],
        "lr": f"{sae_meta.get('lr', trained['lr']):.6g}",
        "lr_schedule": f"warmup {trained['warmup_tokens']} tokens, {trained['decay']}",
        **{f"sae.{k}": v for k, v in cfg.items()},
        "aux_k": trained["aux_k"],
        "dead_tokens": trained["dead_tokens"],
        "resample_dead": trained["resample_dead"],
        "spec_name": spec.name,
    }
    store_attrs = store.open_group_for_status(store_url(spec), store_options(spec)).attrs
    tags = {  # what the SAE is and where it came from; its metrics are the run's
        "lm": spec.model.source,
        "lm_revision": str(store_attrs.get("model_revision") or ""),
        "hookpoint": hookpoint,
        "n_latents": str(cfg["n_latents"]),
        "k": str(cfg["k"]),
        "data": spec.data.source,
        "recipe_version": str(RECIPE_VERSION),
        "spec_hash": spec.part_hash(*register_parts(index)),
        "eval_data": eval_data_hash(spec),
    }
    tags.update(dictionary_tags(cfg, hookpoint))  # a transcoder's: what it reads and what it predicts
    return register_sae(
        directory,
        tracking_uri=uri,
        experiment=spec.registry.experiment or spec.name,
        model_name=spec.model_name(hookpoint, index),
        alias=spec.registry.alias,
        params=params,
        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        tags=tags,
        artifact_root=spec.root / "mlartifacts" if uri.startswith(("sqlite:", "file:")) else None,
        run_files=[
            p
            for p in (
                eval_dir(spec, hookpoint, index) / BROWSER_DIR,
                eval_dir(spec, hookpoint, index) / HISTOGRAM_FILE,
                directory / "train_history.json",
            )
            if p.exists()
        ],
    )


def report_registered(model_uri: str, out_dir: Path, tracking_uri: str | None = None) -> Path:
    """`saeflow report`: the feature browser of a registered SAE, also logged to its MLflow run."""
    import tempfile

    from sae.evaluation import EvalPlan, EvalRecord, collect_features
    from sae.model import TopKSAE
    from storage.registry import log_run_files, model_version, pull, version_metrics

    with tempfile.TemporaryDirectory() as tmp:
        sae = TopKSAE.load(pull(model_uri, tmp, tracking_uri)).eval()
    meta = sae.metadata
    version = model_version(model_uri)
    metrics = version_metrics(version)
    group = store.open_store(meta["store_url"], verify=("eval",))
    lm = load_lm(meta["lm"], "auto", "auto")
    source = eval_source(group, meta["hookpoint"] + (IO if sae.cfg.transcoder else ""), lambda: lm)
    sample, _ = collect_features(
        sae, EvalPlan(feature_tokens=source.n_contexts * source.positions, probes=False), source
    )
    title = f"{version.name} v{version.version} · {meta['hookpoint']}"
    index = write_browser(EvalRecord(metrics, sample), sae.cfg.n_latents, Path(out_dir), title)
    log_run_files(str(version.run_id), [index.parent, index.parent.parent / HISTOGRAM_FILE])
    return index
