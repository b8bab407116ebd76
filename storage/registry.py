"""MLflow registry: log a trained SAE as a pyfunc model (safetensors + JSON), register, alias, pull."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import sae as sae_package
from sae.model import CONFIG_FILE, WEIGHTS_FILE

log = logging.getLogger(__name__)

PYFUNC_CODE = Path(__file__).with_name("sae_pyfunc.py")
ARTIFACT_KEY = "sae"


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    alias: str
    run_id: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"


def _mlflow(tracking_uri: str):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    return mlflow


def _experiment_id(mlflow, name: str, artifact_root: Path | None) -> str:
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = artifact_root.resolve().as_uri() if artifact_root is not None else None
    return mlflow.create_experiment(name, artifact_location=location)


def register_sae(
    sae_dir: str | Path,
    *,
    tracking_uri: str,
    experiment: str,
    model_name: str,
    alias: str,
    params: dict,
    metrics: dict[str, float],
    tags: dict[str, str],
    artifact_root: Path | None = None,
    run_files: list[Path] = (),
) -> Registered:
    """Logs params/metrics, logs the SAE as a models-from-code pyfunc, registers it, sets the alias.

    Metrics are also set as tags on the model version so the registry alone can rank versions.
    artifact_root: where a local (SQLite) tracking store keeps artifacts; None for a server's default.
    run_files: logged as artifacts of the run (report, histogram, training history).
    """
    import tempfile

    import numpy as np
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    from sae.model import TopKSAE

    mlflow = _mlflow(tracking_uri)
    sae = TopKSAE.load(sae_dir)
    example = np.zeros((2, sae.cfg.d_in), dtype=np.float32)
    signature = infer_signature(example, np.zeros((2, sae.cfg.n_latents), dtype=np.float32))
    with mlflow.start_run(experiment_id=_experiment_id(mlflow, experiment, artifact_root), run_name=model_name) as run:
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        mlflow.set_tags(tags)
        for path in run_files:
            mlflow.log_artifact(str(path))
        with tempfile.TemporaryDirectory() as weights_only:
            for name in (WEIGHTS_FILE, CONFIG_FILE):
                shutil.copyfile(Path(sae_dir) / name, Path(weights_only) / name)
            info = mlflow.pyfunc.log_model(
                name="sae",
                python_model=str(PYFUNC_CODE),
                artifacts={ARTIFACT_KEY: weights_only},
                code_paths=[str(Path(sae_package.__file__).parent)],
                signature=signature,
                pip_requirements=["torch", "safetensors", "numpy"],
            )
    version = mlflow.register_model(info.model_uri, model_name, tags=tags)
    client = MlflowClient()
    for key, value in metrics.items():
        client.set_model_version_tag(model_name, version.version, f"metric.{key}", f"{value:.6g}")
    client.set_registered_model_alias(model_name, alias, version.version)
    registered = Registered(model_name, str(version.version), alias, run.info.run_id)
    log.info("registered %s (version %s) in %s", registered.uri, registered.version, tracking_uri)
    return registered


def find_registered(tracking_uri: str, model_name: str, alias: str, spec_hash: str) -> Registered | None:
    """The version under `alias` if it was registered from this spec hash (tag `spec_hash`), else None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    _mlflow(tracking_uri)
    try:
        mv = MlflowClient().get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None
    if mv.tags.get("spec_hash") != spec_hash:
        return None
    return Registered(model_name, str(mv.version), alias, mv.run_id)


def model_version(model_uri: str):
    """The MLflow ModelVersion behind models:/NAME@ALIAS or models:/NAME/VERSION."""
    from mlflow import MlflowClient

    ref = model_uri.removeprefix("models:/")
    client = MlflowClient()
    if "@" in ref:
        return client.get_model_version_by_alias(*ref.split("@", 1))
    return client.get_model_version(*ref.split("/", 1))


def log_run_files(run_id: str, paths: list[Path]) -> None:
    """Adds files (e.g. a rebuilt report) to the MLflow run a registered version came from."""
    from mlflow import MlflowClient

    client = MlflowClient()
    for path in paths:
        client.log_artifact(run_id, str(path))


def pull(model_uri: str, out_dir: str | Path, tracking_uri: str | None = None) -> Path:
    """Writes the SAE's safetensors + config.json of a registered model into out_dir."""
    import tempfile

    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        src = local / "artifacts" / ARTIFACT_KEY
        if not (src / WEIGHTS_FILE).exists():
            found = list(local.rglob(WEIGHTS_FILE))
            if not found:
                raise FileNotFoundError(f"{model_uri} holds no {WEIGHTS_FILE}: is it a saeflow SAE?")
            src = found[0].parent
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            shutil.copyfile(src / name, out / name)
    log.info("pulled %s into %s", model_uri, out)
    return out
