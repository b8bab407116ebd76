"""Self-contained HTML feature browser and the activation-frequency histogram (no server, no network)."""

from __future__ import annotations

import base64
import html
import io
from typing import Callable

import numpy as np

from sae.features import Example, LatentCard


def frequency_histogram_png(frequencies: np.ndarray, title: str) -> bytes:
    """Histogram of log10 firing frequency over latents; never-firing latents counted in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alive = frequencies[frequencies > 0]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    if len(alive):
        ax.hist(np.log10(alive), bins=50, color="#d9480f")
    ax.set_xlabel("log10 activation frequency")
    ax.set_ylabel("latents")
    ax.set_title(f"{title}: {int((frequencies == 0).sum())} of {len(frequencies)} latents never fired", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px} h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table.m td{padding:2px 12px 2px 0} .card{border:1px solid #ddd;border-radius:6px;padding:12px;margin:14px 0}
.ctx{font-family:ui-monospace,monospace;font-size:12.5px;line-height:1.9;margin:3px 0;white-space:pre-wrap}
.tok{border-radius:2px} .lbl{color:#777;font-size:12px} .promo span{margin-right:10px;font-family:ui-monospace,monospace}
.hist{display:inline-flex;align-items:flex-end;height:40px;gap:1px;vertical-align:middle}
.hist div{width:6px;background:#d9480f}
"""


def _token_span(text: str, act: float, scale: float) -> str:
    alpha = min(act / scale, 1.0) if scale > 0 else 0.0
    style = f"background:rgba(255,110,0,{alpha:.2f})" if act > 0 else ""
    shown = html.escape(text.replace("\n", "\u21b5"))  # newlines as ↵ keep one context per line
    return f'<span class="tok" style="{style}" title="{act:.3f}">{shown}</span>'


def _context(example: Example, tokens: list[str], scale: float) -> str:
    spans = "".join(_token_span(t, a, scale) for t, a in zip(tokens, example.activations))
    return f'<div class="ctx" data-context="{example.context}">{spans}</div>'


def _histogram(edges: list[float], counts: list[int]) -> str:
    if not counts:
        return ""
    top = max(counts)
    bars = "".join(
        f'<div style="height:{max(1, int(40 * c / top))}px" title="{lo:.2f}-{hi:.2f}: {c}"></div>'
        for lo, hi, c in zip(edges[:-1], edges[1:], counts)
    )
    return f'<span class="hist">{bars}</span>'


def render_report(
    title: str,
    metrics: dict[str, float],
    histogram_png: bytes,
    sections: list[tuple[str, list[LatentCard]]],
    context_tokens: Callable[[int], list[str]],
    token_text: Callable[[int], str],
) -> str:
    """The whole report as one HTML string; images are inlined as data URIs."""
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" for k, v in metrics.items() if isinstance(v, float | int)
    )
    png = base64.b64encode(histogram_png).decode()
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
        f"<table class='m'>{rows}</table>",
        f"<img alt='activation frequency histogram' src='data:image/png;base64,{png}'>",
    ]
    for heading, cards in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for card in cards:
            scale = card.max_activation
            parts.append(
                f"<div class='card' id='latent-{card.latent}'><b>latent {card.latent}</b> "
                f"<span class='lbl'>frequency {card.frequency:.4%} · max {card.max_activation:.3f}</span> "
                f"{_histogram(*card.histogram)}"
            )
            if card.promoted_tokens:
                promo = "".join(f"<span>{html.escape(token_text(t))} {v:+.2f}</span>" for t, v in card.promoted_tokens)
                parts.append(f"<div class='promo lbl'>promotes: {promo}</div>")
            parts.append("<div class='lbl'>top activations</div>")
            parts.extend(_context(e, context_tokens(e.context), scale) for e in card.top)
            for name, examples in card.by_quantile:
                if examples:
                    parts.append(f"<div class='lbl'>activation quantile {name}</div>")
                    parts.extend(_context(e, context_tokens(e.context), scale) for e in examples)
            parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)
