"""`saeflow sweep SPEC`: the spec's sweep (n_latents x k, trained in one pass over one cache), then the
scaling-law fit over its SAEs' held-out losses, plots and an HTML report. The fits are sae/scaling.py's."""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path

from flows import stages
from flows.spec import RunSpec

log = logging.getLogger(__name__)


def sweep_dir(spec: RunSpec) -> Path:
    return spec.root / "sweeps" / spec.part_hash(*stages.CACHE_SECTIONS, "train", "sae", "eval")


def points(spec: RunSpec) -> list[dict]:
    """(hookpoint, n, k, metrics) of every evaluated SAE of the spec, read from their outputs."""
    rows = []
    for hookpoint in spec.hookpoints:
        for i, s in enumerate(spec.sae):
            if stages.is_done("evaluate", spec, hookpoint, i):
                m = stages.stored_metrics(spec, hookpoint, i)
                rows.append({"hookpoint": hookpoint, "n_latents": s.n_latents, "k": s.k, **m})
    return rows


def report(spec: RunSpec) -> Path:
    """Fits, plots and report.html of the sweep into sweep_dir(spec); returns the report's path."""
    from sae.scaling import fit_joint_law

    rows = points(spec)
    out = sweep_dir(spec)
    out.mkdir(parents=True, exist_ok=True)
    fits = {}
    for hookpoint in spec.hookpoints:
        mine = [r for r in rows if r["hookpoint"] == hookpoint]
        try:
            fit = fit_joint_law([r["n_latents"] for r in mine], [r["k"] for r in mine], [r["normalized_mse"] for r in mine])
            fits[hookpoint] = fit.to_dict()
        except (ValueError, RuntimeError) as e:  # too few points, or no convergence: said in the report
            fits[hookpoint] = {"error": str(e)}
    (out / "points.json").write_text(json.dumps(rows, indent=2))
    (out / "fits.json").write_text(json.dumps(fits, indent=2))
    pngs = {name: _plot(name, rows, fits) for name in ("mse_vs_n", "mse_vs_l0", "dead_vs_n")}
    for name, png in pngs.items():
        (out / f"{name}.png").write_bytes(png)
    page = _page(spec, rows, fits, pngs)
    (out / "report.html").write_text(page, encoding="utf-8")
    log.info("sweep report written to %s", out / "report.html")
    return out / "report.html"


def _plot(name: str, rows: list[dict], fits: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from sae.scaling import Fit

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=110)
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
        elif name == "mse_vs_l0":
            ax.plot([r["l0"] for r in group], [r["normalized_mse"] for r in group], "o-", label=label)
        else:
            ax.plot(n, [r["dead_fraction"] for r in group], "o-", label=label)
    ax.set_xscale("log")
    if name != "dead_vs_n":
        ax.set_yscale("log")
    ax.set_xlabel({"mse_vs_n": "latents", "mse_vs_l0": "L0", "dead_vs_n": "latents"}[name])
    ax.set_ylabel("dead fraction (held-out)" if name == "dead_vs_n" else "normalized MSE (held-out)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _groups(rows: list[dict]) -> dict:
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["hookpoint"], r["k"]), []).append(r)
    return groups


def _page(spec: RunSpec, rows: list[dict], fits: dict, pngs: dict[str, bytes]) -> str:
    cells = "".join(
        f"<tr><td>{html.escape(r['hookpoint'])}</td><td>{r['n_latents']}</td><td>{r['k']}</td>"
        f"<td>{r['normalized_mse']:.4f}</td><td>{r['l0']:.1f}</td><td>{r['dead_fraction']:.3f}</td>"
        f"<td>{r.get('ce_increase', float('nan')):.4f}</td></tr>" for r in rows)
    fit_lines = []
    for hookpoint, fit in fits.items():
        if "params" in fit:
            params = ", ".join(f"{k} = {v:.4g} ± {fit['stderr'][k]:.2g}" for k, v in fit["params"].items())
            fit_lines.append(f"<p>{html.escape(hookpoint)}: L(n, k) = exp(α + β_k log k + β_n log n + γ log k log n) + "
                             f"exp(ζ + η log k); {params}; rms log residual {fit['rms_log_residual']:.3g} over "
                             f"{fit['points']} SAEs</p>")
        else:
            fit_lines.append(f"<p>{html.escape(hookpoint)}: no fit ({html.escape(fit['error'])})</p>")
    images = "".join(f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
                     for name, png in pngs.items())
    return (f"<!doctype html><meta charset=utf-8><title>sweep {html.escape(spec.name)}</title>"
            f"<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 8px;text-align:right}}</style>"
            f"<h1>Sweep {html.escape(spec.name)}</h1>{''.join(fit_lines)}{images}"
            f"<table><tr><th>hookpoint</th><th>latents</th><th>k</th><th>normalized MSE</th><th>L0</th>"
            f"<th>dead</th><th>CE increase</th></tr>{cells}</table>")
