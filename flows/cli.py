"""`saeflow` command line: validate a spec, run the pipeline or one stage, pull a registered SAE."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

import yaml

from flows import interrupt
from flows.retry import Unreachable
from flows.spec import SpecError, load_spec, model_outline

EXIT_BAD_INPUT = 2
SHOWN_METRICS = (
    "normalized_mse",
    "fraction_variance_explained",
    "l0",
    "dead_fraction",
    "train_dead_fraction",
    "ce_clean",
    "ce_with_sae",
    "ce_increase",
    "kl_divergence",
    "loss_recovered_vs_zero",
    "loss_recovered_vs_mean",
    "ablation_sparsity",
    "probe_loss",
    "probe_loss_raw",
    "probe_loss_random",
    "probe_loss_prior",
    "n2g_precision",
    "n2g_recall",
)


def _configure_environment() -> None:
    # before prefect is imported: our loggers reach the Prefect UI, slow ephemeral starts don't fail
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "sae,storage,flows")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # a run prints saeflow's lines: no INFO lines of MLflow, no progress bars of libraries
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # also transformers' weight-loading bars
    # saeflow's INFO lines (and the Prefect runs'); other libraries' warnings only
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in ("sae", "storage", "flows", "prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).setLevel(logging.INFO)


def _prepare_flow_run() -> None:
    """Before a command that runs flows: unless a Prefect server is named (PREFECT_API_URL, or the
    active profile) or PREFECT_HOME chosen, the run gets a temporary server of its own
    (flows/local_server.py)."""
    from flows import local_server

    if not os.environ.get("PREFECT_API_URL") and not os.environ.get("PREFECT_HOME") and not _profile_api_url():
        local_server.start()


class _NoTraceback(logging.Filter):
    """Prefect logs a failed task's or flow's traceback: without --debug only its message shows
    (the run's own last line then says what failed and how to fix it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info or record.exc_text:
            record.exc_info, record.exc_text = None, None
        message = record.getMessage()
        if "Traceback (most recent call last)" in message:
            record.msg, record.args = message.split("Traceback (most recent call last)")[0].rstrip(" :\n"), ()
        return True


class _NamedRunLines(logging.Filter):
    """A task run's lines name the task run (`cache_shard-3b1: ...`); Completed() lines are dropped (the
    summary follows; a Cached, failed or retried run still says so)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() == "Finished in state Completed()":
            return False
        name = getattr(record, "task_run_name", None)
        if name:
            record.msg, record.args = f"{name}: {record.getMessage()}", ()
        return True


def _prefect_lines(debug: bool) -> None:
    """After Prefect has set its logging up (importing it does)."""
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(_NamedRunLines())
    if not debug:
        for name in ("prefect.task_runs", "prefect.flow_runs", "prefect.engine", "prefect"):
            logging.getLogger(name).addFilter(_NoTraceback())


def _profile_api_url() -> str | None:
    """The PREFECT_API_URL of the active Prefect profile (~/.prefect/profiles.toml), if it sets one."""
    import tomllib

    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or Path.home() / ".prefect" / "profiles.toml")
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, ValueError):
        return None
    name = os.environ.get("PREFECT_PROFILE") or data.get("active")
    return (data.get("profiles", {}).get(name) or {}).get("PREFECT_API_URL")


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
                print(f"  {key:<28}{row[key]:>10.4g}")
        if row.get("model_uri"):
            print(f"  registered {row['model_uri']}")
    walls = rows[0].get("stage_seconds") if rows else None
    if walls:
        print("\n  wall time     " + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in walls.items()))
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
    if args.full:
        print(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    d_model = model_outline(spec, args.online).d_model
    print(f"model      {spec.model.source} (d_model {d_model}), hookpoints {', '.join(spec.hookpoints)}")
    print(f"store      {_store_line(spec, d_model, spec.data.tokens)}")
    resolved = [spec.resolved_training(d_model, i) for i in range(len(spec.sae))]
    for i, r in enumerate(resolved):
        print(f"{'sae' if len(resolved) == 1 else f'sae.{i}':<10} {_training_line(r)}")
    steps = {r["steps"] for r in resolved}
    saes = len(spec.hookpoints) * len(spec.sae)
    print(
        f"saeflow validate: {args.spec} is valid: {saes} SAE{'s' if saes > 1 else ''} "
        f"({len(spec.hookpoints)} hookpoint{'s' if len(spec.hookpoints) > 1 else ''} x {len(spec.sae)}), "
        f"{'/'.join(f'{s:,}' for s in sorted(steps))} steps each; train with `saeflow run {args.spec}`"
    )
    return 0


def _training_line(r: dict) -> str:
    """One SAE's resolved training, as `validate` prints it."""
    warmup = f", warmup {r['warmup_tokens']:,} tokens" if r["warmup_tokens"] else ""
    schedule = warmup + ("" if r["decay"] == "constant" else f", {r['decay']} decay")
    return (
        f"n_latents {r['n_latents']:,}  k {r['k']}  {r['tokens']:,} tokens = {r['steps']:,} steps  "
        f"{r['optimizer']} lr {r['lr']:.4g}{' (auto)' if r['lr_auto'] else ''}{schedule}  "
        f"dead after {r['dead_tokens']:,} tokens (AuxK over {r['aux_k']})"
        + ("; dead latents restarted every 10 steps of the first 100" if r.get("resample_dead") else "")
    )


def cmd_stages(args) -> int:
    spec = load_spec(args.spec)
    _prepare_flow_run()  # before Prefect is imported: it reads its settings once
    from flows.pipeline import run_pipeline
    from flows.stages import STAGES

    only = STAGES if args.command == "run" else (args.command,)
    _prefect_lines(args.debug)
    with interrupt.stop_on_sigint():  # Ctrl-C: stop at the next step (flows/interrupt.py)
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
    if getattr(args, "model_uri", None) is not None and not MODEL_URI.fullmatch(args.model_uri):
        raise UsageError(f"model URI {args.model_uri!r}: write models:/NAME@ALIAS or models:/NAME/VERSION")
    args.tracking_uri = _tracking_uri(args.tracking_uri)


def _tracking_uri(given: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else ./.saeflow/mlflow.db: never a database that
    opening it would create (a typo would leave a stray file and say "not registered")."""
    from storage.registry import NoRegistry, find_tracking_uri

    try:
        return find_tracking_uri(given)[0]
    except NoRegistry as e:
        raise UsageError(str(e)) from None


def cmd_pull(args) -> int:
    from sae.model import TopKSAE
    from storage.registry import pull

    _registry_args(args)
    out = pull(args.model_uri, args.out, args.tracking_uri)
    sae = TopKSAE.load(out)
    print(f"wrote {out} ({sae.cfg.n_latents} latents, k={sae.cfg.k}); load it with sae.TopKSAE.load({str(out)!r})")
    return 0


def cmd_plan_memory(args) -> int:
    """Per-device memory of training each SAE of the spec: on its grid, and with other latent shards."""
    spec = load_spec(args.spec)
    d_model = model_outline(spec).d_model
    device = spec.planned_device()
    t = spec.train
    print(
        f"{spec.name}: per device, d_model {d_model}, batch {t.batch_tokens}, {device}"
        + (f", limit {t.device_memory_gib:g} GiB" if t.device_memory_gib else "")
    )
    for i, s in enumerate(spec.sae):
        print(f"  SAE {i}: {s.latents(d_model):,} latents, k {s.k}")
        shards = sorted({t.latent_shards, *(2**j for j in range(6) if 2**j <= max(t.devices * t.nodes, 1))})
        header = "    " + f"{'grid':<10}" + "".join(f"{name:>17}" for name, _ in spec.memory_plan(d_model, i).rows())
        print(header)
        for S in shards:
            plan = spec.memory_plan(d_model, i, shards=S, device=device)
            mark = "  <- the spec's grid" if S == t.latent_shards else ""
            grid = f"{max(t.devices * t.nodes // S, 1)} x {S}"
            print("    " + f"{grid:<10}" + "".join(f"{size / 2**30:>13.3f} GiB" for _, size in plan.rows()) + mark)
    return 0


# effective training FLOP/s (2·d·n per token) measured by benchmarks/train_throughput.py: H100, bf16,
# d 768, n 32768, 1.154M tokens/s (docs/benchmarks.md, "Training speed on one GPU")
MEASURED_FLOPS = {"h100": 2 * 768 * 32768 * 1.154e6}


def cmd_sweep(args) -> int:
    """Runs the spec's sweep (all its SAEs in one pass), then fits and reports it."""
    spec = load_spec(args.spec)
    if spec.sweep is None:
        raise UsageError(f"{args.spec} has no sweep section: add sweep: {{n_latents: [...], k: [...]}}")
    _prepare_flow_run()  # before Prefect is imported: it reads its settings once
    from flows import sweep
    from flows.pipeline import run_pipeline

    _prefect_lines(args.debug)
    with interrupt.stop_on_sigint():
        run_pipeline(spec)
    path = sweep.report(spec)
    print(f"sweep of {len(spec.sae)} SAEs: report {path}, fits {path.parent / 'fits.json'}")
    return 0


def cmd_plan(args) -> int:
    """A compute budget -> n_latents, k, tokens from a fitted law (or the paper's), and a spec."""
    from sae.scaling import recommend

    if (args.budget_flops is None) == (args.gpu_hours is None):
        raise UsageError("give the budget as --budget-flops X or as --gpu-hours H (with --device)")
    budget = args.budget_flops if args.budget_flops is not None else args.gpu_hours * 3600 * MEASURED_FLOPS[args.device]
    if not budget > 0:
        raise UsageError(f"budget {budget}: must be positive")
    spec = load_spec(args.spec)
    if spec.layers() > 1:
        raise UsageError(
            "sae.cross_layer: the scaling law the planner follows is one layer's SAE's; size a cross-layer "
            "transcoder by hand (n_latents and k over all its layers), or plan one of its layers as an SAE"
        )
    d_model = model_outline(spec).d_model
    law, fitted = _law(args.law, spec)
    r = recommend(budget, d_model, args.k, law)
    hook = spec.hookpoints[0]
    print(f"budget {budget:.3g} FLOPs at d_model {d_model}, k {args.k}, for {spec.model.source} at {hook}")
    print(
        f"  n_latents {r.n_latents:,}  k {r.k}  tokens {r.tokens:,} "
        f"(convergence needs about {r.tokens_to_convergence:,})"
    )
    if fitted:
        err = f" ± {r.predicted_loss_stderr:.3g}" if r.predicted_loss_stderr else ""
        print(f"  predicted normalized MSE {r.predicted_loss:.4g}{err} (the law fitted by {args.law})")
    else:
        print(
            "  no predicted loss: no law is fitted to this model and hookpoint (the allocation follows the "
            "paper's law's shape); `saeflow sweep` fits one, then pass its fits.json with --law"
        )
    print(f"  corpus: {_corpus_line(spec, r.tokens)}")
    print(f"  activation store: {_store_line(spec, d_model, r.tokens)}")
    planned = spec.model_dump(mode="json")
    planned["sae"] = [{**planned["sae"][0], "n_latents": r.n_latents, "expansion_factor": None, "k": r.k}]
    planned["data"]["tokens"] = r.tokens
    planned["train"]["tokens"] = None  # one pass over the planned tokens (not the spec's own budget)
    planned["sae"][0]["tokens"] = None
    planned["name"] = f"{spec.name}-n{r.n_latents}-k{r.k}"
    Path(args.out).write_text(yaml.safe_dump(planned, sort_keys=False))
    print(f"wrote {args.out} (check it with saeflow validate {args.out})")
    return 0


def _corpus_line(spec, tokens: int) -> str:
    """Whether data.source holds the planned training tokens (and the held-out ones) for one pass."""
    from sae.lm import load_tokenizer
    from storage.corpus import corpus_tokens

    source = spec.data.source
    held = corpus_tokens(source, load_tokenizer(spec.model.source, spec.converted_model_dir()))
    if held is None:
        return f"{source} is a hub dataset: its size is not checked here"
    train = int(held * (1 - spec.data.eval_fraction))  # documents are held out by this fraction
    if tokens <= train:
        return f"{source} holds about {train:,} training tokens (of {held:,}): enough for one pass"
    return (
        f"{source} holds about {train:,} training tokens (of {held:,}), fewer than the {tokens:,} planned: "
        "NOT ENOUGH DATA, set data.source to a larger corpus (local files or hf:NAME)"
    )


def _law(path: str | None, spec):
    """(the law to plan with, whether it was fitted to the spec's model and first hookpoint): a sweep's
    fits.json names both; without one, the paper's joint law only shapes the allocation."""
    from sae.scaling import Fit, paper_joint_law

    if path is None:
        return paper_joint_law(), False
    try:
        saved = json.loads(Path(path).read_text())
        model, fits = saved["model"], saved["hookpoints"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--law {path}: not a sweep's fits.json ({e}): `saeflow sweep SPEC` writes one") from None
    hook = spec.hookpoints[0]
    if model != spec.model.source or hook not in fits:
        raise UsageError(
            f"--law {path}: fitted to {model} at {', '.join(fits)}, not to {spec.model.source} at {hook}: "
            "a law transfers to neither another model nor another hookpoint"
        )
    try:
        return Fit(**fits[hook]), True
    except TypeError:
        raise UsageError(f"--law {path}: the sweep could not fit {hook} ({fits[hook].get('error')})") from None


def _store_line(spec, d_model: int, tokens: int) -> str:
    """What caching `tokens` training tokens for every hookpoint puts on the store's disk: all of it,
    or with data.window_shards the window's shards at most."""
    from storage.layout import planned_bytes, shard_bytes

    d = spec.data
    first = int(d.drop_first_position)
    held_out = max(spec.eval.tokens, spec.eval.downstream_contexts * (d.context_length - first))
    hooks, layers = len(spec.hookpoints), spec.layers()
    # a transcoder's rows: [MLP input | MLP output]; a cross-layer transcoder's: its layers' side by side
    width = 2 * layers * d_model if spec.transcodes() else d_model
    train = hooks * planned_bytes(tokens, d.context_length, first, width, d.dtype)
    held = hooks * planned_bytes(held_out, d.context_length, first, width, d.dtype)
    what = (
        f"{_size(train)} of training activations and {_size(held)} held out ({hooks} hookpoint"
        f"{'s' if hooks > 1 else ''} x d {d_model}{f' x {layers} layers' if layers > 1 else ''}"
        f"{' x 2 (input and output)' if spec.transcodes() else ''} "
        f"in {d.dtype})"
    )
    if d.window_shards:
        shard = hooks * shard_bytes(d.context_length, first, width, d.dtype, d.shard_contexts)
        need = min(d.window_shards * shard, train) + held
        window = f"a window of {d.window_shards} shards of {_size(shard)}"
        where = f"streamed through {window}: {_size(need)} on disk at most"
    else:
        need = train + held
        where = "all on the disk of data.store until training ends"
    return f"{what}, {where}{_free_line(spec, need)}"


def _free_line(spec, need: int) -> str:
    """How the store's need compares with the free space of its local disk (nothing for remote stores)."""
    import shutil

    from flows.paths import store_url

    url = store_url(spec)
    if "://" in url and not url.startswith("file://"):
        return ""
    place = Path(url.removeprefix("file://"))
    while not place.exists() and place != place.parent:
        place = place.parent
    free = shutil.disk_usage(place).free
    if need <= free:
        return f" ({_size(free)} free there)"
    hint = "lower data.window_shards" if spec.data.window_shards else "set data.window_shards (docs/window.md)"
    return f"; DOES NOT FIT: {_size(free)} free there, {hint}"


def _size(n: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 1e3:.1f} kB"


def cmd_promote(args) -> int:
    from flows.spec import alias_name
    from storage.registry import promote

    _registry_args(args)
    if not re.fullmatch(r"\d+|@[A-Za-z_][A-Za-z0-9_-]*", args.version):
        raise UsageError(f"version {args.version!r}: write a version number (3) or an alias (@candidate)")
    try:
        alias_name(args.alias)
    except ValueError as e:
        raise UsageError(f"--alias: {e}") from None
    done = promote(
        args.tracking_uri,
        args.name,
        args.version,
        args.alias,
        f"promoted to {args.alias} by hand (saeflow promote {args.name} {args.version})",
    )
    print(f"models:/{done.name}@{done.alias} -> version {done.version}")
    return 0


def cmd_ls(args) -> int:
    from storage.registry import list_models

    _registry_args(args)
    models = list_models(args.tracking_uri, args.name)
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    if not models:
        print(f"no registered models in {args.tracking_uri}")
    for m in models:
        print(f"{m['name']}  " + "  ".join(f"@{a} -> v{v}" for a, v in m["aliases"].items()))
        for v in m["versions"]:
            metrics = "  ".join(
                f"{k} {x:.4g}"
                for k, x in v["metrics"].items()
                if k in ("normalized_mse", "ce_increase", "dead_fraction")
            )
            print(
                f"  v{v['version']:<4} {v.get('hookpoint') or '':<18} n={v.get('n_latents')} k={v.get('k')}  {metrics}"
                + (f"  [{', '.join(v['aliases'])}]" if v["aliases"] else "")
                + ("" if v["complete"] else "  INTERRUPTED (registration did not finish; not usable)")
            )
    return 0


def _load_ref(ref: str, tracking_uri: str | None):
    """An SAE from any from_pretrained reference; a models:/ or runs:/ one needs a tracking URI."""
    from sae.model import TopKSAE
    from storage import formats

    if ref.startswith(("models:/", "runs:/")):
        if ref.startswith("models:/") and not MODEL_URI.fullmatch(ref):
            raise UsageError(f"model URI {ref!r}: write models:/NAME@ALIAS or models:/NAME/VERSION")
        tracking_uri = _tracking_uri(tracking_uri)
    elif not os.path.isdir(ref):
        raise UsageError(
            f"{ref}: no such directory (or write models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN/PATH)"
        )
    try:
        return TopKSAE.from_pretrained(ref, tracking_uri=tracking_uri)
    except formats.FormatError as e:
        raise UsageError(str(e)) from None


def cmd_export(args) -> int:
    from storage import formats

    sae = _load_ref(args.ref, args.tracking_uri)
    try:
        out = formats.export(sae, args.format, args.out)
    except formats.FormatError as e:
        raise UsageError(f"cannot export {args.ref} to {args.format}: {e}") from None
    loader = {
        "saelens": "sae_lens.SAE.load_from_disk",
        "sparsify": "sparsify.SparseCoder.load_from_disk",
        "saeflow": "sae.TopKSAE.load",
    }[args.format]
    print(f"wrote {out} ({args.format} format); load it with {loader}({str(out)!r})")
    return 0


def _keeps(cfg) -> str:
    """How many latents a code keeps, in words: k, or JumpReLU's thresholds."""
    return "JumpReLU thresholds" if cfg.activation == "jumprelu" else f"k={cfg.k}"


def cmd_import(args) -> int:
    import tempfile

    from storage import formats
    from storage.registry import dictionary_tags, file_sha256, find_registered, register_sae

    sae = _load_ref(args.dir, None)
    fmt = formats.detect(args.dir)
    if not args.register:
        out = formats.export(sae, "saeflow", args.out or "imported-sae")
        print(
            f"read {args.dir} ({fmt} format, {sae.cfg.n_latents} latents, {_keeps(sae.cfg)}); "
            f"wrote {out} (saeflow format)"
        )
        return 0
    if not args.tracking_uri:
        raise UsageError("--register needs a tracking URI: pass --tracking-uri URI or set MLFLOW_TRACKING_URI")
    with tempfile.TemporaryDirectory() as tmp:
        sae.save(tmp, sae.metadata)
        digest = file_sha256(Path(tmp) / "sae.safetensors")
        key = f"import-{digest[:16]}"  # the same weights imported again find their version
        found = find_registered(args.tracking_uri, args.register, args.alias, key, digest)
        if found is None:
            tags = {
                "imported_from": fmt,
                "source": str(Path(args.dir).resolve()),
                "spec_hash": key,
                "d_in": str(sae.cfg.d_in),
                "n_latents": str(sae.cfg.n_latents),
                "k": str(sae.cfg.k) if sae.cfg.activation != "jumprelu" else "",
                "activation": sae.cfg.activation,
                "normalization": sae.cfg.normalization,
                "lm": str(sae.metadata.get("model") or ""),
                "hookpoint": str(sae.metadata.get("hookpoint") or ""),
                **dictionary_tags(sae.cfg.to_dict(), str(sae.metadata.get("hookpoint") or "its hookpoint")),
            }
            found = register_sae(
                tmp,
                tracking_uri=args.tracking_uri,
                experiment="imported",
                model_name=args.register,
                alias=args.alias,
                params={"imported_from": fmt, "source": str(args.dir)},
                metrics={},
                tags=tags,
            )
    print(f"registered {args.dir} ({fmt} format) as {found.uri}")
    return 0


def cmd_report(args) -> int:
    from flows.stages import report_registered

    _registry_args(args)
    path = report_registered(args.model_uri, args.out, args.tracking_uri)
    print(f"wrote {path} (open it in a browser; also logged to the model's MLflow run)")
    return 0


def _tracking_uri_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./.saeflow/mlflow.db)",
    )


EXAMPLES = {
    "validate": "saeflow validate specs/demo.yaml --full",
    "run": "saeflow run specs/demo.yaml",
    "cache": "saeflow cache specs/demo.yaml",
    "train": "saeflow train specs/demo.yaml",
    "evaluate": "saeflow evaluate specs/demo.yaml",
    "register": "saeflow register specs/demo.yaml",
    "status": "saeflow status specs/demo.yaml --json",
    "sweep": "saeflow sweep specs/sweep-demo.yaml",
    "plan": "saeflow plan specs/demo.yaml --gpu-hours 8 --device h100 --k 32 --out planned.yaml",
    "plan-memory": "saeflow plan-memory specs/demo.yaml",
    "verify": "saeflow verify specs/demo.yaml",
    "pull": "saeflow pull models:/smollm2-demo@champion --out ./my-sae",
    "promote": "saeflow promote smollm2-demo 3 --alias champion",
    "ls": "saeflow ls smollm2-demo",
    "export": "saeflow export models:/smollm2-demo@champion --format saelens --out ./sae-saelens",
    "import": "saeflow import ./sae-saelens --register imported-demo",
    "report": "saeflow report models:/smollm2-demo@champion --out ./saeflow-report",
}


def _command(sub, name: str, text: str) -> argparse.ArgumentParser:
    """A subcommand whose --help says what it does and shows an example."""
    return sub.add_parser(
        name,
        help=text,
        description=text[0].upper() + text[1:] + ".",
        epilog=f"example:\n  {EXAMPLES[name]}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _subparser(common: argparse.ArgumentParser) -> type[argparse.ArgumentParser]:
    """Every subcommand's parser takes `common`'s options."""

    class Subcommand(argparse.ArgumentParser):
        def __init__(self, **kwargs):
            super().__init__(parents=[common], **kwargs)

    return Subcommand


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saeflow", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    # --debug after the subcommand too; SUPPRESS keeps a --debug given before it when not repeated
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_subparser(debug))
    v = _command(sub, "validate", "print the resolved spec, or what is wrong with it (exit 2)")
    v.add_argument("spec")
    v.add_argument("--full", action="store_true", help="also print the whole spec with every default filled in")
    v.add_argument(
        "--online",
        action="store_true",
        help="may ask a model hub for the model's config (default: the local cache only)",
    )
    v.set_defaults(func=cmd_validate)
    helps = {
        "run": "run the whole pipeline (finished stages are re-used)",
        "cache": "cache activations only (a finished store is checked; damaged shards are recomputed)",
        "train": "train SAEs (activations must be cached)",
        "evaluate": "evaluate trained SAEs",
        "register": "register evaluated SAEs in MLflow",
    }
    for name, text in helps.items():
        p = _command(sub, name, text)
        p.add_argument("spec")
        p.set_defaults(func=cmd_stages)
    p = _command(sub, "status", "where each stage stands: done, partial (how far) or missing, and where")
    p.add_argument("spec")
    p.add_argument("--json", action="store_true", help="print it as JSON")
    p.set_defaults(func=cmd_status)
    p = _command(sub, "sweep", "run the spec's sweep (n_latents x k) and fit the scaling law over it")
    p.add_argument("spec")
    p.set_defaults(func=cmd_sweep)
    p = _command(sub, "plan", "recommend n_latents, k and tokens for a compute budget, and write a spec")
    p.add_argument("spec", help="a spec to start from (model, data, hookpoint)")
    p.add_argument("--budget-flops", type=float, help="the training compute to plan for, in FLOPs")
    p.add_argument("--gpu-hours", type=float, help="or the budget as hours of --device")
    p.add_argument("--device", default="h100", choices=sorted(MEASURED_FLOPS), help="the device of --gpu-hours")
    p.add_argument("--k", type=int, default=32, help="the sparsity you want (default 32)")
    p.add_argument(
        "--law", help="a sweep's fits.json for this model and hookpoint (the only source of a predicted loss)"
    )
    p.add_argument("--out", default="planned.yaml", help="where to write the planned spec (default planned.yaml)")
    p.set_defaults(func=cmd_plan)
    p = _command(sub, "plan-memory", "per-device memory of training the spec's SAEs on its grid and others")
    p.add_argument("spec")
    p.set_defaults(func=cmd_plan_memory)
    p = _command(sub, "verify", "check every shard of the spec's activation store against its checksum")
    p.add_argument("spec")
    p.set_defaults(func=cmd_verify)
    p = _command(sub, "pull", "download a registered SAE as safetensors + config.json")
    p.add_argument("model_uri", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("--out", required=True, help="directory to write into")
    _tracking_uri_argument(p)
    p.set_defaults(func=cmd_pull)
    p = _command(sub, "promote", "point an alias (e.g. champion) at a version")
    p.add_argument("name", help="registered model name")
    p.add_argument("version", help="a version number, or @ALIAS (the version that alias names now)")
    p.add_argument("--alias", required=True, help="the alias to move, e.g. champion")
    _tracking_uri_argument(p)
    p.set_defaults(func=cmd_promote)
    p = _command(sub, "ls", "registered models, their versions, aliases and metrics")
    p.add_argument("name", nargs="?", help="one model (default: all)")
    p.add_argument("--json", action="store_true", help="print it as JSON")
    _tracking_uri_argument(p)
    p.set_defaults(func=cmd_ls)
    p = _command(sub, "export", "write an SAE in SAELens' or sparsify's own format")
    p.add_argument("ref", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN/PATH or a directory")
    p.add_argument("--format", required=True, choices=["saelens", "sparsify", "saeflow"])
    p.add_argument("--out", required=True, help="directory to write into")
    _tracking_uri_argument(p)
    p.set_defaults(func=cmd_export)
    p = _command(sub, "import", "read an SAE in SAELens', sparsify's or saeflow's format (and register it)")
    p.add_argument("dir", help="a directory in one of the three formats")
    p.add_argument("--out", help="write it there in saeflow's format (default: imported-sae)")
    p.add_argument("--register", metavar="NAME", help="register it under this model name instead")
    p.add_argument("--alias", default="candidate", help="alias of the registered version (default: candidate)")
    _tracking_uri_argument(p)
    p.set_defaults(func=cmd_import)
    p = _command(sub, "report", "write the all-latent feature browser of a registered SAE")
    p.add_argument("model_uri", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("--out", default="saeflow-report", help="directory for browser/index.html and the histogram")
    _tracking_uri_argument(p)
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
        print(
            f"error in spec {args.spec}:" + (f" {message}" if "\n" not in message else f"\n{message}"), file=sys.stderr
        )
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(
            f"saeflow {args.command}: interrupted; training stopped at a step with a checkpoint there, caching "
            f"before the shard it was computing: run `saeflow {args.command}` again to resume",
            file=sys.stderr,
        )
        return 130
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
    chain: list[BaseException] = []
    cause: BaseException | None = e
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    names = {type(x).__module__.split(".")[0] + "." + type(x).__name__ for x in chain}
    if names & {"httpx.ConnectError", "httpx.ConnectTimeout", "httpcore.ConnectError"}:
        url = os.environ.get("PREFECT_API_URL")
        if url:
            return (
                f"cannot reach the Prefect API at {url}: start that server (prefect server start) or unset "
                "PREFECT_API_URL to run with a temporary local one"
            )
    for x in chain:
        if "API request to" in str(x) and ("Max retries" in str(x) or "Connection" in str(x)):
            found = re.search(r"API request to (\S+?)/api/", str(x))
            where = f" at {found.group(1)}" if found else ""
            return (
                f"cannot reach the MLflow tracking server{where}: start it, or fix registry.tracking_uri / "
                "MLFLOW_TRACKING_URI"
            )
    return None


def _one_line(e: BaseException) -> str:
    """The innermost message of an error that Prefect or MLflow may have wrapped."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 400 else text[:400] + "..."


if __name__ == "__main__":
    sys.exit(main())
