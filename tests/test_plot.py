"""Tests of fl.plot_history against a hand-made history (matplotlib, the ``plot`` extra)."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

import fundl as fl

HISTORY = [
    {"epoch": 1, "loss": 1.0, "accuracy": 0.5, "val_loss": 1.2, "val_accuracy": 0.4},
    {"epoch": 2, "loss": 0.6, "accuracy": 0.7, "val_loss": 0.9, "val_accuracy": 0.6},
    {"epoch": 3, "loss": 0.4, "accuracy": 0.8, "val_loss": 0.8, "val_accuracy": 0.7, "skipped": 1},
]


@pytest.fixture
def plt():
    mpl = pytest.importorskip("matplotlib", reason='plot_history needs pip install "fundl[plot]"')
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    yield plt
    plt.close("all")


def _lines(ax) -> dict[str, tuple[list[float], list[float]]]:
    return {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
        for line in ax.get_lines()
    }


def _column(key):
    return [entry[key] for entry in HISTORY]


def test_one_panel_per_metric_with_its_val_curve(plt):
    fig = fl.plot_history(HISTORY)
    assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy"]  # no 'skipped' panel
    for ax, name in zip(fig.axes, ["loss", "accuracy"], strict=True):
        assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == name
        assert _lines(ax) == {
            name: ([1, 2, 3], _column(name)),
            f"val_{name}": ([1, 2, 3], _column(f"val_{name}")),
        }
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [name, f"val_{name}"]
    assert fig.axes[0].get_shared_x_axes().joined(fig.axes[0], fig.axes[1])


def test_loss_comes_first_then_the_logged_order(plt):
    history = [{"epoch": 1, "val_bleu": 0.1, "accuracy": 0.5, "loss": 2.0}]
    fig = fl.plot_history(history)
    assert [ax.get_title() for ax in fig.axes] == ["loss", "bleu", "accuracy"]
    assert list(_lines(fig.axes[1])) == ["val_bleu"]  # a held-out-only metric


def test_chosen_metrics_and_a_missing_value(plt):
    history = [dict(entry) for entry in HISTORY]
    del history[1]["val_accuracy"]
    fig = fl.plot_history(history, metrics=["accuracy"])
    assert [ax.get_title() for ax in fig.axes] == ["accuracy"]
    val = _lines(fig.axes[0])["val_accuracy"][1]
    assert val[0] == 0.4 and math.isnan(val[1]) and val[2] == 0.7


def test_draws_on_given_axes(plt):
    fig, axes = plt.subplots(2, 1)
    assert fl.plot_history(HISTORY, ax=axes) is fig
    assert [ax.get_title() for ax in axes] == ["loss", "accuracy"]
    fig, ax = plt.subplots()
    assert fl.plot_history(HISTORY, metrics="loss", ax=ax) is fig
    np.testing.assert_array_equal(ax.get_lines()[0].get_ydata(), _column("loss"))


def test_wrong_number_of_axes(plt):
    _, ax = plt.subplots()
    with pytest.raises(ValueError, match=r"ax has 1 Axes for 2 panels; pass one Axes per"):
        fl.plot_history(HISTORY, ax=ax)


# ---- errors that need no matplotlib


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    message = r'plot_history needs matplotlib: pip install "fundl\[plot\]"'
    with pytest.raises(ImportError, match=message):
        fl.plot_history(HISTORY)


def test_empty_history():
    with pytest.raises(ValueError, match="plot_history: history is empty"):
        fl.plot_history([])


def test_unknown_metric():
    message = r"metrics \['acc'\] are not in the history, which holds \['loss', 'accuracy'\]"
    with pytest.raises(ValueError, match=message):
        fl.plot_history(HISTORY, metrics=["acc"])
