"""Failure injection for the re-run tests: the named pipeline stage raises as it starts to work (a
stage whose outputs exist still ends Cached, as in flows.pipeline._stage). In a test's own process
`failing(monkeypatch, stage)`; in the processes a test starts (a Prefect worker's flow runs), set
$SAEFLOW_FAIL_STAGE and put tests/inject on PYTHONPATH (its sitecustomize calls `install`)."""

from __future__ import annotations

VARIABLE = "SAEFLOW_FAIL_STAGE"


class InjectedFailure(RuntimeError):
    """Raised by the stage a test made fail."""


def raiser(stage: str):
    def fail(*args, **kwargs):
        raise InjectedFailure(f"{VARIABLE}={stage}: failure injected at the start of the {stage} stage")

    return fail


def failing(monkeypatch, stage: str) -> None:
    from flows import stages

    monkeypatch.setattr(stages, stage, raiser(stage))


def install(stage: str) -> None:
    from flows import stages

    setattr(stages, stage, raiser(stage))
