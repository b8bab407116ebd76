"""What `TopKSAE.from_pretrained(ref)` resolves beyond a saeflow directory (registered with the
`saeflow.sae_sources` entry point, so that `sae` never imports this package):

- `models:/NAME@ALIAS`, `models:/NAME/VERSION`: pulled from the MLflow registry (`tracking_uri`, else
  $MLFLOW_TRACKING_URI, else ./.saeflow/mlflow.db), the weights checked against the sha256 recorded at
  registration;
- `runs:/RUN_ID/PATH`: an MLflow run's artifact folder holding an SAE;
- a local directory in saeflow's, SAELens' or sparsify's format.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from sae.files import WEIGHTS_FILE
from sae.model import TopKSAE
from storage import formats


def resolve(ref: str, tracking_uri: str | None = None) -> TopKSAE | None:
    """The SAE `ref` names, or None when `ref` is not something this source knows. A registry
    reference uses `tracking_uri`, else storage.registry.find_tracking_uri's (never a database
    created by the lookup)."""
    if ref.startswith(("models:/", "runs:/")):
        from storage.registry import connect, find_tracking_uri

        uri, _ = find_tracking_uri(tracking_uri)
        connect(uri)
    if ref.startswith("models:/"):
        from storage.registry import pull

        with tempfile.TemporaryDirectory() as tmp:
            return formats.read(pull(ref, Path(tmp) / "sae"))
    if ref.startswith("runs:/"):
        import mlflow

        with tempfile.TemporaryDirectory() as tmp:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=tmp))
            found = [local] if _is_sae_dir(local) else [p.parent for p in sorted(local.rglob(WEIGHTS_FILE))]
            if not found:
                raise formats.FormatError(f"{ref}: the run's artifacts there hold no SAE ({WEIGHTS_FILE})")
            return formats.read(found[0])
    if Path(ref).is_dir():
        return formats.read(ref)
    return None


def _is_sae_dir(path: Path) -> bool:
    try:
        formats.detect(path)
        return True
    except formats.FormatError:
        return False
