"""Inter-process locks on the work dir: two runs of one spec never both do the work.

A lock is an advisory `flock` on a small file that names its holder. The second run waits for the
first (saying whom it waits for), then finds the first's outputs and reports them as Cached. flock is
per host on most network file systems: runs on several machines should share a Prefect server and
let it schedule them (see docs/cluster.md).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


@contextmanager
def exclusive(path: Path, what: str):
    """Holds an exclusive lock on `path` for the duration of the block, waiting if another holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            log.warning("%s is in use by %s: waiting for it to finish (lock %s)", what, holder, path)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)
