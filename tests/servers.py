"""Real servers for the tests: each a subprocess on a free port of 127.0.0.1, waited for on its health
endpoint, stopped by the process id it started with (its own process group: nothing broader)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's console scripts (prefect, mlflow, dask)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    if url.startswith("tcp://"):
        host, port = url.removeprefix("tcp://").rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                return True
        except OSError:
            return False
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status < 500
    except OSError:
        return False


@contextmanager
def server(name: str, args: list[str], health: str, log_dir: Path, env: dict | None = None, timeout: float = 90):
    """Runs `args` until the block ends; yields once `health` answers (an http URL or tcp://HOST:PORT)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_dir / f"{name}.log", "wb")
    proc = subprocess.Popen(
        args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
    )
    try:
        deadline = time.monotonic() + timeout
        while not _answers(health):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                tail = (log_dir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} did not come up at {health} (exit {proc.poll()}):\n{tail}")
            time.sleep(0.3)
        yield proc
    finally:
        stop(proc)
        log.close()


def stop(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM to the group this process leads (the server and the children it spawned), then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    else:  # the leader is gone; its children may not be
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
