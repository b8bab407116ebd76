"""Ctrl-C during a CLI run: the first one asks the work to stop at its next step (training saves a
checkpoint there, caching drops the shard it was computing), which ends the flow; a second one stops
at once. The temporary Prefect server lives in a session of its own (flows/local_server.py), so the
terminal's SIGINT to the process group does not take it down before the run has reported."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

STOP = threading.Event()  # read by the train and cache stages between steps


def requested() -> bool:
    return STOP.is_set()


@contextlib.contextmanager
def stop_on_sigint() -> Iterator[None]:
    """While inside: the first SIGINT sets STOP (the work raises once it has stopped cleanly), a
    second one is Python's own KeyboardInterrupt. (Interrupting the main thread at once would not
    do: Prefect then aborts the task threads wherever they are, before a checkpoint.)"""

    def first(signum, frame):
        STOP.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
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
