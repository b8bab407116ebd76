"""Which failures are worth retrying: only transient ones (network, server 5xx, preemption).

A bad value, a corrupted store, a non-finite loss or an out-of-memory error fails the same way every
time: retrying it only repeats the work and the traceback.
"""

from __future__ import annotations

import errno

TRANSIENT_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ENETDOWN,
    errno.EPIPE,
}
# MLflow's error codes for a server that was unavailable or overloaded, not for a bad request; its
# INTERNAL_ERROR is also the default code of any MlflowException, so it counts only from a server
TRANSIENT_MLFLOW_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}


class Unreachable(ConnectionError):
    """A server the spec names does not answer: said with the field that named it, before any work."""


def is_transient(exc: BaseException | None) -> bool:
    """Whether `exc` (or an exception it was raised from) is a transient failure."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if _transient_here(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _transient_here(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or "OutOfMemoryError" in type(exc).__name__:
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True
    status = getattr(getattr(exc, "response", None), "status_code", None)  # requests / httpx errors
    if isinstance(status, int) and (status >= 500 or status == 429):
        return True
    name = type(exc).__name__
    if name in {
        "ConnectTimeout",
        "ReadTimeout",
        "ConnectError",
        "RemoteProtocolError",
        "ProtocolError",
        "ChunkedEncodingError",
        "ReadError",
        "WriteError",
        "PoolTimeout",
    }:
        return True
    code = getattr(exc, "error_code", None)
    return code in TRANSIENT_MLFLOW_CODES or (name == "RestException" and code == "INTERNAL_ERROR")


def retry_transient(_task, _task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry a failed task run only when its exception is transient."""
    try:
        state.result()
    except BaseException as exc:  # the task's own exception, re-raised by result()
        return is_transient(exc)
    return False
