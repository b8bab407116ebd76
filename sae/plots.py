"""PNG figures without a display: the latents' activation-frequency histogram, and the helpers the
sweep's plots share."""

from __future__ import annotations

import io

import numpy as np


def figure(figsize: tuple[float, float] = (5, 3.6)):
    """(fig, ax) drawn off-screen (matplotlib's Agg backend): for files only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize, dpi=110)


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def frequency_histogram_png(frequencies: np.ndarray, title: str) -> bytes:
    """Histogram of log10 firing frequency over latents; never-firing latents counted in the title."""
    alive = frequencies[frequencies > 0]
    fig, ax = figure((6, 3.2))
    if len(alive):
        ax.hist(np.log10(alive), bins=50, color="#d9480f")
    ax.set_xlabel("log10 activation frequency")
    ax.set_ylabel("latents")
    ax.set_title(f"{title}: {int((frequencies == 0).sum())} of {len(frequencies)} latents never fired", fontsize=9)
    return png_bytes(fig)
