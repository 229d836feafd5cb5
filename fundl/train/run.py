"""The run: checkpoints of a whole run, resuming from them, and the non-finite loss policy.

A checkpoint holds the train state and where the run was: the epoch, the position in it,
the epoch's sums so far, the history, and the shuffle key's data, so a resumed run is
bitwise the same as one never interrupted.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from fundl import checkpoint as ckpt
from fundl.train.placement import Placement
from fundl.train.state import TrainState

__all__ = ["NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """Raised by :func:`fundl.fit` when a loss is NaN or infinite (``on_nonfinite="stop"``).

    ``fit`` checks for a non-finite loss at every epoch's end and before every checkpoint,
    so no checkpoint is written after it: resume from the newest checkpoint (or rerun with
    ``on_nonfinite="skip"``).

    Attributes:
        step: the global step (0-based) whose loss was first non-finite.
        train_state: the :class:`fundl.TrainState` when training stopped (its params may be
            NaN).
    """

    def __init__(self, message: str, step: int, train_state: TrainState):
        super().__init__(message)
        self.step = step
        self.train_state = train_state


def check_nonfinite(train_state: TrainState, epoch: int) -> None:
    """Raises :class:`NonFiniteLossError` when a step recorded a non-finite loss."""
    bad = int(train_state.bad_step)
    if bad >= 0:
        raise NonFiniteLossError(
            f"fit: the loss became NaN or inf at step {bad} (epoch {epoch}); training "
            f"stopped, and no checkpoint was written after that step (resume from the "
            f"newest one). Lower the learning rate, check the data, clip gradients "
            f"(optax.clip_by_global_norm), or pass on_nonfinite='skip'.",
            bad,
            train_state,
        )


class Start(NamedTuple):
    """Where a run starts: fresh, or from its newest checkpoint.

    Attributes:
        train_state: the train state to start from.
        history: the epochs already done.
        epoch: the first epoch to run (from 1).
        position: the steps of ``epoch`` already done.
        sums: ``epoch``'s sums so far (see :func:`fundl.train.steps.accumulate`), or ``None``.
        done: the run has nothing left to do (finished, or stopped by a callback).
    """

    train_state: TrainState
    history: list[dict[str, float]]
    epoch: int = 1
    position: int = 0
    sums: list[float] | None = None
    done: bool = False


class Checkpoints(NamedTuple):
    """A run's checkpoints: where, how often, and the run's identity.

    Attributes:
        manager: a :class:`fundl.checkpoint.CheckpointManager`, or ``None`` for none.
        every: write one every this many steps (and always at the end), or ``None``.
        shuffle_seed: the shuffle key's data; a checkpoint of another seed is refused.
    """

    manager: ckpt.CheckpointManager | None
    every: int | None
    shuffle_seed: list[int]

    def due(self, step_before: int, step_after: int) -> bool:
        """Whether a checkpoint falls between these two global steps."""
        return bool(self.every) and step_after // self.every > step_before // self.every

    def save(self, train_state, epoch, position, sums, history, *, finished=False, stopped=False):
        """Writes the run; never a run whose loss became non-finite over a good one."""
        if self.manager is None or int(train_state.bad_step) >= 0:
            return
        meta = {
            "epoch": epoch,
            "position": position,
            "sums": sums,
            "history": history,
            "finished": finished,
            "stopped": stopped,
            "shuffle_key": self.shuffle_seed,
        }
        self.manager.save(int(train_state.step), train_state, meta)


def open_run(
    directory: str | os.PathLike[str] | None,
    *,
    keep: int,
    every: int | None,
    shuffle_seed: list[int],
) -> Checkpoints:
    """The run's :class:`Checkpoints` in ``directory`` (none when it is ``None``)."""
    manager = None if directory is None else ckpt.CheckpointManager(directory, keep=keep)
    return Checkpoints(manager, every, shuffle_seed)


def start(
    run: Checkpoints, train_state: TrainState, place: Placement, epochs: int, resume: bool
) -> Start:
    """Resumes from the newest checkpoint when there is one (and ``resume``), else starts."""
    if run.manager is None or not resume or run.manager.latest() is None:
        return Start(train_state, [])
    restored, meta = run.manager.restore(train_state)
    if meta.get("shuffle_key") != run.shuffle_seed:
        raise ValueError(
            f"fit: the checkpoint in {os.fspath(run.manager.directory)} was written by a run "
            f"with another key/seed; resume with the same seed or use a new checkpoint_dir."
        )
    done = meta.get("finished") and (meta.get("stopped") or meta["epoch"] > epochs)
    return Start(
        place.put_state(restored),
        meta["history"],
        meta["epoch"],
        meta["position"],
        meta["sums"],
        bool(done),
    )
