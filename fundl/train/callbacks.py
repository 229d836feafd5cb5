"""Callbacks: functions ``callback(epoch, logs, train_state)`` that ``fit`` calls after each
epoch, the early-stopping one, and the progress bar (tqdm.auto: a widget in notebooks, text
in terminals, none in logs)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fundl.train.state import TrainState
from fundl.train.steps import means

__all__ = ["StopTraining", "early_stopping"]

Callback = Callable[[int, dict[str, float], TrainState], Any]


class StopTraining(Exception):
    """Returned or raised by a callback to end ``fit`` after this epoch.

    Both end the run the same way: the other callbacks of the epoch still run, then ``fit``
    writes its final checkpoint and returns.

    Example:
        >>> import fundl as fl
        >>> def stop_at_3(epoch, logs, train_state):
        ...     if epoch == 3:
        ...         raise fl.StopTraining()

    Attributes:
        train_state: a train state to end with (e.g. the best epoch's), or ``None`` to keep
            the current one.
    """

    def __init__(self, train_state: TrainState | None = None):
        super().__init__("a callback stopped training")
        self.train_state = train_state


def call_callbacks(
    callbacks: Sequence[Callback], epoch: int, logs: dict[str, float], train_state: TrainState
) -> StopTraining | None:
    """Calls every callback: ``None``, or a :class:`StopTraining` if one returned or raised
    it (carrying the last train state one of them gave)."""
    stop = None
    for callback in callbacks:
        try:
            result = callback(epoch, logs, train_state)
        except StopTraining as raised:
            result = raised
        if isinstance(result, StopTraining):
            stop = result if stop is None or result.train_state is not None else stop
    return stop


def early_stopping(
    monitor: str = "val_loss",
    *,
    patience: int = 3,
    mode: str = "min",
    min_delta: float = 0.0,
    restore_best: bool = True,
) -> Callback:
    """A callback that stops training when ``monitor`` stops improving.

    Example:
        >>> import fundl as fl
        >>> stop = fl.early_stopping("val_loss", patience=2)
        >>> callable(stop)
        True

    Args:
        monitor: the history key to watch, e.g. ``"val_loss"`` or ``"val_accuracy"``.
        patience: stop after this many epochs in a row without improvement (as Keras;
            0 and 1 both stop at the first epoch that does not improve).
        mode: ``"min"`` (lower is better) or ``"max"``.
        min_delta: the smallest change that counts as an improvement.
        restore_best: when stopping, put back the params (and model state) of the best
            epoch, so ``fit`` ends with them; the optimizer state and step stay current.

    Returns:
        ``callback(epoch, logs, train_state)`` for ``fit(callbacks=...)``. It keeps its
        best value between calls, so make a new one per run.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"early_stopping: mode must be 'min' or 'max', got {mode!r}.")
    if not isinstance(patience, int) or patience < 0:
        raise ValueError(f"early_stopping: patience must be an int >= 0, got {patience!r}.")
    sign = 1.0 if mode == "min" else -1.0
    memo: dict[str, Any] = {"best": math.inf, "wait": 0, "state": None}

    def callback(epoch: int, logs: dict[str, float], train_state: TrainState):
        del epoch
        if monitor not in logs:
            raise ValueError(
                f"early_stopping: monitor {monitor!r} is not in the epoch's logs "
                f"{sorted(logs)}. Pass eval_data to fit for 'val_*' metrics."
            )
        value = sign * float(logs[monitor])
        if value < memo["best"] - min_delta:
            memo.update(best=value, wait=0)
            if restore_best:  # a host copy: fit donates the device buffers to the next step
                memo["state"] = jax.device_get((train_state.params, train_state.state))
            return None
        memo["wait"] += 1
        if memo["wait"] >= patience:
            if restore_best and memo["state"] is not None:
                params, state = jax.tree_util.tree_map(jnp.asarray, memo["state"])
                return StopTraining(train_state._replace(params=params, state=state))
            return StopTraining(None)
        return None

    return callback


def show_progress(progress: bool | None) -> bool:
    """Whether ``fit`` shows its bar: ``progress`` when given; for ``None``, in a terminal or
    a Jupyter notebook, and not where stderr goes to a file or a pipe (CI logs, ``nohup``),
    where a bar redrawn in place is noise."""
    if progress is not None:
        return bool(progress)
    stderr = sys.stderr
    return (stderr is not None and stderr.isatty()) or in_notebook()


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (notebook, JupyterLab, VS Code, Colab)."""
    ipython = sys.modules.get("IPython")  # a kernel has imported it; never imported here
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(shell, "kernel", None) is not None  # terminal IPython has no kernel


def progress_bar(
    progress: bool | None,
    total: int | None,
    names: Sequence[str] = (),
    epochs: int | None = None,
    *,
    every: float = 1.0,
    file: Any = None,
) -> ProgressBar | None:
    """``fit``'s bar of ``total`` steps (unknown when ``None`` or 0), or ``None`` for none
    (see :func:`show_progress`). ``names`` are the step's logged values (``loss``, then the
    metrics) in the order of ``fit``'s device sums; ``file`` defaults to stderr."""
    if not show_progress(progress):
        return None
    from tqdm.auto import tqdm  # a widget in a notebook, text elsewhere

    bar = tqdm(total=total or None, unit="step", dynamic_ncols=True, file=file)
    return ProgressBar(bar, tuple(names), epochs, every)


class ProgressBar:
    """``fit``'s tqdm bar: the epoch on its description, the logs on its postfix.

    During an epoch the postfix shows the epoch's running means (and the last epoch's
    ``val_*``). They come from the device sums ``acc`` that ``fit`` folds each step's logs
    into; reading them waits for the steps queued so far (a device-to-host transfer), so
    :meth:`update` reads them at most once every ``every`` seconds, never once per step. At
    the epoch's end :meth:`set_postfix` shows its full logs.
    """

    def __init__(self, bar: Any, names: tuple[str, ...], epochs: int | None, every: float):
        self.bar, self.names, self.epochs, self.every = bar, names, epochs, every
        self.read_at = time.monotonic()  # when acc was last read
        self.val: dict[str, Any] = {}  # the last epoch's val_* logs

    def start_epoch(self, epoch: int) -> None:
        """Shows ``epoch i/n`` (``epoch i`` when the number of epochs is unknown)."""
        of = "" if self.epochs is None else f"/{self.epochs}"
        self.bar.set_description(f"epoch {epoch}{of}", refresh=False)

    def update(self, steps: int, acc: jax.Array | None = None) -> None:
        """Advances ``steps``; with ``acc`` (the epoch's sums on the device, see
        ``fundl.train.steps.accumulate``), shows its running means when ``every`` seconds
        have passed since the last read."""
        if acc is not None and self.names and time.monotonic() - self.read_at >= self.every:
            self.read_at = time.monotonic()
            running = means(acc, list(self.names))
            self.bar.set_postfix(format_logs({**running, **self.val}), refresh=False)
        self.bar.update(steps)

    def set_postfix(self, logs: Mapping[str, Any]) -> None:
        """Shows the epoch's logs (its history entry; ``epoch`` is on the description)."""
        logs = {k: v for k, v in logs.items() if k != "epoch"}
        self.val = {k: v for k, v in logs.items() if k.startswith("val_")}
        self.bar.set_postfix(format_logs(logs))

    def close(self) -> None:
        self.bar.close()


def format_logs(logs: Mapping[str, Any]) -> dict[str, str]:
    """``{name: "0.1234"}``: numbers in ``.4g``, strings as they are."""
    return {k: v if isinstance(v, str) else f"{v:.4g}" for k, v in logs.items()}
