"""`saeflow sweep SPEC`: the spec's sweep (n_latents x k, trained in one pass over one cache), then the
scaling-law fit over its SAEs' held-out losses, plots and an HTML report. The fits are sae/scaling.py's."""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from pathlib import Path

from flows import done, paths
from flows.spec import RunSpec, safe_name
from sae.plots import figure, plain_ticks, png_bytes

log = logging.getLogger(__name__)


def sweep_dir(spec: RunSpec) -> Path:
    return spec.root / "sweeps" / spec.part_hash(*paths.CACHE_SECTIONS, "train", "sae", "eval")


def points(spec: RunSpec) -> list[dict]:
    """(hookpoint, n, k, lr, d_in, tokens, metrics, milestones) of every evaluated SAE of the spec,
    read from their outputs; `milestones` are the held-out scores taken while it trained."""
    rows = []
    for hookpoint in spec.hookpoints:
        for i, s in enumerate(spec.sae):
            if done.is_done("evaluate", spec, hookpoint, i):
                m = done.stored_metrics(spec, hookpoint, i)
                rel = paths.sae_rel(spec, hookpoint, i)
                config = json.loads(spec.work.read_bytes(f"{rel}/{paths.SAE_MARKER}"))
                history = json.loads(spec.work.read_bytes(f"{rel}/train_history.json"))
                rows.append(
                    {
                        "hookpoint": hookpoint,
                        "index": i,
                        "n_latents": s.n_latents,
                        "k": s.k,
                        "lr": config["metadata"]["lr"],
                        "d_in": config["sae"]["d_in"],
                        "tokens": config["metadata"]["train_tokens"],
                        **m,
                        "milestones": history.get("milestones", []),
                    }
                )
    return rows


def compute_points(rows: list[dict]) -> list[dict]:
    """Every scored (SAE, tokens) point of a hookpoint's sweep with its training compute (2·d·n per
    token): the milestones and the final evaluations, and which lie on the compute frontier."""
    from sae.scaling import compute_frontier, training_flops

    out = []
    for r in rows:
        for m in r["milestones"] + [{"tokens": r["tokens"], "normalized_mse": r["normalized_mse"]}]:
            out.append(
                {
                    "hookpoint": r["hookpoint"],
                    "n_latents": r["n_latents"],
                    "k": r["k"],
                    "tokens": m["tokens"],
                    "flops": training_flops(r["d_in"], r["n_latents"], m["tokens"]),
                    "normalized_mse": m["normalized_mse"],
                }
            )
    for hookpoint in {p["hookpoint"] for p in out}:
        mine = [p for p in out if p["hookpoint"] == hookpoint]
        for p, on in zip(mine, compute_frontier([p["flops"] for p in mine], [p["normalized_mse"] for p in mine])):
            p["frontier"] = on
    return out


def to_register(spec: RunSpec, hookpoint: str, metrics: list[dict | None]) -> list[bool]:
    """Which SAEs of a hookpoint the register stage takes: all, or with sweep.registered: frontier
    those on the normalized-MSE-vs-L0 frontier (metrics: this run's evaluations, None where the
    evaluation ran earlier and is read back)."""
    if spec.sweep is None or spec.sweep.registered == "all":
        return [True] * len(spec.sae)
    from sae.scaling import l0_frontier

    found = [m or done.existing_output("evaluate", spec, hookpoint, i) for i, m in enumerate(metrics)]
    if any(m is None for m in found):
        raise RuntimeError(
            f"the sweep registers its frontier, which needs every SAE of {hookpoint} evaluated: "
            "run `saeflow evaluate SPEC` (or `saeflow sweep SPEC`) first"
        )
    evaluated: list[dict] = found
    return l0_frontier([m["l0"] for m in evaluated], [m["normalized_mse"] for m in evaluated])


def share_with_browsers(spec: RunSpec, hookpoint: str, evaluated: list[dict] | None = None) -> int:
    """Once every SAE of a sweep at `hookpoint` is evaluated, writes the sweep's points into each
    one's feature browser (its overview's frontier plots); returns how many browsers took them.
    `evaluated`: `points(spec)` when the caller has read them already."""
    from sae.browser import SWEEP_DATA, sweep_data

    if spec.sweep is None or not spec.eval.browser:
        return 0
    rows = [r for r in (points(spec) if evaluated is None else evaluated) if r["hookpoint"] == hookpoint]
    if len(rows) < len(spec.sae):
        return 0
    shared = 0
    for at, row in enumerate(rows):
        browser = f"{paths.eval_rel(spec, hookpoint, row['index'])}/{paths.BROWSER_DIR}"
        if spec.work.exists(f"{browser}/index.html"):
            spec.work.write_bytes(f"{browser}/{SWEEP_DATA}", sweep_data(rows, at))
            shared += 1
    return shared


def report(spec: RunSpec) -> Path:
    """Fits, plots and report.html of the sweep into sweep_dir(spec); returns the report's path."""
    from sae.scaling import fit_joint_law, fit_power_law

    rows = points(spec)
    out = sweep_dir(spec)
    out.mkdir(parents=True, exist_ok=True)
    for hookpoint in spec.hookpoints:
        share_with_browsers(spec, hookpoint, rows)
    fits = {}
    for hookpoint in spec.hookpoints:
        # L(n, k): the best SAE of each (n, k) over the sweep's lrs and token budgets
        best: dict = {}
        for r in rows:
            key = (r["n_latents"], r["k"])
            if r["hookpoint"] == hookpoint and (key not in best or r["normalized_mse"] < best[key]["normalized_mse"]):
                best[key] = r
        mine = list(best.values())
        try:
            fit = fit_joint_law(
                [r["n_latents"] for r in mine], [r["k"] for r in mine], [r["normalized_mse"] for r in mine]
            )
            fits[hookpoint] = fit.to_dict()
        except (ValueError, RuntimeError) as e:  # too few points, or no convergence: said in the report
            fits[hookpoint] = {"error": str(e)}
    compute = compute_points(rows)
    compute_fits = {}
    for hookpoint in spec.hookpoints:  # L(C): a power law with an irreducible term over the frontier
        front = [p for p in compute if p["hookpoint"] == hookpoint and p["frontier"]]
        try:
            compute_fits[hookpoint] = fit_power_law(
                [p["flops"] for p in front], [p["normalized_mse"] for p in front]
            ).to_dict()
        except (ValueError, RuntimeError) as e:
            compute_fits[hookpoint] = {"error": str(e)}
    (out / "points.json").write_text(json.dumps(rows, indent=2))
    # whose law it is: the planner uses it for this model and hookpoint only
    (out / "fits.json").write_text(json.dumps({"model": spec.model.source, "hookpoints": fits}, indent=2))
    (out / "compute.json").write_text(json.dumps({"points": compute, "fits": compute_fits}, indent=2))
    plots = ["mse_vs_n", "mse_vs_l0", "dead_vs_n"] + (["dce_vs_mse"] if all("ce_increase" in r for r in rows) else [])
    plots += ["mse_vs_tokens", "mse_vs_compute"] if any(r["milestones"] for r in rows) else []
    pngs = {
        name: _plot(name, rows, fits)
        if name not in ("mse_vs_tokens", "mse_vs_compute")
        else _compute_plot(name, rows, compute, compute_fits)
        for name in plots
    }
    for name, png in pngs.items():
        (out / f"{name}.png").write_bytes(png)
    page = _page(spec, rows, fits, compute_fits, pngs)
    (out / "report.html").write_text(page, encoding="utf-8")
    log.info("sweep report written to %s", out / "report.html")
    _log_to_mlflow(
        spec,
        out,
        fits,
        [out / name for name in ("points.json", "fits.json", "compute.json", "report.html")]
        + [out / f"{name}.png" for name in pngs],
    )
    return out / "report.html"


def _log_to_mlflow(spec: RunSpec, out: Path, fits: dict, files: list[Path]) -> str:
    """One parent run for the sweep: its files and fit; each SAE's run (registered or not) under it."""
    from storage.registry import log_sweep

    children, unregistered = [], {}
    for hookpoint in spec.hookpoints:
        for i, s in enumerate(spec.sae):
            found = done.registered(spec, hookpoint, i)
            if found is not None:
                children.append(found.run_id)
            elif done.is_done("evaluate", spec, hookpoint, i):
                metrics = done.stored_metrics(spec, hookpoint, i)
                params = {
                    "hookpoint": hookpoint,
                    "n_latents": s.n_latents,
                    "k": s.k,
                    "lr": spec.lr_setting(i),
                    "registered": "no: not on the sweep's frontier",
                }
                unregistered[spec.model_name(hookpoint, i)] = (
                    params,
                    {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                )
    fit_metrics = {
        f"fit.{safe_name(hookpoint)}.{name}": value
        for hookpoint, fit in fits.items()
        for name, value in fit.get("params", {}).items()
    }
    uri = spec.tracking_uri()
    with done.registry_lock(uri):
        return log_sweep(
            uri,
            spec.registry.experiment or spec.name,
            spec.name,
            out.name,
            files,
            fit_metrics,
            children,
            unregistered,
            spec.root / "mlartifacts" if uri.startswith(("sqlite:", "file:")) else None,
        )


def _plot(name: str, rows: list[dict], fits: dict) -> bytes:
    import numpy as np

    from sae.scaling import Fit

    fig, ax = figure()
    for (hookpoint, k), group in _groups(rows).items():
        group.sort(key=lambda r: r["n_latents"])
        n = [r["n_latents"] for r in group]
        label = f"k={k}" + (f" {hookpoint}" if len(fits) > 1 else "")
        if name == "mse_vs_n":
            line = ax.plot(n, [r["normalized_mse"] for r in group], "o", label=label)[0]
            fit = fits.get(hookpoint, {})
            if "params" in fit:
                grid = np.geomspace(min(n), max(n) * 4, 50)
                f = Fit(**fit)
                ax.plot(grid, [f.predict(g, k) for g in grid], "-", color=line.get_color(), alpha=0.6)
        elif name == "mse_vs_l0":  # points only: the curves join one dictionary size across k, below
            ax.plot([r["l0"] for r in group], [r["normalized_mse"] for r in group], "o", label=label)
        elif name == "dce_vs_mse":  # §4.1: downstream loss against reconstruction
            ax.plot([r["normalized_mse"] for r in group], [r["ce_increase"] for r in group], "o", label=label)
        else:
            ax.plot(n, [r["dead_fraction"] for r in group], "o-", label=label)
    if name == "mse_vs_l0":  # §3: one curve per dictionary (all but k the same), and the frontier
        from sae.scaling import l0_frontier

        for (_, n, *_), group in _groups(rows, "n_latents", "lr", "tokens").items():
            group.sort(key=lambda r: r["l0"])
            ax.plot([r["l0"] for r in group], [r["normalized_mse"] for r in group], "-", color="0.75", lw=1, zorder=0)
            ax.annotate(f"n={n}", (group[-1]["l0"], group[-1]["normalized_mse"]), fontsize=6, color="0.4")
        for hookpoint in {r["hookpoint"] for r in rows}:
            mine = [r for r in rows if r["hookpoint"] == hookpoint]
            on = l0_frontier([r["l0"] for r in mine], [r["normalized_mse"] for r in mine])
            front = sorted((r for r, f in zip(mine, on) if f), key=lambda r: r["l0"])
            ax.plot([r["l0"] for r in front], [r["normalized_mse"] for r in front], "k--", lw=1, label="frontier")
    if name != "dce_vs_mse":  # a normalized MSE within one decade reads better on a linear axis
        ax.set_xscale("log")
    if name in ("mse_vs_n", "mse_vs_l0"):
        ax.set_yscale("log")
    plain_ticks(ax)
    if name in ("mse_vs_n", "dead_vs_n"):  # the sweep's dictionary sizes themselves
        ax.set_xticks(sorted({r["n_latents"] for r in rows}), [str(n) for n in sorted({r["n_latents"] for r in rows})])
        ax.minorticks_off()
    ax.set_xlabel(
        {"mse_vs_n": "latents", "mse_vs_l0": "L0", "dead_vs_n": "latents", "dce_vs_mse": "normalized MSE (held-out)"}[
            name
        ]
    )
    ax.set_ylabel(
        {"dead_vs_n": "dead fraction (held-out)", "dce_vs_mse": "CE increase (nats)"}.get(
            name, "normalized MSE (held-out)"
        )
    )
    # a fixed corner, not "best": its search is timed, and under load matplotlib warns that it was slow
    ax.legend(fontsize=7, loc="upper left" if name in ("dead_vs_n", "dce_vs_mse") else "upper right")
    return png_bytes(fig)


def _compute_plot(name: str, rows: list[dict], compute: list[dict], fits: dict) -> bytes:
    """Held-out normalized MSE against training tokens (one curve per SAE), or against training
    compute with the frontier and its fitted L(C)."""
    import numpy as np

    from sae.scaling import Fit

    fig, ax = figure()
    if name == "mse_vs_tokens":
        for r in rows:
            curve = r["milestones"] + [{"tokens": r["tokens"], "normalized_mse": r["normalized_mse"]}]
            ax.plot(
                [m["tokens"] for m in curve],
                [m["normalized_mse"] for m in curve],
                "o-",
                ms=3,
                lw=1,
                label=f"n={r['n_latents']} k={r['k']}"
                + (f" lr={r['lr']:.2g}" if len({x["lr"] for x in rows}) > 1 else ""),
            )
        ax.set_xlabel("training tokens")
    else:
        ax.plot([p["flops"] for p in compute], [p["normalized_mse"] for p in compute], ".", color="0.6", label="all")
        for hookpoint, fit in fits.items():
            front = sorted(
                (p for p in compute if p["hookpoint"] == hookpoint and p["frontier"]), key=lambda p: p["flops"]
            )
            line = ax.plot(
                [p["flops"] for p in front], [p["normalized_mse"] for p in front], "o", label=f"frontier {hookpoint}"
            )[0]
            if "params" in fit:
                grid = np.geomspace(front[0]["flops"], front[-1]["flops"] * 4, 50)
                f = Fit(**fit)
                ax.plot(grid, [f.predict(c) for c in grid], "-", color=line.get_color(), alpha=0.6, label="L(C) fit")
        ax.set_xlabel("training compute (FLOPs, 2·d·n per token)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_ticks(ax)
    ax.set_ylabel("normalized MSE (held-out)")
    ax.legend(fontsize=6, loc="upper right")  # the curves fall to the right (not "best": see above)
    return png_bytes(fig)


def _groups(rows: list[dict], *by: str) -> dict:
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["hookpoint"], *(r[key] for key in by or ("k",))), []).append(r)
    return groups


def _page(spec: RunSpec, rows: list[dict], fits: dict, compute_fits: dict, pngs: dict[str, bytes]) -> str:
    cells = "".join(
        f"<tr><td>{html.escape(r['hookpoint'])}</td><td>{r['n_latents']}</td><td>{r['k']}</td><td>{r['lr']:.3g}</td>"
        f"<td>{r['normalized_mse']:.4f}</td><td>{r['l0']:.1f}</td><td>{r['dead_fraction']:.3f}</td>"
        f"<td>{r.get('ce_increase', float('nan')):.4f}</td></tr>"
        for r in rows
    )
    fit_lines = []
    for hookpoint, fit in fits.items():
        if "params" in fit:
            params = ", ".join(f"{k} = {v:.4g} ± {fit['stderr'][k]:.2g}" for k, v in fit["params"].items())
            fit_lines.append(
                f"<p>{html.escape(hookpoint)}: L(n, k) = exp(α + β_k log k + β_n log n + γ log k log n) + "
                f"exp(ζ + η log k); {params}; rms log residual {fit['rms_log_residual']:.3g} over "
                f"{fit['points']} SAEs</p>"
            )
        else:
            fit_lines.append(f"<p>{html.escape(hookpoint)}: no fit ({html.escape(fit['error'])})</p>")
    for hookpoint, fit in compute_fits.items():
        if "params" in fit:
            p, e = fit["params"], fit["stderr"]
            fit_lines.append(
                f"<p>{html.escape(hookpoint)}: on the compute frontier L(C) = a·C^-b + c with "
                f"b = {p['b']:.3g} ± {e['b']:.2g}, c = {math.exp(p['log_c']):.3g} "
                f"(from {fit['points']} frontier points; C in FLOPs)</p>"
            )
        else:
            fit_lines.append(f"<p>{html.escape(hookpoint)}: no L(C) fit ({html.escape(fit['error'])})</p>")
    images = "".join(
        f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">' for name, png in pngs.items()
    )
    return (
        f"<!doctype html><meta charset=utf-8><title>sweep {html.escape(spec.name)}</title>"
        f"<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 8px;text-align:right}}</style>"
        f"<h1>Sweep {html.escape(spec.name)}</h1>{''.join(fit_lines)}{images}"
        f"<table><tr><th>hookpoint</th><th>latents</th><th>k</th><th>lr</th><th>normalized MSE</th><th>L0</th>"
        f"<th>dead</th><th>CE increase</th></tr>{cells}</table>"
    )
