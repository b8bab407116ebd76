"""The activation-frequency histogram of an SAE's latents (a PNG for the browser and the MLflow run)."""

from __future__ import annotations

import io

import numpy as np


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
