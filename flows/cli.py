"""`saeflow` command line: validate a spec, run the pipeline or one stage, pull a registered SAE."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import yaml

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
    uri = spec.tracking_uri()
    print(f"\n  tracking URI  {uri}")
    print(f"  MLflow UI     mlflow ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000)")
    if rows and rows[0].get("model_uri"):
        print(f"  pull          saeflow pull {rows[0]['model_uri']} --tracking-uri {uri} --out ./my-sae")


def cmd_validate(args) -> int:
    spec = load_spec(args.spec)
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


def cmd_pull(args) -> int:
    from sae.model import TopKSAE
    from storage.registry import pull

    out = pull(args.model_uri, args.out, args.tracking_uri)
    sae = TopKSAE.load(out)
    print(f"wrote {out} ({sae.cfg.n_latents} latents, k={sae.cfg.k}); load it with sae.TopKSAE.load({str(out)!r})")
    return 0


def cmd_report(args) -> int:
    from flows.stages import report_registered

    path = report_registered(args.model_uri, args.out, args.tracking_uri)
    print(f"wrote {path} (open it in a browser; also logged to the model's MLflow run)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saeflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="print the resolved spec, or what is wrong with it (exit 2)")
    v.add_argument("spec")
    v.set_defaults(func=cmd_validate)
    helps = {
        "run": "run the whole pipeline (finished stages are re-used)",
        "cache": "cache activations only",
        "train": "train SAEs (activations must be cached)",
        "evaluate": "evaluate trained SAEs",
        "register": "register evaluated SAEs in MLflow",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text)
        p.add_argument("spec")
        p.set_defaults(func=cmd_stages)
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
        print(f"error in spec {args.spec}:\n{e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
