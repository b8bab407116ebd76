"""Prefect flows, the CLI and the run spec: the thin layer over storage/ and sae/."""

import os

# No usage telemetry from the embedded Prefect server, whatever the entry point (CLI or Python API):
# research clusters are often offline, and a tool must not phone home by default. Set
# PREFECT_SERVER_ANALYTICS_ENABLED=true to send it.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# Every call to a tracking server has a bound: MLflow's defaults (120 s per request, 7 retries with
# backoff) keep a run hanging for many minutes on a server that is down. Prefect's task retries add
# a few attempts on transient errors (flows/retry.py). Either can be set higher in the environment.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")

# saeflow's loggers also speak outside flow runs (waiting for a lock, marking a dead run Crashed):
# those records go to the console only, without Prefect warning that it cannot send them to the API.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
