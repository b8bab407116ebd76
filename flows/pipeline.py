"""Prefect flow: cache_activations -> train_sae -> evaluate -> register, one task per stage.

A stage whose outputs exist (under paths derived from the hash of the spec sections it reads) ends
as Cached with the value read back from those outputs; nothing else decides. No task result is
persisted: Prefect's result files name their own deserializer (pickle included), so reading one
from a shared work dir could run code that someone wrote there. Only transient failures are retried.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Sequence
from typing import Any, cast

from prefect import flow, get_run_logger, tags, task, unmapped
from prefect.artifacts import create_table_artifact
from prefect.client.schemas.objects import FlowRun
from prefect.states import Completed
from prefect.task_runners import ThreadPoolTaskRunner

from flows import done, paths, stages, sweep
from flows.locks import exclusive
from flows.retry import Unreachable, retry_transient
from flows.spec import RunSpec

_TASK_OPTIONS: dict[str, Any] = dict(
    retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient, persist_result=False
)
# the stages that use the accelerator: `prefect concurrency-limit create saeflow-gpu N` lets at most N of
# them run at once across every spec and worker (N = the GPUs there are)
GPU_TAG = "saeflow-gpu"
_GPU_TASK_OPTIONS: dict[str, Any] = dict(_TASK_OPTIONS, tags=[GPU_TAG])


def _stage(stage: str, spec: RunSpec, *where) -> Any:
    """Runs a stage, or ends Cached with the value its existing outputs give."""
    found = done.existing_output(stage, spec, *where)
    if found is not None:
        return Completed(name="Cached", data=found, message="its outputs exist")
    return getattr(stages, stage)(spec, *where)


@task(name="plan_cache", **_TASK_OPTIONS)
def plan_cache(spec: RunSpec) -> list[tuple[str, int]]:
    return stages.plan_cache(spec)


@task(name="verify_cache", **_TASK_OPTIONS)
def verify_cache(spec: RunSpec) -> list[str]:
    return stages.reverify_cache(spec)


@task(name="cache_shard", **_GPU_TASK_OPTIONS)
def cache_shard(spec: RunSpec, split: str, index: int) -> None:
    stages.cache_shard(spec, split, index)


@task(name="cache_activations", **_GPU_TASK_OPTIONS)
def cache_activations(spec: RunSpec) -> str:
    return _stage("cache", spec)


@task(name="train_sae", **_GPU_TASK_OPTIONS)
def train_sae(spec: RunSpec, hookpoint: str, group: list[int] | None = None) -> list[str]:
    return _stage("train", spec, hookpoint, group)


@task(name="evaluate", **_GPU_TASK_OPTIONS)
def evaluate(spec: RunSpec, hookpoint: str, index: int) -> dict[str, float]:
    return _stage("evaluate", spec, hookpoint, index)


@task(name="register", **_TASK_OPTIONS)
def register(spec: RunSpec, hookpoint: str, index: int) -> str:
    return _stage("register", spec, hookpoint, index)


_TASKS = {"cache": cache_activations, "train": train_sae, "evaluate": evaluate, "register": register}


CHECKS_SECONDS = 10.0  # every server a spec names is checked within this, before any work


def _left(deadline: float | None) -> float:
    """Seconds a check may take: what is left of the checks' shared time (at least half a second)."""
    return 5.0 if deadline is None else max(0.5, deadline - time.monotonic())


def _probe(address: str, field: str, what: str, deadline: float | None = None) -> None:
    """Fails within seconds when nothing listens at address (Dask would wait 30 s, then say only
    "connection refused")."""
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    try:
        with socket.create_connection((host or host_port, int(port or 8786)), timeout=_left(deadline)):
            pass
    except OSError as e:
        raise Unreachable(
            f"{field}: cannot reach the {what} at {address} ({e.strerror or e}): start it, or fix {field} in the spec"
        ) from None


STORAGE_HINTS = {
    "unreachable": "check the endpoint in {options} (client_kwargs.endpoint_url) and that the server is up",
    "credentials": "set the store's credentials (S3: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or key and secret "
    "in {options})",
    "missing": "create the bucket, or fix {field}",
}


def check_storage(spec: RunSpec, deadline: float | None = None) -> None:
    """The work dir and the activation store answer, with usable credentials: checked in seconds,
    before any work, with the spec field that names them."""
    from storage.workdir import StorageProblem, probe

    places = [("workdir", spec.workdir, spec.workdir_options, "workdir_options")]
    if spec.data.store:
        places.append(("data.store", spec.data.store, spec.data.store_options, "data.store_options"))
    for field, location, options, options_field in places:
        try:
            probe(location, options, timeout=_left(deadline))
        except StorageProblem as e:
            hint = STORAGE_HINTS[e.kind].format(options=options_field, field=field)
            raise Unreachable(f"{field}: {location}: {e}: {hint}") from None


def check_servers(spec: RunSpec, only: Sequence[str], deadline: float | None = None) -> None:
    """The MLflow tracking server (when the run registers) and the Prefect API answer HTTP within
    seconds: a server that accepts connections and never answers would otherwise cost minutes of
    read timeouts and retries, found only at the end of the run."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    uri, source = spec.tracking_uri_and_source()
    servers = []
    if "register" in only and uri.startswith(("http://", "https://")):
        what = f"the MLflow tracking server at {uri} ({source})"
        servers.append((f"{uri.rstrip('/')}/health", what, "start it, or fix its address"))
    if PREFECT_API_URL.value():
        fix = "start that server (prefect server start) or unset PREFECT_API_URL to run with a temporary local one"
        servers.append(
            (f"{PREFECT_API_URL.value().rstrip('/')}/health", f"the Prefect API at {PREFECT_API_URL.value()}", fix)
        )
    for url, what, fix in servers:
        try:
            answer = httpx.get(url, timeout=min(5.0, _left(deadline)))
        except httpx.TimeoutException:
            raise Unreachable(f"{what} accepts connections but does not answer: {fix}") from None
        except httpx.HTTPError:
            raise Unreachable(f"cannot reach {what}: {fix}") from None
        if answer.status_code >= 500:
            raise Unreachable(f"{what} answers {answer.status_code}: check the server's log")


def task_runner(spec: RunSpec, deadline: float | None = None):
    """Threads by default; Dask when the spec names a scheduler or asks for local Dask workers."""
    o = spec.orchestration
    if o.dask_address or o.dask_workers:
        from prefect_dask import DaskTaskRunner

        if o.dask_address:
            _probe(o.dask_address, "orchestration.dask_address", "Dask scheduler", deadline)
            return DaskTaskRunner(address=o.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": o.dask_workers, "threads_per_worker": 1, "processes": True})
    # one at a time: an LM forward already uses every core of the machine
    return ThreadPoolTaskRunner(max_workers=1)


def run_pipeline(spec: RunSpec, only: Sequence[str] = stages.STAGES, **options) -> list[dict]:
    """Runs the flow while holding the spec's lock: a second run of the same data waits for the first,
    then finds its outputs (each shard and SAE is computed once).

    Whoever holds the lock knows that no other run of this spec is alive on this host: a flow run of
    it that the server still shows as running was killed (or lost its API mid-run) and is marked
    Crashed, so that the server never shows a dead run as running.
    """
    deadline = time.monotonic() + CHECKS_SECONDS
    runner = task_runner(spec, deadline)  # first: a scheduler that does not answer fails here, before any server starts
    check_storage(spec, deadline)
    check_servers(spec, only, deadline)
    key = spec.part_hash(*paths.CACHE_SECTIONS)
    with exclusive(spec.root / "locks" / f"{key}.lock", f"the work dir of {spec.name} ({paths.store_url(spec)})"):
        tag = f"saeflow-run:{socket.gethostname()}:{key}"
        mark_orphans_crashed(tag)
        with tags(tag):
            return pipeline.with_options(task_runner=runner)(spec, only=only, **options)


def mark_orphans_crashed(tag: str) -> int:
    """Sets every flow run with `tag` that is still Running or Pending to Crashed; returns how many."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    alive = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING]))
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag]), state=alive))
        for run in runs:
            client.set_flow_run_state(
                run.id,
                Crashed(
                    message="its process ended without reporting (killed, or the "
                    "API was unreachable); a later run of the spec found it"
                ),
                force=True,
            )
            logging.getLogger(__name__).warning(
                "flow run %s (%s) was left %s by a process that is gone: marked Crashed",
                run.name,
                run.id,
                run.state_name,
            )
    return len(runs)


# one task at a time unless run_pipeline picks Dask: an LM forward uses every core, and the LM (with its
# capture hooks) is shared by the tasks of a process
# (Prefect's stubs do not see a ThreadPoolTaskRunner as the TaskRunner it is)
@flow(name="saeflow-pipeline", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))  # pyright: ignore[reportCallIssue, reportArgumentType]
def pipeline(spec: RunSpec, only: Sequence[str] = stages.STAGES, here: bool = False) -> list[dict]:
    """Runs the selected stages; an earlier stage that is not selected must already be done, later
    ones are left alone. With orchestration.pools each named stage runs on its pool (unless `here`:
    this flow run is already that stage's run on its pool)."""
    if spec.orchestration.pools and not here:
        return _placed(spec, only)
    logger = get_run_logger()
    last = max(stages.STAGES.index(s) for s in only)
    walls: dict[str, float] = {}  # seconds each selected stage took, over every hookpoint and SAE

    @contextlib.contextmanager
    def timed(stage: str):
        start = time.monotonic()
        try:
            yield
        finally:
            if stage in only:
                walls[stage] = walls.get(stage, 0.0) + time.monotonic() - start

    def run(stage: str, *where):
        if stages.STAGES.index(stage) > last:
            return None
        if stage not in only:
            if not done.is_done(stage, spec, *where):
                raise RuntimeError(
                    f"stage {stage!r} has not run for this spec{' at ' + where[0] if where else ''}: "
                    f"run `saeflow {stage} SPEC` (or `saeflow run SPEC`) first"
                )
            return None
        # a stage that found its outputs returns a Cached state: take its value either way
        with timed(stage):
            return _TASKS[stage](spec, *where, return_state=True).result()

    with timed("cache"):
        if "cache" in only:  # a finished store is checked again: damaged shards are recomputed, not trusted
            verify_cache(spec)
        if "cache" in only and not done.is_done("cache", spec):
            # shards fan out over the flow's task runner (threads, or Dask workers); only missing ones run
            missing = plan_cache(spec)
            if missing:
                logger.info("computing %d activation shards", len(missing))
                cache_shard.map(unmapped(spec), [s for s, _ in missing], [i for _, i in missing]).result()
    run("cache")
    rows = []
    for hookpoint in spec.hookpoints:
        groups = stages.train_groups(spec, hookpoint) if "train" in only else [None]
        if spec.data.window_shards and "train" in only and not done.is_done("train", spec, hookpoint):
            with timed("train"):  # and the train split's caching, side by side
                train_in_window(spec, hookpoint)
        elif len(groups) == 1:
            run("train", hookpoint)
        else:  # by token budget, and by what fits on a device together: a task per group, each re-runnable alone
            logger.info(
                "training %d SAEs at %s in %d groups (one pass each): %s", len(spec.sae), hookpoint, len(groups), groups
            )
            # over the task runner: Dask workers take groups side by side, the default threads one by one
            with timed("train"):
                for future in [train_sae.submit(spec, hookpoint, g) for g in groups]:
                    future.result()
        metrics = [run("evaluate", hookpoint, index) for index in range(len(spec.sae))]
        if "evaluate" in only:  # each SAE's browser shows the sweep's frontier before it is registered
            sweep.share_with_browsers(spec, hookpoint)
        chosen = sweep.to_register(spec, hookpoint, metrics) if "register" in only else [False] * len(spec.sae)
        for index in range(len(spec.sae)):
            uri = run("register", hookpoint, index) if chosen[index] else None
            rows.append(_row(spec, hookpoint, index, metrics[index], uri))
    if "evaluate" in only:
        create_table_artifact(key="saeflow-metrics", table=rows, description=f"SAE metrics of {spec.name}")
    ordered = {stage: walls[stage] for stage in stages.STAGES if stage in walls}
    return [{**row, "stage_seconds": ordered} for row in rows]


def train_in_window(spec: RunSpec, hookpoint: str, poll_seconds: float = 0.5) -> list[str]:
    """data.window_shards: the train task runs on the task runner while this flow caches the train
    shards it will read (each a cache_shard task as ever, run here one by one), at most the window's
    count from the trainer's cursor on (storage/window.py). A shard whose caching fails after its
    retries stops the trainer, which waits for it."""
    from prefect.futures import wait

    from storage.window import Window

    window = Window.of(paths.store_url(spec), paths.store_options(spec))
    if window is None:
        raise RuntimeError(f"the activation store at {paths.store_url(spec)} was planned without a window: cache again")
    session = window.open_session()
    get_run_logger().info(
        "training %s while caching its %d train shards, at most %d on disk", hookpoint, window.n_shards, window.shards
    )
    trainer = train_sae.submit(spec, hookpoint)
    failed = False
    while True:
        todo = [] if failed else window.to_cache(session) or []
        if wait([trainer], timeout=0 if todo else poll_seconds).done:
            return trainer.result()
        if todo:  # one shard, then look at the trainer again
            try:
                cache_shard(spec, "train", todo[0])
            except Exception as e:
                window.stop(f"caching train shard {todo[0]} failed: {e}")
                failed = True


def _row(spec: RunSpec, hookpoint: str, index: int, metrics: dict | None, uri: str | None) -> dict:
    return {
        "hookpoint": hookpoint,
        "sae": spec.model_name(hookpoint, index),
        "sae_dir": spec.work.location(paths.sae_rel(spec, hookpoint, index)),
        "report": spec.work.location(f"{paths.eval_rel(spec, hookpoint, index)}/{paths.BROWSER_DIR}/index.html")
        if metrics
        else None,
        "model_uri": uri,
        **(metrics or {}),
    }


STAGE_DEPLOYMENT = "saeflow-stage"  # deploy/prefect.yaml: one deployment of run_stage per work pool, named after it


def _placed(spec: RunSpec, only: Sequence[str]) -> list[dict]:
    """Each selected stage as its own flow run: on its work pool (the deployment saeflow-stage/<pool>)
    when the spec names one, else in this process; one after the other, each waited for. Stages hand
    over nothing but their outputs in the shared work dir and registry."""
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    payload = spec.model_dump(mode="json")
    for stage in stages.STAGES[: max(stages.STAGES.index(s) for s in only) + 1]:
        if stage not in only:
            continue
        pool = spec.orchestration.pools.get(stage)
        if pool is None:
            run_stage(payload, stage)
            continue
        # a multi-node train stage is one job per node: the jobs meet at train.rdzv_endpoint
        jobs = spec.train.nodes if stage == "train" else 1
        logger.info("running the %s stage on work pool %s%s", stage, pool, f" ({jobs} jobs, one per node)" * (jobs > 1))
        children = [
            cast(
                FlowRun,
                run_deployment(f"{STAGE_DEPLOYMENT}/{pool}", parameters={"spec": payload, "stage": stage}, timeout=0),
            )  # called from a flow: the sync form, a FlowRun
            for _ in range(jobs)
        ]
        for child in _wait_for_flow_runs([c.id for c in children]):
            if not child.state.is_completed():
                raise RuntimeError(
                    f"the {stage} stage failed on work pool {pool} (flow run {child.name}, "
                    f"{child.state.name}): {child.state.message}"
                )
    # the values are read back from the outputs, as a Cached stage's are
    return [
        _row(spec, h, i, done.existing_output("evaluate", spec, h, i), done.existing_output("register", spec, h, i))
        for h in spec.hookpoints
        for i in range(len(spec.sae))
    ]


def _wait_for_flow_runs(ids: list, poll_seconds: float = 5.0) -> list:
    """The flow runs, once every one of them has reached a final state (as run_deployment waits)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        while True:
            runs = [client.read_flow_run(i) for i in ids]
            if all(r.state is not None and r.state.is_final() for r in runs):
                return runs
            time.sleep(poll_seconds)


@flow(name="saeflow-stage")
def run_stage(spec: dict, stage: str) -> None:
    """One stage of a spec (given whole: the machine running it need not see the spec's file)."""
    from flows.spec import parse_spec

    parsed = parse_spec(spec)
    pipeline.with_options(task_runner=task_runner(parsed))(parsed, only=[stage], here=True)


@flow(name="saeflow-run-spec")
def run_spec_file(spec_path: str, only: list[str] | None = None) -> list[dict]:
    """Deployment entry point: validates a spec file on the worker, then runs the pipeline."""
    from flows.spec import load_spec

    return run_pipeline(load_spec(spec_path), only=stages.STAGES if only is None else only)
