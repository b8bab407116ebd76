"""Ctrl-C during a CLI run. While training or caching runs, the first one asks that work to stop at
its next step (training saves a checkpoint there, caching drops the shard it was computing), which
ends the flow; at any other moment, and the second time, it interrupts at once (Prefect then aborts
the running task, whose outputs are written atomically or not at all). The temporary Prefect server
lives in a session of its own (flows/local_server.py), so the terminal's SIGINT to the process group
does not take it down before the run has reported."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

STOP = threading.Event()  # read by the train and cache stages between steps
_stoppable = 0  # sections running that read STOP
_lock = threading.Lock()


def requested() -> bool:
    return STOP.is_set()


@contextlib.contextmanager
def stoppable() -> Iterator[None]:
    """Marks work that reads STOP between its steps (and stops cleanly when it is set)."""
    global _stoppable
    with _lock:
        _stoppable += 1
    try:
        yield
    finally:
        with _lock:
            _stoppable -= 1


@contextlib.contextmanager
def stop_on_sigint() -> Iterator[None]:
    """While inside, SIGINT is handled as the module says. (Interrupting the main thread while a
    stoppable section runs would not do: Prefect then aborts the task threads wherever they are,
    before their checkpoint.)"""

    def first(signum, frame):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if not _stoppable:
            raise KeyboardInterrupt
        STOP.set()
        print("saeflow: stopping at the next step (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    STOP.clear()
    previous = signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
