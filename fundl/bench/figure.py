"""A bar chart of comparisons' ratios (matplotlib, imported only here, only when plotting)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fundl.bench.results import Comparison


def _bars(ax: Any, c: Comparison, ticker: Any, highlight: tuple[str, ...]) -> None:
    """One comparison's bars: time over the baseline on a log axis, ``highlight`` in orange."""
    names = [t.name for t in c.timings]
    ratios = [t.ratio for t in c.timings]
    colors = ["tab:orange" if n.startswith(highlight) else "tab:blue" for n in names]
    # Bars grow from 1 (the baseline) on a log axis of at least 0.5x to 2x, so that a 2%
    # difference looks like one and "x times faster" and "x times slower" look alike.
    ax.barh(range(len(ratios)), [r - 1.0 for r in ratios], left=1.0, color=colors)
    ax.set_yticks(range(len(ratios)), names, fontsize=7)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(min(0.5, 0.9 * min(ratios, default=1)), max(2.0, 1.1 * max(ratios, default=1)))
    ticks = [t for t in (0.25, 0.5, 1, 2, 5, 10, 20, 50) if ax.get_xlim()[0] <= t]
    ax.set_xticks([t for t in ticks if t <= ax.get_xlim()[1]], minor=False)
    ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%gx"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(c.case, fontsize=8, loc="left")


def plot(
    comparisons: Sequence[Comparison], path: str | None = None, highlight: tuple[str, ...] = ()
) -> Any:
    """A bar chart of the ratios: one bar per timing, one panel per comparison.

    Each bar is a median over its comparison's baseline, on a log axis (lower is faster).

    Args:
        comparisons: what to draw.
        path: where to save a PNG (``None``: save nothing).
        highlight: name prefixes drawn in orange (the others blue).

    Returns:
        The matplotlib ``Figure`` (made without pyplot: the backend is left alone).

    Raises:
        ImportError: matplotlib is not installed (``pip install matplotlib``).
    """
    import matplotlib.ticker
    from matplotlib.figure import Figure  # no pyplot: the user's backend stays as it is

    sizes = [max(len(c.timings), 1) for c in comparisons]
    fig = Figure(figsize=(8, 0.8 + sum(0.25 * n + 0.55 for n in sizes)))
    axes = fig.subplots(len(comparisons), 1, squeeze=False, gridspec_kw={"height_ratios": sizes})
    for ax, c in zip(axes[:, 0], comparisons, strict=True):
        _bars(ax, c, matplotlib.ticker, highlight)
    axes[-1, 0].set_xlabel("time / the baseline (log scale; lower is faster)")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
