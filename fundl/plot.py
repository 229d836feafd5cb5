"""Training curves from ``fit``'s history (matplotlib, an optional extra: ``fundl[plot]``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_history"]

_NOT_CURVES = ("epoch", "skipped")  # a history's keys that are not curves


def plot_history(
    history: Sequence[Mapping[str, float]],
    metrics: Sequence[str] | None = None,
    ax: Any = None,
    *,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Draws the training curves of a ``fit`` history: one panel per metric, epochs shared.

    Each panel shows a metric and its held-out counterpart (``loss`` and ``val_loss``,
    ``accuracy`` and ``val_accuracy``), each line labelled with its history key, against the
    entries' ``epoch``. Needs matplotlib (``pip install "fundl[plot]"``), imported only
    when called. A new figure is made through ``matplotlib.pyplot``, so ``plt.show()``
    shows it and a notebook draws it below the cell (end the line with ``;`` or assign the
    result, or the notebook draws it twice).

    Example:
        >>> import matplotlib
        >>> matplotlib.use("Agg")  # draw to files, not to a window
        >>> import fundl as fl
        >>> history = [{"epoch": 1, "loss": 0.9, "accuracy": 0.6, "val_loss": 1.0},
        ...            {"epoch": 2, "loss": 0.5, "accuracy": 0.8, "val_loss": 0.7}]
        >>> fig = fl.plot_history(history)
        >>> print([ax.get_title() for ax in fig.axes])
        ['loss', 'accuracy']
        >>> print([line.get_label() for line in fig.axes[0].get_lines()])
        ['loss', 'val_loss']
        >>> fig.savefig("curves.png")  # doctest: +SKIP

    Args:
        history: ``fit``'s history: one dict per epoch with ``epoch``, ``loss``, the
            metrics and their ``val_*`` values (``skipped`` is left out).
        metrics: the panels, by name without ``val_`` (e.g. ``["loss", "accuracy"]``); by
            default every curve in the history, ``loss`` first.
        ax: an Axes, or a sequence of Axes with one per panel, to draw on instead of a new
            figure.
        figsize: the new figure's size in inches (default: 4.5 wide and 3 high per panel,
            side by side).

    Returns:
        The matplotlib ``Figure`` drawn on (the one holding ``ax`` when given).

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: an empty history, a metric it does not hold, or a number of Axes that
            is not the number of panels.
    """
    names = _panels(history, metrics)
    axes = _axes(ax, len(names), figsize)
    epochs = [entry.get("epoch", i + 1) for i, entry in enumerate(history)]
    for panel, name in zip(axes, names, strict=True):
        for key in (name, f"val_{name}"):
            if any(key in entry for entry in history):
                values = [entry.get(key, math.nan) for entry in history]
                panel.plot(epochs, values, marker=".", label=key)
        panel.set(title=name, xlabel="epoch", ylabel=name)
        panel.xaxis.get_major_locator().set_params(integer=True)
        panel.legend()
    return axes[0].figure


def _panels(history: Sequence[Mapping[str, float]], metrics: Sequence[str] | None) -> list[str]:
    """The panels' names: ``metrics`` (checked) or every curve in ``history``, loss first."""
    if not history:
        raise ValueError(
            "plot_history: history is empty. Pass fit's history, one dict per epoch "
            "(fit(..., epochs=1 or more))."
        )
    keys = [k for k in dict.fromkeys(k for entry in history for k in entry) if k not in _NOT_CURVES]
    found = list(dict.fromkeys(k.removeprefix("val_") for k in keys))
    if metrics is None:
        return sorted(found, key=lambda name: name != "loss")  # stable: loss, then as logged
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    missing = [name for name in names if name not in found]
    if missing:
        raise ValueError(
            f"plot_history: metrics {missing} are not in the history, which holds {found} "
            "(name a metric without 'val_': 'accuracy' draws accuracy and val_accuracy)."
        )
    return names


def _axes(ax: Any, count: int, figsize: tuple[float, float] | None) -> list[Any]:
    """``count`` Axes: a new figure's side by side, or those given (checked)."""
    plt = _pyplot()
    if ax is None:
        size = figsize or (4.5 * count, 3.0)
        _, axes = plt.subplots(1, count, figsize=size, sharex=True, layout="constrained")
        return list(np.ravel(axes))
    axes = [ax] if isinstance(ax, plt.Axes) else list(np.ravel(ax))
    if len(axes) != count:
        raise ValueError(
            f"plot_history: ax has {len(axes)} Axes for {count} panels; pass one Axes per "
            "metric, or metrics= naming as many panels as Axes."
        )
    return axes


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            'plot_history needs matplotlib: pip install "fundl[plot]" (or pip install matplotlib).'
        ) from error
    return plt
