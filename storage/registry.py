"""MLflow registry: log a trained SAE as a pyfunc model (safetensors + JSON), register, alias, pull."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import sae as sae_package
from sae.config import modules_of
from sae.files import CONFIG_FILE, WEIGHTS_FILE
from storage.outputs import staged

log = logging.getLogger(__name__)

PYFUNC_CODE = Path(__file__).with_name("sae_pyfunc.py")
ARTIFACT_KEY = "sae"
CARD_FILE = "MODEL_CARD.md"
WEIGHTS_TAG = "weights_sha256"
COMPLETE_TAG = "saeflow.complete"  # set last: a version without it is an interrupted registration
SAFE_TAG_VALUE = re.compile(r"[A-Za-z0-9._-]+")  # quotable in a registry search filter as is


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    alias: str | None  # None: registered, but the alias now points at another version
    run_id: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


def _mlflow(tracking_uri: str):
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    # MLflow also exports the URI to the environment: undo that, so that the user's own
    # $MLFLOW_TRACKING_URI (or its absence) still decides for the next spec run in this process
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    return mlflow


def connect(tracking_uri: str):
    """Points this process's MLflow client at tracking_uri (leaving $MLFLOW_TRACKING_URI as it was)."""
    return _mlflow(tracking_uri)


EMBEDDED_REGISTRY = Path(".saeflow") / "mlflow.db"  # the default work dir's, where a command runs


class NoRegistry(LookupError):
    """No tracking URI was given or found, or the one given names a database file that is not there."""


def find_tracking_uri(given: str | None = None) -> tuple[str, str]:
    """The tracking URI a lookup uses, and where it came from: the one given, $MLFLOW_TRACKING_URI, the
    one this process is connected to (mlflow.set_tracking_uri, or an earlier registry call), or the
    embedded registry of the default work dir (./.saeflow/mlflow.db) where that exists. A SQLite URI
    must name an existing file: MLflow would create an empty database as a side effect of the lookup,
    and a typo would end in "not registered"."""
    connected = _connected_tracking_uri()
    if given:
        uri, source = given, "given"
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        uri, source = os.environ["MLFLOW_TRACKING_URI"], "$MLFLOW_TRACKING_URI"
    elif connected:
        uri, source = connected, "mlflow.set_tracking_uri in this process"
    elif EMBEDDED_REGISTRY.is_file():
        uri, source = f"sqlite:///{EMBEDDED_REGISTRY.resolve()}", f"the embedded registry {EMBEDDED_REGISTRY}"
    else:
        raise NoRegistry(
            "no MLflow tracking URI: pass one (tracking_uri=..., --tracking-uri), set MLFLOW_TRACKING_URI, "
            f"or run where the work dir's {EMBEDDED_REGISTRY} is (the embedded registry)"
        )
    if uri.startswith("sqlite:///") and not os.path.isfile(uri.removeprefix("sqlite:///")):
        raise NoRegistry(
            f"tracking URI {uri}: no such MLflow database file; check the path "
            "(the embedded one is sqlite:///<workdir>/mlflow.db)"
        )
    return uri, source


def _connected_tracking_uri() -> str | None:
    """The URI set in this process (MLflow not imported: none; MLflow's own default is not one)."""
    mlflow = sys.modules.get("mlflow")
    return mlflow.get_tracking_uri() if mlflow is not None and mlflow.is_tracking_uri_set() else None


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
    run_files: Sequence[Path] = (),
) -> Registered:
    """Logs params/metrics, logs the SAE as a models-from-code pyfunc, registers it, sets the alias.

    Metrics are the run's (version_metrics reads them back); the version's tags say what it is and
    where it came from; its description is a short summary with the command that pulls it.
    artifact_root: where a local (SQLite) tracking store keeps artifacts; None for a server's default.
    run_files: logged as artifacts of the run (report, histogram, training history).
    """
    import tempfile

    import numpy as np
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    from sae.model import TopKSAE

    sae = TopKSAE.load(sae_dir)
    # nothing non-finite is registered, nor moves an alias away from a good version
    bad = [name for name, t in sae.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
    bad += [name for name, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"refusing to register {sae_dir}: non-finite {', '.join(bad)}")
    mlflow = _mlflow(tracking_uri)
    example = np.zeros((2, sae.cfg.width()), dtype=np.float32)
    # params: predict(..., params={"output": "reconstruction"}) returns reconstructions instead of codes
    signature = infer_signature(example, np.zeros((2, sae.cfg.n_latents), dtype=np.float32), params={"output": "codes"})
    with mlflow.start_run(
        experiment_id=_experiment_id(mlflow, experiment, artifact_root),
        run_name=model_name,
        description=run_description(model_name, tags, run_files),
    ) as run:
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)  # on the run: sortable and plotted across versions in the UI
        mlflow.set_tags(tags)
        log_run_files(run.info.run_id, run_files)
        with tempfile.TemporaryDirectory() as weights_only:
            for name in (WEIGHTS_FILE, CONFIG_FILE):
                shutil.copyfile(Path(sae_dir) / name, Path(weights_only) / name)
            # the model card travels with the weights (saeflow pull copies it too)
            (Path(weights_only) / CARD_FILE).write_text(model_card(model_name, alias, sae, params, metrics, tags))
            info = mlflow.pyfunc.log_model(
                name="sae",
                python_model=str(PYFUNC_CODE),
                artifacts={ARTIFACT_KEY: weights_only},
                code_paths=[str(Path(sae_package.__file__).parent)],
                signature=signature,
                input_example=example,
                pip_requirements=["torch", "safetensors", "numpy"],
            )
    tags = {**tags, WEIGHTS_TAG: file_sha256(Path(sae_dir) / WEIGHTS_FILE)}
    client = MlflowClient()
    _replace_interrupted(client, model_name, tags.get("spec_hash"))
    with contextlib.redirect_stderr(io.StringIO()):  # its "Successfully registered" prints: logged below
        version = mlflow.register_model(info.model_uri, model_name, tags=tags)
    try:
        client.update_model_version(
            model_name,
            version.version,
            description=version_description(
                model_name, version.version, alias, metrics, any(Path(p).name == "browser" for p in run_files)
            ),
        )
        client.set_registered_model_alias(model_name, alias, version.version)
        client.set_model_version_tag(model_name, version.version, COMPLETE_TAG, "true")  # last
    except BaseException:
        # a version without its tags and alias would be an orphan that a retry duplicates: remove it
        _delete_quietly(client, model_name, version.version)
        raise
    registered = Registered(model_name, str(version.version), alias, run.info.run_id)
    log.info("registered %s (version %s) in %s", registered.uri, registered.version, tracking_uri)
    return registered


def version_description(model_name: str, version: str, alias: str, metrics: dict[str, float], browser: bool) -> str:
    """The version's description in the registry UI: key metrics, how to pull it, where its pages are."""
    shown = [(k, metrics[k]) for k in DESCRIBED_METRICS if k in metrics]
    return "\n".join(
        [
            f"**{model_name} version {version}** (registered as `@{alias}`)",
            "",
            " · ".join(f"{k} **{v:.4g}**" for k, v in shown),
            "",
            f"Pull: `saeflow pull models:/{model_name}/{version} --out ./sae` or "
            f'`TopKSAE.from_pretrained("models:/{model_name}/{version}")`.',
            "Feature browser (`browser/index.html`), histogram and training history: the source run's artifacts."
            if browser
            else "No feature browser was built (eval.browser is off): `saeflow report` writes one.",
        ]
    )


def dictionary_tags(cfg: dict, hookpoint: str) -> dict[str, str]:
    """A transcoder's version tags: what kind, what it reads and what it predicts (none for an SAE)."""
    if not cfg.get("transcoder"):
        return {}
    kind = "skip-transcoder" if cfg.get("skip_connection") else "transcoder"
    if cfg.get("cross_layer"):
        first, *_, last = modules_of(hookpoint)
        reads = f"inputs of {first} .. {last} -> outputs of each and every later one"
        return {"dictionary": f"cross-layer {kind}", "transcodes": reads}
    return {"dictionary": kind, "transcodes": f"input of {hookpoint} -> output of {hookpoint}"}


def run_description(model_name: str, tags: dict[str, str], run_files: Sequence[Path]) -> str:
    """The run's description: what was trained, and where its feature browser is."""
    browser = next((Path(p) for p in run_files if Path(p).name == "browser"), None)
    where = (
        f"Feature browser: artifact `browser/index.html` (built at `{browser / 'index.html'}`)."
        if browser
        else "No feature browser (eval.browser is off); `saeflow report` writes one."
    )
    kind = tags.get("dictionary", "SAE")
    return f"{kind} `{model_name}` on `{tags.get('hookpoint')}` of `{tags.get('lm')}`. {where}"


DESCRIBED_METRICS = ("normalized_mse", "l0", "dead_fraction", "ce_increase", "loss_recovered_vs_zero")


def version_metrics(version) -> dict[str, float]:
    """A version's metrics: its run's (versions registered before saeflow kept them there carry them
    as `metric.*` tags)."""
    from mlflow import MlflowClient

    tagged = {k.removeprefix("metric."): float(v) for k, v in version.tags.items() if k.startswith("metric.")}
    if not version.run_id:
        return tagged
    return {**tagged, **MlflowClient().get_run(version.run_id).data.metrics}


def model_card(model_name: str, alias: str, sae, params: dict, metrics: dict[str, float], tags: dict[str, str]) -> str:
    """A markdown card: what the SAE is, how it was trained, its metrics, how to load it (by the alias it
    is registered under: the version number comes after the files are logged)."""
    cfg = sae.cfg
    shown = {k: v for k, v in metrics.items() if k in CARD_METRICS}
    hookpoint = tags.get("hookpoint")
    form = {"topk": "TopK", "batchtopk": "BatchTopK", "jumprelu": "JumpReLU"}[cfg.activation]
    origin = f"imported from {tags['imported_from']}" if tags.get("imported_from") else "trained with saeflow"
    if cfg.cross_layer:
        layers = "`, `".join(modules_of(str(hookpoint)))
        what = (
            f"A {form} cross-layer transcoder (Ameisen et al. 2025) over `{layers}` of `{tags.get('lm')}`: the "
            f"latents of each layer ({cfg.n_latents // cfg.layers()}, keeping {cfg.k // cfg.layers()} per token) read "
            "its MLP's input and predict its output and every later one's"
            + (", with an affine skip per layer" if cfg.skip_connection else "")
            + f"; {origin}. Its metrics are the predicted outputs', also per layer. Its input and "
            "prediction are the layers' activations side by side."
        )
    elif cfg.transcoder:
        kind = "skip-transcoder (Paulo et al. 2025)" if cfg.skip_connection else "transcoder (Dunefsky et al. 2024)"
        what = (
            f"A {form} {kind}: it reads the input of `{hookpoint}` of `{tags.get('lm')}` and predicts its output"
            + (" (its latents plus an affine skip W_skip x)" if cfg.skip_connection else "")
            + f"; {origin}. Its metrics are the predicted output's."
        )
    else:
        cite = " (Gao et al. 2024)" if cfg.activation == "topk" else ""
        what = f"A {form} sparse autoencoder{cite} on `{hookpoint}` of `{tags.get('lm')}`, {origin}."
    keeps = "each latent above its own threshold" if cfg.activation == "jumprelu" else f"k = {cfg.k}"
    lines = [
        f"# {model_name}",
        "",
        what,
        "",
        f"- latents: {cfg.n_latents} over d_in = {cfg.d_in}, {keeps} ({cfg.activation}), input normalisation "
        f"`{cfg.normalization}`, encoder bias: {cfg.encoder_bias}",
        *(
            [
                f"- Matryoshka (Bussmann et al. 2025): latent groups of {', '.join(map(str, cfg.matryoshka))}; "
                f"each prefix (the first {', '.join(map(str, cfg.prefix_ends()[:-1]))} latents) reconstructs alone"
            ]
            if cfg.matryoshka
            else []
        ),
        *(
            [
                f"- data: `{params.get('data')}`, {params.get('train_tokens')} training tokens in contexts of "
                f"{params.get('context_length')}, batches of {params.get('batch_tokens')}",
                f"- recipe: {params.get('recipe')}, optimizer {params.get('optimizer')}, lr {params.get('lr')} "
                f"({params.get('lr_schedule')}), dead after {params.get('dead_tokens')} tokens, AuxK over "
                f"{params.get('aux_k')}; spec hash `{tags.get('spec_hash')}`",
            ]
            if "optimizer" in params
            else [f"- imported ({params.get('imported_from')} format) from `{params.get('source')}`"]
        ),
        "",
        "## Held-out metrics",
        "",
        "| metric | value |",
        "| --- | --- |",
        *[f"| {k} | {v:.4g} |" for k, v in shown.items()],
        "",
        "## Load it",
        "",
        "```python",
        "from sae import TopKSAE",
        f'sae = TopKSAE.from_pretrained("models:/{model_name}@{alias}")   # or /VERSION, or a pulled directory',
        *(
            ["codes = sae.encode(x)          # the MLP's raw input in; sae.predict(x) is its output"]
            if cfg.transcoder
            else ["codes = sae.encode(x)          # raw activations in; sae(x) reconstructs"]
        ),
        "```",
        "",
        f"`saeflow pull models:/{model_name}@{alias} --out DIR` writes `sae.safetensors` and `config.json` "
        "(no pickle).",
    ]
    return "\n".join(lines) + "\n"


CARD_METRICS = (
    "normalized_mse",
    "fraction_variance_explained",
    "l0",
    "dead_fraction",
    "ce_increase",
    "kl_divergence",
    "loss_recovered_vs_zero",
    "loss_recovered_vs_mean",
    "ablation_sparsity",
    "eval_tokens",
)


def promote(tracking_uri: str, model_name: str, ref: str, alias: str, reason: str | None = None) -> Registered:
    """Points `alias` at the version `ref` names (a number, or @ALIAS); `reason` is added to that
    version's description. Only complete registrations can be promoted."""
    from mlflow import MlflowClient

    _mlflow(tracking_uri)
    version = model_version(f"models:/{model_name}{ref if ref.startswith('@') else '/' + ref}")
    if not is_complete(version):
        raise ValueError(
            f"version {version.version} of {model_name} is an interrupted registration: not promoted "
            "(run the registration again: it replaces that version)"
        )
    client = MlflowClient()
    client.set_registered_model_alias(model_name, alias, version.version)
    if reason:
        describe(model_name, version.version, reason)
    log.info("models:/%s@%s -> version %s", model_name, alias, version.version)
    return Registered(model_name, str(version.version), alias, str(version.run_id))


PROMOTION_TAG = "saeflow.promote_if"  # the alias registry.promote_if has decided on for this version


def decided(model_name: str, version: str, alias: str) -> None:
    """Records that registry.promote_if made its decision on a version (after acting on it)."""
    from mlflow import MlflowClient

    MlflowClient().set_model_version_tag(model_name, version, PROMOTION_TAG, alias)


def describe(model_name: str, version: str, line: str) -> None:
    """Adds a line to a version's description (the registry's record of promotion decisions)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    old = client.get_model_version(model_name, version).description or ""
    client.update_model_version(model_name, version, description=(old + "\n" + line).strip())


def list_models(tracking_uri: str, name: str | None = None) -> list[dict]:
    """Registered models (or the one named) with their versions, aliases and main metrics."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    _mlflow(tracking_uri)
    client = MlflowClient()
    if name is not None:
        try:
            models = [client.get_registered_model(name)]
        except MlflowException as e:
            if _absent(e):
                raise NotRegistered(f"no registered model named {name!r} in {tracking_uri}") from None
            raise
    else:
        models = client.search_registered_models()
    out = []
    for m in sorted(models, key=lambda m: m.name):
        versions = list_versions(tracking_uri, m.name)
        for row in versions:
            version = client.get_model_version(m.name, str(row["version"]))
            row["metrics"] = {k: v for k, v in version_metrics(version).items() if k in CARD_METRICS}
            row.update({k: version.tags.get(k) for k in ("lm", "hookpoint", "n_latents", "k")})
        out.append(
            {"name": m.name, "aliases": dict(sorted((a, int(v)) for a, v in m.aliases.items())), "versions": versions}
        )
    return out


def list_versions(tracking_uri: str, model_name: str) -> list[dict]:
    """Every version of a registered model: number, aliases, spec hash, run id (newest first)."""
    from mlflow import MlflowClient

    _mlflow(tracking_uri)
    if not SAFE_TAG_VALUE.fullmatch(model_name):
        return []
    client = MlflowClient()
    versions = client.search_model_versions(f"name = '{model_name}'")
    if not versions:
        return []
    aliases = client.get_registered_model(model_name).aliases  # {alias: version}; a search leaves them out
    return [
        {
            "version": int(v.version),
            "aliases": sorted(a for a, n in aliases.items() if str(n) == str(v.version)),
            "spec_hash": v.tags.get("spec_hash"),
            "run_id": v.run_id,
            "complete": is_complete(v),
        }
        for v in sorted(versions, key=lambda v: -int(v.version))
    ]


def is_complete(version) -> bool:
    """Whether a version's registration finished (its last step sets COMPLETE_TAG)."""
    return version.tags.get(COMPLETE_TAG) == "true"


def _same(version, spec_hash: str, weights_sha256: str | None) -> bool:
    sha = version.tags.get(WEIGHTS_TAG)
    return version.tags.get("spec_hash") == spec_hash and (weights_sha256 is None or sha in (None, weights_sha256))


def _replace_interrupted(client, model_name: str, spec_hash: str | None) -> None:
    """Deletes the versions of `model_name` from this spec whose registration was killed before it
    finished (no COMPLETE_TAG): registering again replaces them rather than adding a duplicate."""
    if spec_hash is None or not SAFE_TAG_VALUE.fullmatch(spec_hash) or not SAFE_TAG_VALUE.fullmatch(model_name):
        return
    for v in client.search_model_versions(f"name = '{model_name}' and tags.spec_hash = '{spec_hash}'"):
        if not is_complete(v):
            log.warning("version %s of %s is an interrupted registration: replacing it", v.version, model_name)
            client.delete_model_version(model_name, v.version)


def _delete_quietly(client, model_name: str, version: str) -> None:
    try:
        client.delete_model_version(model_name, version)
    except Exception as e:  # the original failure matters more; say what is left behind
        log.warning("could not remove the incomplete version %s of %s: %s", version, model_name, e)


def find_registered(
    tracking_uri: str, model_name: str, alias: str, spec_hash: str, weights_sha256: str | None = None
) -> Registered | None:
    """A complete version registered from this spec hash (tag `spec_hash`) and, when given, these
    weights (tag `weights_sha256`): the one under `alias` if it is one, else the newest. None when
    there is none; only the registry's "no such model or alias" counts as absent, a connection error
    is raised as one."""
    from mlflow import MlflowClient

    _mlflow(tracking_uri)
    try:
        mv = model_version(f"models:/{model_name}@{alias}")
        if _same(mv, spec_hash, weights_sha256) and is_complete(mv) and _run_alive(mv.run_id):
            return Registered(model_name, str(mv.version), alias, str(mv.run_id))
    except NotRegistered:
        pass
    if not SAFE_TAG_VALUE.fullmatch(spec_hash) or not SAFE_TAG_VALUE.fullmatch(model_name):
        return None
    found = [
        v
        for v in MlflowClient().search_model_versions(f"name = '{model_name}' and tags.spec_hash = '{spec_hash}'")
        if is_complete(v) and _same(v, spec_hash, weights_sha256) and _run_alive(v.run_id)
    ]
    if not found:
        return None
    newest = max(found, key=lambda v: int(v.version))
    log.info(
        "version %s of %s is registered from this spec; alias %r points elsewhere and is left there",
        newest.version,
        model_name,
        alias,
    )
    return Registered(model_name, str(newest.version), None, str(newest.run_id))


def _run_alive(run_id: str | None) -> bool:
    """A version whose run was deleted lost its metrics, parameters and report: not a finished registration."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not run_id:
        return False
    try:
        return MlflowClient().get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException as e:
        if _absent(e):
            return False
        raise


def model_version(model_uri: str):
    """The MLflow ModelVersion behind models:/NAME@ALIAS or models:/NAME/VERSION (NotRegistered if
    the registry has none; a registry that cannot be reached raises its own error)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    ref = model_uri.removeprefix("models:/")
    client = MlflowClient()
    try:
        if "@" in ref:
            return client.get_model_version_by_alias(*ref.split("@", 1))
        return client.get_model_version(*ref.split("/", 1))
    except MlflowException as e:
        if _absent(e):
            raise NotRegistered(
                f"{model_uri} is not registered at {mlflow_tracking_uri()}: check the name and "
                "alias (or version) in the MLflow UI"
            ) from None
        raise


def _absent(e) -> bool:
    """MLflow's answer for a model or version that does not exist (a missing alias comes back as an
    invalid parameter "... not found"); never a server it could not reach."""
    return e.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or (
        e.error_code == "INVALID_PARAMETER_VALUE" and "not found" in str(e)
    )


def mlflow_tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def log_run_files(run_id: str, paths: Sequence[Path]) -> None:
    """Adds files and folders (e.g. a rebuilt feature browser) to an MLflow run; a folder keeps its
    name and layout."""
    from mlflow import MlflowClient

    client = MlflowClient()
    for path in paths:
        if Path(path).is_dir():
            client.log_artifacts(run_id, str(path), artifact_path=Path(path).name)
        else:
            client.log_artifact(run_id, str(path))


SWEEP_TAG = "saeflow.sweep"  # on a sweep's parent run: the sweep's key
POINT_TAG = "saeflow.sweep_point"  # on the run of an SAE the sweep did not register: "<key>/<name>"


def log_sweep(
    tracking_uri: str,
    experiment: str,
    name: str,
    key: str,
    files: list[Path],
    metrics: dict[str, float],
    children: list[str],
    unregistered: dict[str, tuple[dict, dict[str, float]]],
    artifact_root: Path | None = None,
) -> str:
    """The sweep's parent run (found again by `key`, so a rerun updates it): the report's files as
    artifacts and the fit as metrics; the registered SAEs' runs (`children`) become its child runs,
    and every SAE the sweep did not register gets a child run of its own with its params and metrics
    (`unregistered`: model name -> (params, metrics)). Returns the parent's run id."""
    from mlflow import MlflowClient

    mlflow = _mlflow(tracking_uri)
    client = MlflowClient()
    experiment_id = _experiment_id(mlflow, experiment, artifact_root)

    def run_tagged(tag: str, value: str, run_name: str, extra: dict[str, str]) -> str:
        found = client.search_runs([experiment_id], filter_string=f"tags.`{tag}` = '{value}'", max_results=1)
        if found:
            return found[0].info.run_id
        return client.create_run(experiment_id, run_name=run_name, tags={tag: value, **extra}).info.run_id

    parent = run_tagged(SWEEP_TAG, key, f"sweep-{name}", {})
    log_run_files(parent, files)
    for metric, value in metrics.items():
        client.log_metric(parent, metric, value)
    client.set_terminated(parent)
    for child in children:
        client.set_tag(child, "mlflow.parentRunId", parent)
    for model_name, (params, point_metrics) in unregistered.items():
        child = run_tagged(POINT_TAG, f"{key}/{model_name}", model_name, {"mlflow.parentRunId": parent})
        for param, value in params.items():
            client.log_param(child, param, value)
        for metric, value in point_metrics.items():
            client.log_metric(child, metric, value)
        client.set_terminated(child)
    log.info(
        "sweep %s logged to MLflow run %s (%d SAEs under it) in %s",
        name,
        parent,
        len(children) + len(unregistered),
        tracking_uri,
    )
    return parent


class NotRegistered(LookupError):
    """The registry answered, and has no such model version or alias."""


def pull(model_uri: str, out_dir: str | Path, tracking_uri: str | None = None) -> Path:
    """Writes the SAE's safetensors + config.json of a registered model into out_dir.

    The weights are checked against the sha256 recorded at registration, and the files are written
    whole or not at all (storage/outputs.py): a failed pull leaves out_dir as it was.
    """
    import tempfile

    import mlflow

    if tracking_uri:
        _mlflow(tracking_uri)
    version = model_version(model_uri)
    if not is_complete(version):
        raise NotRegistered(
            f"{model_uri} is version {version.version}, an interrupted registration: run the registration again "
            "(it replaces that version), or name a complete version"
        )
    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        src = local / "artifacts" / ARTIFACT_KEY
        if not (src / WEIGHTS_FILE).exists():
            found = list(local.rglob(WEIGHTS_FILE))
            if not found:
                raise FileNotFoundError(f"{model_uri} holds no {WEIGHTS_FILE}: is it a saeflow SAE?")
            src = found[0].parent
        expected = version.tags.get(WEIGHTS_TAG)
        if expected and file_sha256(src / WEIGHTS_FILE) != expected:
            raise OSError(
                f"{model_uri}: the downloaded {WEIGHTS_FILE} does not match its registered sha256 "
                f"{expected}: the artifact store holds a damaged copy"
            )
        with staged(out) as folder:
            for name in (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE):
                if (src / name).exists():  # versions registered before model cards have none
                    shutil.copyfile(src / name, folder / name)
    log.info("pulled %s into %s", model_uri, out)
    return out


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
