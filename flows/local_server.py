"""The temporary Prefect server of a CLI run that names none (no PREFECT_API_URL).

Prefect would start one itself, but in the process group of the run and with ~/.prefect as its
home. Ctrl-C in the terminal then killed it first, and the run spent minutes retrying a dead API
before it ended with "[Errno 111] Connection refused". Two runs on one host also shared one
database, and the second server's set-up raced the first's. This one is started the way Prefect
starts its own, but in a session of its own, with a home of its own. It is stopped last, at exit,
and its home is removed then.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def start(timeout: float = 120.0) -> str:
    """Starts the server and points this process's Prefect client at it; returns its API URL."""
    # the user's profiles stay where they are (a server named there is used, as before)
    os.environ.setdefault("PREFECT_PROFILES_PATH", str(Path.home() / ".prefect" / "profiles.toml"))
    home = tempfile.mkdtemp(prefix="saeflow-prefect-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PREFECT_HOME": home,
        # as Prefect's own temporary server: no UI, no background services
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    args = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app"]
    args += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]
    server = subprocess.Popen(args, env=env, start_new_session=True)
    atexit.register(_stop, server, home)  # registered first: runs after Prefect's own exit handlers
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the temporary Prefect server exited at start (code {server.returncode})")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    else:
        raise RuntimeError(f"the temporary Prefect server did not answer at {url} within {timeout:.0f} s")
    os.environ["PREFECT_HOME"] = home
    os.environ["PREFECT_API_URL"] = url
    os.environ.setdefault("PREFECT_UI_URL", "")  # it serves no UI: no "View at" links to it
    return url


def _stop(server: subprocess.Popen, home: str) -> None:
    server.terminate()
    try:
        server.wait(timeout=5)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    shutil.rmtree(home, ignore_errors=True)
