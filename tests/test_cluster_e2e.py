"""End to end on real servers, all on loopback: Prefect server and MLflow server on PostgreSQL,
MLflow's artifacts and saeflow's work dir and activation store in an S3 server, a Dask scheduler with
two workers for the caching shards. The pipeline is deployed from deploy/prefect.yaml to a process
work pool and run by a `prefect worker`; a failure injected into evaluate is re-run alone; the SAE is
pulled from the MLflow server by a fresh process."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from servers import BIN, free_port, server

pytestmark = pytest.mark.heavy  # make test-heavy (CI runs it after make test)

REPO = Path(__file__).resolve().parents[1]
POOLS = ("saeflow", "gpu", "cpu")  # and `nodes`, with two workers
HOOK = "model.layers.1"
RUN = """
import json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import FlowRunSort
from prefect.deployments import run_deployment

run = run_deployment("saeflow-run-spec/saeflow", parameters={"spec_path": sys.argv[1]},
                     job_variables={"env": json.loads(sys.argv[2])}, timeout=900, poll_interval=1)
with get_client(sync_client=True) as client:
    (sub,) = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["saeflow-pipeline"])),
                                   sort=FlowRunSort.START_TIME_DESC, limit=1)
    tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[sub.id])))
print(json.dumps({"state": run.state.type.value, "message": run.state.message,
                  "tasks": {t.name.rsplit("-", 1)[0]: t.state.name for t in tasks}}))
"""


STAGE_POOLS = """
import json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
with get_client(sync_client=True) as client:
    runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["saeflow-stage"])))
print(json.dumps([[r.parameters["spec"]["name"], r.parameters["stage"], r.work_pool_name]
                  for r in runs if r.state.is_completed()]))
"""


def stage_pools(env, name: str) -> list[tuple[str, str]]:
    """(stage, work pool) of each completed stage flow run of the spec `name`, sorted."""
    runs = json.loads(cli([sys.executable, "-c", STAGE_POOLS], env).strip().splitlines()[-1])
    return sorted((stage, pool) for spec, stage, pool in runs if spec == name)


def cli(args, env, **kwargs):
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, f"{args[:3]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_deployed_pipeline_on_real_servers(
    prefect_server, mlflow_server, dask_scheduler, s3_server, tiny_model_dir, text_dir, tmp_path
):
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "SAEFLOW_REPO": str(REPO),
        "MLFLOW_TRACKING_URI": mlflow_server,
        "MLFLOW_S3_ENDPOINT_URL": s3_server["endpoint"],
        "SAEFLOW_SCRATCH": str(tmp_path / "worker-disk"),
        "PREFECT_HOME": str(tmp_path / "prefect-client"),
        # workers look for new flow runs every second (default 10 s): the test waits on each pickup
        "PREFECT_WORKER_QUERY_SECONDS": "1",
    }
    env.pop("SAEFLOW_FAIL_STAGE", None)
    spec = {
        "name": "tiny-cluster",
        "model": {"source": str(tiny_model_dir)},
        "data": {
            "source": str(text_dir),
            "context_length": 16,
            "tokens": 1500,
            "eval_fraction": 0.3,
            "shard_contexts": 32,
        },
        "hookpoints": [HOOK],
        "sae": {"n_latents": 64, "k": 4, "dead_tokens": 500},
        "train": {"batch_tokens": 128, "tokens": 1500},
        "eval": {"tokens": 300, "downstream_contexts": 4, "browser": True, "ablation_contexts": 0},
        "registry": {"tracking_uri": mlflow_server},
        "orchestration": {"dask_address": dask_scheduler},
        "workdir": "s3://saeflow/e2e",
        "workdir_options": s3_server["options"],
    }
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))

    prefect = str(BIN / "prefect")
    for pool in (*POOLS, "nodes"):
        cli([prefect, "work-pool", "create", "--type", "process", pool], env)
    # the accelerator stages' concurrency limit, as docs/cluster.md sets it up
    cli([prefect, "concurrency-limit", "create", "saeflow-gpu", "8"], env)
    cli([prefect, "--no-prompt", "deploy", "--prefect-file", "deploy/prefect.yaml", "--all"], env, cwd=REPO)
    # a pool of its own for the two-node train stage: the gpu deployment, named after that pool
    config = yaml.safe_load((REPO / "deploy" / "prefect.yaml").read_text())
    (gpu,) = [d for d in config["deployments"] if d["name"] == "gpu"]
    config["deployments"] = [{**gpu, "name": "nodes", "work_pool": {**gpu["work_pool"], "name": "nodes"}}]
    (tmp_path / "nodes.yaml").write_text(yaml.safe_dump(config))
    cli([prefect, "--no-prompt", "deploy", "--prefect-file", str(tmp_path / "nodes.yaml"), "--all"], env, cwd=REPO)
    with contextlib.ExitStack() as workers:
        for pool in POOLS:  # one worker per pool, as on three kinds of machine
            port = free_port()
            worker_env = {
                **env,
                "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1",
                "PREFECT_WORKER_WEBSERVER_PORT": str(port),
                "SAEFLOW_SCRATCH": str(tmp_path / f"disk-{pool}"),
            }
            workers.enter_context(
                server(
                    f"prefect-worker-{pool}",
                    [prefect, "worker", "start", "-p", pool, "--with-healthcheck"],
                    f"http://127.0.0.1:{port}/health",
                    tmp_path / "logs",
                    worker_env,
                    timeout=120,
                )
            )
        for node in (0, 1):  # two machines serving the `nodes` pool, one job at a time each
            port = free_port()
            # torch.distributed.run takes --local-addr from PET_LOCAL_ADDR: the nodes talk over loopback
            worker_env = {
                **env,
                "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1",
                "PREFECT_WORKER_WEBSERVER_PORT": str(port),
                "SAEFLOW_SCRATCH": str(tmp_path / f"disk-node-{node}"),
                "PET_LOCAL_ADDR": "127.0.0.1",
                "GLOO_SOCKET_IFNAME": "lo",
            }
            workers.enter_context(
                server(
                    f"prefect-worker-node-{node}",
                    [prefect, "worker", "start", "-p", "nodes", "--limit", "1", "--with-healthcheck"],
                    f"http://127.0.0.1:{port}/health",
                    tmp_path / "logs",
                    worker_env,
                    timeout=120,
                )
            )

        def run(**job_env) -> dict:
            return json.loads(
                cli([sys.executable, "-c", RUN, str(spec_path), json.dumps(job_env)], env).strip().splitlines()[-1]
            )

        # the flow run's process makes evaluate fail (tests/inject/sitecustomize.py)
        failed = run(SAEFLOW_FAIL_STAGE="evaluate", PYTHONPATH=str(REPO / "tests" / "inject"))
        assert failed["state"] == "FAILED" and "train_sae" in failed["tasks"], failed
        assert failed["tasks"]["train_sae"] == "Completed" and failed["tasks"]["evaluate"] == "Failed", failed
        assert failed["tasks"]["cache_shard"] == "Completed"  # the shards ran on the Dask workers

        again = run()
        assert again["state"] == "COMPLETED", again
        stages = {t: again["tasks"][t] for t in ("cache_activations", "train_sae", "evaluate", "register")}
        assert stages == {
            "cache_activations": "Cached",
            "train_sae": "Cached",
            "evaluate": "Completed",
            "register": "Completed",
        }, again
        assert "cache_shard" not in again["tasks"]

        # stages placed on pools: cache, train and evaluate on `gpu`, register on `cpu`, each its own flow run
        placed = {
            **spec,
            "name": "tiny-placed",
            "workdir": "s3://saeflow/e2e-placed",
            "orchestration": {"pools": {"cache": "gpu", "train": "gpu", "evaluate": "gpu", "register": "cpu"}},
        }
        spec_path.write_text(yaml.safe_dump(placed))
        done = run()
        assert done["state"] == "COMPLETED", done
        assert stage_pools(env, "tiny-placed") == [
            ("cache", "gpu"),
            ("evaluate", "gpu"),
            ("register", "cpu"),
            ("train", "gpu"),
        ]

        # two nodes: the train stage is two jobs on the `nodes` pool, each taken by a worker of its own
        # (as on two machines), meeting at a c10d rendezvous on loopback
        nodes = {
            **spec,
            "name": "tiny-nodes",
            "workdir": "s3://saeflow/e2e-nodes",
            "train": {**spec["train"], "nodes": 2, "rdzv_endpoint": f"127.0.0.1:{free_port()}"},
            "orchestration": {"pools": {"train": "nodes"}},
        }
        spec_path.write_text(yaml.safe_dump(nodes))
        done = run()
        assert done["state"] == "COMPLETED", done
        # the stages not placed ran in the parent's process (no pool)
        assert stage_pools(env, "tiny-nodes") == [
            ("cache", None),
            ("evaluate", None),
            ("register", None),
            ("train", "nodes"),
            ("train", "nodes"),
        ]

    # a fresh process elsewhere pulls the SAE from the MLflow server (its files from the S3 store)
    out = tmp_path / "pulled"
    clean = {k: v for k, v in env.items() if not k.startswith("SAEFLOW")}
    cli(
        [
            str(BIN / "saeflow"),
            "pull",
            "models:/tiny-cluster@candidate",
            "--out",
            str(out),
            "--tracking-uri",
            mlflow_server,
        ],
        clean,
    )
    from sae.model import TopKSAE

    sae = TopKSAE.load(out)
    assert sae.cfg.n_latents == 64 and sae.metadata["hookpoint"] == HOOK
