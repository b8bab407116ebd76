"""`saeflow` command line: validate a spec, run the pipeline or one stage, pull a registered SAE."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

import yaml

from flows.retry import Unreachable
from flows.spec import SpecError, load_spec

EXIT_BAD_INPUT = 2
SHOWN_METRICS = ("normalized_mse", "fraction_variance_explained", "l0", "dead_fraction", "train_dead_fraction",
                 "ce_clean", "ce_with_sae", "ce_increase", "kl_divergence", "loss_recovered_vs_zero",
                 "loss_recovered_vs_mean", "ablation_sparsity")


def _configure_environment() -> None:
    # before prefect is imported: our loggers reach the Prefect UI, slow ephemeral starts don't fail
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "sae,storage,flows")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _print_summary(spec, rows: list[dict]) -> None:
    print(f"\nsaeflow: {spec.name}")
    for row in rows:
        print(f"\n  SAE        {row['sae']}")
        print(f"  hookpoint  {row['hookpoint']}")
        print(f"  SAE files  {row['sae_dir']}")
        if row.get("report"):
            print(f"  report     {row['report']}   (open in a browser)")
        for key in SHOWN_METRICS:
            if row.get(key) is not None:
                print(f"  {key:<28}{row[key]:>10.4f}")
        if row.get("model_uri"):
            print(f"  registered {row['model_uri']}")
    uri, source = spec.tracking_uri_and_source()
    print(f"\n  tracking URI  {uri}   (from {source})")
    if uri.startswith(("http://", "https://")):
        print(f"  MLflow UI     {uri}   (the tracking server serves it)")
    else:
        print(f"  MLflow UI     mlflow ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000)")
    if rows and rows[0].get("model_uri"):
        print(f"  pull          saeflow pull {rows[0]['model_uri']} --tracking-uri {uri} --out ./my-sae")


def cmd_validate(args) -> int:
    spec = load_spec(args.spec, online=args.online)
    print(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def cmd_stages(args) -> int:
    spec = load_spec(args.spec)
    from flows.pipeline import run_pipeline
    from flows.stages import STAGES

    only = STAGES if args.command == "run" else (args.command,)
    rows = run_pipeline(spec, only=only)
    _print_summary(spec, rows)
    return 0


def cmd_status(args) -> int:
    import json

    from flows.status import format_status, spec_status

    status = spec_status(load_spec(args.spec))
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def cmd_verify(args) -> int:
    from flows.stages import store_options, store_url
    from storage import activations as store

    spec = load_spec(args.spec)
    url, options = store_url(spec), store_options(spec)
    if not store.is_complete(url, options):
        print(f"the activation store at {url} is missing or unfinished: run `saeflow cache {args.spec}`")
        return 1
    problems = [what for _, _, what in store.bad_shards(url, options)]
    for what in problems:
        print(f"bad: {what}")
    if problems:
        print(f"{len(problems)} bad shards in {url}: `saeflow cache {args.spec}` recomputes exactly those")
        return 1
    print(f"every shard of {url} matches its checksum")
    return 0


class UsageError(ValueError):
    """Something the user gave is wrong: one line naming it and the fix, exit 2."""


MODEL_URI = re.compile(r"models:/[^/@\s]+(@[^/@\s]+|/\d+)")


def _registry_args(args) -> None:
    """Checks a models:/ argument and the tracking URI before anything touches a registry or a file."""
    if not MODEL_URI.fullmatch(args.model_uri):
        raise UsageError(f"model URI {args.model_uri!r}: write models:/NAME@ALIAS or models:/NAME/VERSION")
    if not args.tracking_uri:
        raise UsageError("no MLflow tracking URI: pass --tracking-uri URI or set MLFLOW_TRACKING_URI "
                         "(the embedded one is sqlite:///<workdir>/mlflow.db)")
    if args.tracking_uri.startswith("sqlite:///") and not os.path.isfile(args.tracking_uri.removeprefix("sqlite:///")):
        # opening it would create an empty database: a typo would leave a stray file and say "not registered"
        raise UsageError(f"tracking URI {args.tracking_uri}: no such MLflow database file; check the path "
                         "(the embedded one is sqlite:///<workdir>/mlflow.db)")


def cmd_pull(args) -> int:
    from sae.model import TopKSAE
    from storage.registry import pull

    _registry_args(args)
    out = pull(args.model_uri, args.out, args.tracking_uri)
    sae = TopKSAE.load(out)
    print(f"wrote {out} ({sae.cfg.n_latents} latents, k={sae.cfg.k}); load it with sae.TopKSAE.load({str(out)!r})")
    return 0


def cmd_report(args) -> int:
    from flows.stages import report_registered

    _registry_args(args)
    path = report_registered(args.model_uri, args.out, args.tracking_uri)
    print(f"wrote {path} (open it in a browser; also logged to the model's MLflow run)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saeflow", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="print the resolved spec, or what is wrong with it (exit 2)")
    v.add_argument("spec")
    v.add_argument("--online", action="store_true", help="may ask a model hub for the model's config "
                   "(default: the local cache only)")
    v.set_defaults(func=cmd_validate)
    helps = {
        "run": "run the whole pipeline (finished stages are re-used)",
        "cache": "cache activations only (a finished store is checked; damaged shards are recomputed)",
        "train": "train SAEs (activations must be cached)",
        "evaluate": "evaluate trained SAEs",
        "register": "register evaluated SAEs in MLflow",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text)
        p.add_argument("spec")
        p.set_defaults(func=cmd_stages)
    p = sub.add_parser("status", help="where each stage stands: done, partial (how far) or missing, and where")
    p.add_argument("spec")
    p.add_argument("--json", action="store_true", help="print it as JSON")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("verify", help="check every shard of the spec's activation store against its checksum")
    p.add_argument("spec")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("pull", help="download a registered SAE as safetensors + config.json")
    p.add_argument("model_uri", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("--out", required=True, help="directory to write into")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    p.set_defaults(func=cmd_pull)
    p = sub.add_parser("report", help="write the HTML feature browser of a registered SAE")
    p.add_argument("model_uri", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("--out", default="saeflow-report", help="directory for report.html and the histogram")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_environment()
    try:
        return args.func(args)
    except SpecError as e:
        if args.debug:
            raise
        message = str(e)
        print(f"error in spec {args.spec}:" + (f" {message}" if "\n" not in message else f"\n{message}"), file=sys.stderr)
        return EXIT_BAD_INPUT
    except (UsageError, LookupError) as e:  # LookupError: e.g. a model URI the registry does not have
        if args.debug:
            raise
        print(f"saeflow: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:
        if args.debug:
            raise
        unreachable = str(e) if isinstance(e, Unreachable) else _unreachable_server(e)
        if unreachable:  # a configuration the user can fix: say which server and how
            print(f"saeflow {args.command}: {unreachable}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"saeflow {args.command} failed: {_one_line(e)}  (--debug shows the traceback)", file=sys.stderr)
        return 1


def _unreachable_server(e: BaseException) -> str | None:
    """The server behind a connection failure, named with its fix; None for any other error."""
    chain = []
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    names = {type(x).__module__.split(".")[0] + "." + type(x).__name__ for x in chain}
    if names & {"httpx.ConnectError", "httpx.ConnectTimeout", "httpcore.ConnectError"}:
        url = os.environ.get("PREFECT_API_URL")
        if url:
            return (f"cannot reach the Prefect API at {url}: start that server (prefect server start) or unset "
                    "PREFECT_API_URL to run with a temporary local one")
    if any("API request to" in str(x) and ("Max retries" in str(x) or "Connection" in str(x)) for x in chain):
        return ("cannot reach the MLflow tracking server (see the tracking URI printed above): start it, or fix "
                "registry.tracking_uri / MLFLOW_TRACKING_URI")
    return None


def _one_line(e: BaseException) -> str:
    """The innermost message of an error that Prefect or MLflow may have wrapped."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 400 else text[:400] + "..."


if __name__ == "__main__":
    sys.exit(main())
