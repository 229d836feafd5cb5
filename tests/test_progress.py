"""Tests of fit's progress bar: when it shows, and what its description and postfix say."""

from __future__ import annotations

import io
import sys
import types

import numpy as np
import optax
import pytest

import fundl as fl
from fundl.train.callbacks import in_notebook, progress_bar, show_progress


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def _ipython(shell) -> types.ModuleType:
    """A stand-in for the IPython module whose ``get_ipython()`` returns ``shell``."""
    module = types.ModuleType("IPython")
    module.get_ipython = lambda: shell
    return module


class _Sums:
    """Device sums as ``fit`` keeps them (values, count, skipped) that count their reads."""

    def __init__(self, values):
        self.values, self.reads = np.asarray(values, np.float32), 0

    def __array__(self, dtype=None, copy=None):
        self.reads += 1
        return self.values.astype(dtype or self.values.dtype)


def _last_line(out: io.StringIO) -> str:
    return out.getvalue().split("\r")[-1]


# ---- when the bar shows


@pytest.mark.parametrize("tty", [True, False])
def test_default_shows_the_bar_in_a_terminal_only(monkeypatch, tty):
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    monkeypatch.setattr(sys, "stderr", _Stream(tty))
    assert show_progress(None) is tty
    assert show_progress(True) is True  # explicit wins
    assert show_progress(False) is False


def test_default_shows_the_bar_in_a_notebook(monkeypatch):
    # A kernel's stderr is not a terminal; its shell has a kernel (terminal IPython's has none).
    monkeypatch.setattr(sys, "stderr", _Stream(False))
    monkeypatch.setitem(sys.modules, "IPython", _ipython(types.SimpleNamespace(kernel=object())))
    assert in_notebook() and show_progress(None)
    monkeypatch.setitem(sys.modules, "IPython", _ipython(types.SimpleNamespace()))
    assert not in_notebook() and not show_progress(None)
    monkeypatch.setitem(sys.modules, "IPython", _ipython(None))  # IPython imported, no shell
    assert not in_notebook()


def test_no_bar_when_hidden():
    assert progress_bar(False, 10) is None


def test_the_bar_comes_from_tqdm_auto(monkeypatch):
    made = {}

    def fake_tqdm(**kwargs):
        made.update(kwargs)
        return types.SimpleNamespace()

    monkeypatch.setattr("tqdm.auto.tqdm", fake_tqdm)
    progress_bar(True, 0)
    assert made["total"] is None  # 0 steps known: an open-ended bar
    assert made["unit"] == "step"


# ---- what it says


def test_description_and_running_means():
    out = io.StringIO()
    bar = progress_bar(True, 6, names=("loss", "accuracy"), epochs=2, every=0.0, file=out)
    bar.start_epoch(1)
    bar.update(2, _Sums([3.0, 1.5, 2.0, 0.0]))  # sums over 2 examples: means 1.5, 0.75
    assert bar.bar.desc.startswith("epoch 1/2")
    assert bar.bar.postfix == "loss=1.5, accuracy=0.75"
    bar.close()
    line = _last_line(out)
    assert line.startswith("epoch 1/2")
    assert "2/6" in line and "loss=1.5, accuracy=0.75" in line


def test_epoch_logs_then_running_means_keep_the_last_val_logs():
    out = io.StringIO()
    bar = progress_bar(True, 4, names=("loss",), epochs=None, every=0.0, file=out)
    bar.start_epoch(1)
    bar.update(2)
    bar.set_postfix({"epoch": 1, "loss": 0.123456, "val_loss": 0.5, "skipped": 1})
    assert bar.bar.postfix == "loss=0.1235, val_loss=0.5, skipped=1"
    bar.start_epoch(2)
    bar.update(1, _Sums([0.25, 1.0, 0.0]))
    assert bar.bar.desc.startswith("epoch 2")
    assert bar.bar.postfix == "loss=0.25, val_loss=0.5"
    bar.close()
    assert "loss=0.25, val_loss=0.5" in _last_line(out)


def test_running_means_are_read_at_most_once_per_interval():
    # Each read of the device sums waits for the queued steps: never one per step.
    bar = progress_bar(True, 100, names=("loss",), every=3600.0, file=io.StringIO())
    sums = _Sums([1.0, 1.0, 0.0])
    for _ in range(100):
        bar.update(1, sums)
    assert sums.reads == 0
    bar.every = 0.0
    bar.update(1, sums)
    assert sums.reads == 1
    bar.close()


def test_fit_shows_the_epoch_logs_on_the_bar(capsys):
    x = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    model = fl.serial(fl.dense(2))
    loss = optax.softmax_cross_entropy_with_integer_labels
    fl.fit(model, loss, optax.sgd(0.1), (x, y), epochs=2, batch_size=10, eval_data=(x, y),
           metrics={"accuracy": fl.accuracy}, progress=True)  # fmt: skip
    err = capsys.readouterr().err
    assert "4/4" in err
    assert "epoch 2/2" in err
    for name in ("loss=", "accuracy=", "val_loss=", "val_accuracy="):
        assert name in err
