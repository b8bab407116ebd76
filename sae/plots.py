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


def plain_ticks(ax) -> None:
    """Log axes labelled with plain numbers (0.5, 2000), at most a few per axis: matplotlib's default
    writes 2×10^0 on major and minor ticks alike, which crowd where a range spans under a decade."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
        if scale == "log":
            axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0), numticks=6))
            formatter = ScalarFormatter()
            formatter.set_scientific(False)
            axis.set_major_formatter(formatter)
            axis.set_minor_formatter(NullFormatter())


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
