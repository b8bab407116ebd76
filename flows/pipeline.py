"""Prefect flow: cache_activations -> train_sae -> evaluate -> register, one task per stage.

Each task's cache key is the hash of the spec sections its output depends on, with results persisted
under the work dir, so running the same spec again reports finished stages as Cached. A cached result
is only a path: when the output behind it is gone, the task is refreshed instead of trusted.
"""

from __future__ import annotations

from typing import Callable, Sequence

from prefect import flow, get_run_logger, task, unmapped
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.artifacts import create_table_artifact

from flows import stages
from flows.spec import RunSpec


def _key(stage: str, parts: Callable[[int], tuple[str, ...]] | tuple[str, ...]):
    """Cache key: the hash of the spec parts the stage reads (per SAE index where it has one)."""

    def key(_ctx, params: dict) -> str:
        spec: RunSpec = params["spec"]
        index = params.get("index")
        digest = spec.part_hash(*(parts(index) if callable(parts) else parts))
        return f"saeflow-{stage}-{digest}-{params.get('hookpoint', '')}-{index if index is not None else ''}"

    return key


_TASK_OPTIONS = dict(retries=2, retry_delay_seconds=10, persist_result=True)


@task(name="plan_cache", retries=2, retry_delay_seconds=10)
def plan_cache(spec: RunSpec) -> list[tuple[str, int]]:
    return stages.plan_cache(spec)


@task(name="cache_shard", retries=2, retry_delay_seconds=10)
def cache_shard(spec: RunSpec, split: str, index: int) -> None:
    stages.cache_shard(spec, split, index)


@task(name="cache_activations", cache_key_fn=_key("cache", stages.CACHE_SECTIONS), **_TASK_OPTIONS)
def cache_activations(spec: RunSpec) -> str:
    return stages.cache(spec)


@task(name="train_sae", cache_key_fn=_key("train", stages.TRAIN_ALL_SECTIONS), **_TASK_OPTIONS)
def train_sae(spec: RunSpec, hookpoint: str) -> list[str]:
    return stages.train(spec, hookpoint)


@task(name="evaluate", cache_key_fn=_key("evaluate", stages.eval_parts), **_TASK_OPTIONS)
def evaluate(spec: RunSpec, hookpoint: str, index: int) -> dict[str, float]:
    return stages.evaluate(spec, hookpoint, index)


@task(name="register", cache_key_fn=_key("register", stages.register_parts), **_TASK_OPTIONS)
def register(spec: RunSpec, hookpoint: str, index: int) -> str:
    return stages.register(spec, hookpoint, index)


_TASKS = {"cache": cache_activations, "train": train_sae, "evaluate": evaluate, "register": register}


def task_runner(spec: RunSpec):
    """Threads by default; Dask when the spec names a scheduler or asks for local Dask workers."""
    o = spec.orchestration
    if o.dask_address or o.dask_workers:
        from prefect_dask import DaskTaskRunner

        if o.dask_address:
            return DaskTaskRunner(address=o.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": o.dask_workers, "threads_per_worker": 1, "processes": True})
    # one at a time: an LM forward already uses every core of the machine
    return ThreadPoolTaskRunner(max_workers=1)


def run_pipeline(spec: RunSpec, only: Sequence[str] = stages.STAGES, **options) -> list[dict]:
    return pipeline.with_options(task_runner=task_runner(spec))(spec, only=only, **options)


@flow(name="saeflow-pipeline", log_prints=True)
def pipeline(spec: RunSpec, only: Sequence[str] = stages.STAGES) -> list[dict]:
    """Runs the selected stages; an earlier stage that is not selected must already be done, later
    ones are left alone."""
    logger = get_run_logger()
    result_storage = spec.root / "prefect-results"
    result_storage.mkdir(parents=True, exist_ok=True)
    last = max(stages.STAGES.index(s) for s in only)

    def run(stage: str, *where):
        if stages.STAGES.index(stage) > last:
            return None
        done = stages.is_done(stage, spec, *where)
        if stage not in only:
            if not done:
                raise RuntimeError(
                    f"stage {stage!r} has not run for this spec{' at ' + where[0] if where else ''}: "
                    f"run `saeflow {stage} SPEC` (or `saeflow run SPEC`) first"
                )
            return None
        t = _TASKS[stage].with_options(result_storage=result_storage, refresh_cache=not done)
        return t(spec, *where)

    if "cache" in only and not stages.is_done("cache", spec):
        # shards fan out over the flow's task runner (threads, or Dask workers); only missing ones run
        missing = plan_cache(spec)
        if missing:
            logger.info("computing %d activation shards", len(missing))
            cache_shard.map(unmapped(spec), [s for s, _ in missing], [i for _, i in missing]).result()
    run("cache")
    logger.info("activation store: %s", stages.store_url(spec))
    rows = []
    for hookpoint in spec.hookpoints:
        run("train", hookpoint)
        for index in range(len(spec.sae)):
            metrics = run("evaluate", hookpoint, index)
            uri = run("register", hookpoint, index)
            rows.append(
                {
                    "hookpoint": hookpoint,
                    "sae": spec.model_name(hookpoint, index),
                    "sae_dir": str(stages.sae_dir(spec, hookpoint, index)),
                    "report": str(stages.eval_dir(spec, hookpoint, index) / stages.REPORT_FILE) if metrics else None,
                    "model_uri": uri,
                    **(metrics or {}),
                }
            )
    if "evaluate" in only:
        create_table_artifact(key="saeflow-metrics", table=rows, description=f"SAE metrics of {spec.name}")
    return rows


@flow(name="saeflow-run-spec")
def run_spec_file(spec_path: str, only: list[str] = list(stages.STAGES)) -> list[dict]:
    """Deployment entry point: validates a spec file on the worker, then runs the pipeline."""
    from flows.spec import load_spec

    return run_pipeline(load_spec(spec_path), only=only)
