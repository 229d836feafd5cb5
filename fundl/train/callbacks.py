"""Callbacks: functions ``callback(epoch, logs, train_state)`` that ``fit`` calls after each
epoch, the early-stopping one, and the progress bar."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fundl.train.state import TrainState

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


def progress_bar(progress: bool | None, total: int | None):
    """A tqdm bar of ``total`` steps (unknown when ``None`` or 0), or ``None`` for none;
    ``progress=None`` shows it only when stderr is a terminal."""
    if not (sys.stderr.isatty() if progress is None else bool(progress)):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total or None, unit="step", dynamic_ncols=True)
