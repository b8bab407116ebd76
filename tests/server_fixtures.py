"""Session fixtures for the real servers (tests/servers.py): an S3 store (moto), PostgreSQL, a
Prefect server and an MLflow server on that PostgreSQL (MLflow's artifacts in the S3 store), a Dask
scheduler with two workers. Each is started once, on loopback, and stopped at the end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from servers import BIN, free_port, server

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server with a bucket `saeflow`; the test process gets dummy credentials."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    try:
        with server(
            "s3",
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            f"{endpoint}/moto-api/",
            tmp_path_factory.mktemp("s3-logs"),
        ):
            import s3fs

            s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).mkdir("saeflow")
            yield {"endpoint": endpoint, "options": {"client_kwargs": {"endpoint_url": endpoint}}}
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _postgres_bin(name: str) -> str:
    found = shutil.which(name) or next(
        (
            f"/usr/lib/postgresql/{v}/bin/{name}"
            for v in ("17", "16", "15", "14")
            if os.path.exists(f"/usr/lib/postgresql/{v}/bin/{name}")
        ),
        None,
    )
    if found is None:
        raise RuntimeError(f"PostgreSQL's {name} is not installed: apt-get install postgresql (.ci/run does)")
    return found


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A PostgreSQL cluster in a temp dir, run as an unprivileged user (it refuses root), with the
    databases `prefect` and `mlflow`; yields the base URL postgresql://saeflow@127.0.0.1:PORT."""
    import tempfile
    from pathlib import Path

    # not under pytest's temp root: that is private to root, and the server's user must reach its files
    root = Path(tempfile.mkdtemp(prefix="saeflow-postgres-"))
    as_user = []
    if os.geteuid() == 0:  # PostgreSQL will not run as root: the cluster belongs to `nobody`
        shutil.chown(root, "nobody")
        as_user = ["runuser", "-u", "nobody", "--"]
    data = root / "data"
    subprocess.run(
        as_user + [_postgres_bin("initdb"), "-D", str(data), "-U", "saeflow", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    port = free_port()
    args = as_user + [
        _postgres_bin("postgres"),
        "-D",
        str(data),
        "-p",
        str(port),
        "-k",
        str(root),
        "-c",
        "listen_addresses=127.0.0.1",
    ]
    try:
        with server("postgres", args, f"tcp://127.0.0.1:{port}", tmp_path_factory.mktemp("postgres-logs")):
            base = f"postgresql://saeflow@127.0.0.1:{port}"
            for db in ("prefect", "mlflow"):
                subprocess.run(
                    [_postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "saeflow", db],
                    check=True,
                    capture_output=True,
                )
            yield base
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_server(postgres, tmp_path_factory):
    """`prefect server start` on PostgreSQL; yields its API URL."""
    port = free_port()
    env = {
        "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-server-home")),
        "PREFECT_API_DATABASE_CONNECTION_URL": postgres.replace("postgresql://", "postgresql+asyncpg://") + "/prefect",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": "",
    }
    with server(
        "prefect",
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        f"http://127.0.0.1:{port}/api/health",
        tmp_path_factory.mktemp("prefect-logs"),
        env,
        timeout=120,
    ):
        yield f"http://127.0.0.1:{port}/api"


@pytest.fixture(scope="session")
def mlflow_server(postgres, s3_server, tmp_path_factory):
    """`mlflow server` with PostgreSQL as its backend store and artifacts in the S3 store; yields its URL."""
    port = free_port()
    env = {**CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": s3_server["endpoint"]}
    args = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        postgres.replace("postgresql://", "postgresql+psycopg2://") + "/mlflow",
        "--artifacts-destination",
        "s3://saeflow/mlartifacts",
    ]
    with server(
        "mlflow", args, f"http://127.0.0.1:{port}/health", tmp_path_factory.mktemp("mlflow-logs"), env, timeout=120
    ):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def dask_scheduler(prefect_server, s3_server, tmp_path_factory):
    """A Dask scheduler and two single-threaded workers (which report their tasks to the Prefect
    server and reach the S3 store); yields the scheduler's address."""
    port, dashboard = free_port(), free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = tmp_path_factory.mktemp("dask-logs")
    env = {**CREDENTIALS, "PREFECT_API_URL": prefect_server}
    with server(
        "dask-scheduler",
        [
            str(BIN / "dask"),
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dashboard-address",
            f"127.0.0.1:{dashboard}",
        ],
        address,
        logs,
        env,
    ):
        workers = [
            str(BIN / "dask"),
            "worker",
            address,
            "--nworkers",
            "2",
            "--nthreads",
            "1",
            "--host",
            "127.0.0.1",
            "--no-dashboard",
        ]
        with server("dask-workers", workers, address, logs, env):
            from distributed import Client

            with Client(address, timeout=30) as client:
                client.wait_for_workers(2, timeout=60)
            yield address
