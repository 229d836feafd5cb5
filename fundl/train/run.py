"""The run: checkpoints of a whole run, resuming from them, and the non-finite loss policy.

A checkpoint holds the train state and where the run was: the epoch, the position in it,
the epoch's sums so far, the history, and the shuffle key's data, so a resumed run is
bitwise the same as one never interrupted. A train state on one device goes to one ``.npz``
file (:mod:`fundl.checkpoint`); one spread over a mesh goes to a sharded checkpoint
(:mod:`fundl.sharded_checkpoint`, orbax-checkpoint), each process writing its own shards.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax

from fundl import checkpoint as ckpt
from fundl import sharded_checkpoint as sharded
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
        directory: where the checkpoints live, or ``None`` for none.
        keep: how many of the newest to keep.
        every: write one every this many steps (and always at the end), or ``None``.
        shuffle_seed: the shuffle key's data; a checkpoint of another seed is refused.
    """

    directory: str | os.PathLike[str] | None
    keep: int
    every: int | None
    shuffle_seed: list[int]

    def manager(self, train_state: TrainState) -> Any:
        """The checkpoints of a run with this train state: ``.npz`` files on one device, a
        :class:`fundl.sharded_checkpoint.ShardedCheckpointManager` on a mesh."""
        if spans_devices(train_state):
            return sharded.ShardedCheckpointManager(self.directory, keep=self.keep)
        return ckpt.CheckpointManager(self.directory, keep=self.keep)

    def due(self, step_before: int, step_after: int) -> bool:
        """Whether a checkpoint falls between these two global steps."""
        return bool(self.every) and step_after // self.every > step_before // self.every

    def save(self, train_state, epoch, position, sums, history, *, finished=False, stopped=False):
        """Writes the run; never a run whose loss became non-finite over a good one."""
        if self.directory is None or int(train_state.bad_step) >= 0:
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
        self.manager(train_state).save(int(train_state.step), train_state, meta)


def spans_devices(tree: Any) -> bool:
    """Whether any leaf of ``tree`` lies on more than one device (a mesh)."""
    shardings = (getattr(x, "sharding", None) for x in jax.tree_util.tree_leaves(tree))
    return any(s is not None and len(s.device_set) > 1 for s in shardings)


def open_run(
    directory: str | os.PathLike[str] | None,
    *,
    keep: int,
    every: int | None,
    shuffle_seed: list[int],
) -> Checkpoints:
    """The run's :class:`Checkpoints` in ``directory`` (none when it is ``None``)."""
    return Checkpoints(directory, keep, every, shuffle_seed)


def start(
    run: Checkpoints, train_state: TrainState, place: Placement, epochs: int, resume: bool
) -> Start:
    """Resumes from the newest checkpoint when there is one (and ``resume``), else starts.

    ``train_state`` is on its devices already (``place.put_state``); a sharded checkpoint
    is restored straight onto its shardings.
    """
    if run.directory is None:
        return Start(train_state, [])
    manager = run.manager(train_state)  # on a mesh: fails now where orbax is missing
    if not resume:
        return Start(train_state, [])
    if manager.latest() is None:
        _check_no_other_kind(run.directory, manager)
        return Start(train_state, [])
    restored, meta = manager.restore(train_state)
    if meta.get("shuffle_key") != run.shuffle_seed:
        raise ValueError(
            f"fit: the checkpoint in {os.fspath(run.directory)} was written by a run "
            f"with another key/seed; resume with the same seed or use a new checkpoint_dir."
        )
    done = meta.get("finished") and (meta.get("stopped") or meta["epoch"] > epochs)
    on_mesh = isinstance(manager, sharded.ShardedCheckpointManager)
    return Start(
        restored if on_mesh else place.put_state(restored),
        meta["history"],
        meta["epoch"],
        meta["position"],
        meta["sums"],
        bool(done),
    )


def _check_no_other_kind(directory: str | os.PathLike[str], manager: Any) -> None:
    """Refuses to start afresh next to the other kind of checkpoint of a run (one written
    on a mesh, resumed on one device, or the other way round)."""
    on_mesh = isinstance(manager, sharded.ShardedCheckpointManager)
    others = (
        ckpt.CheckpointManager(directory).steps() if on_mesh else sharded.sharded_steps(directory)
    )
    if others:
        written, now = ("on one device", "on a mesh") if on_mesh else ("on a mesh", "on one device")
        raise ValueError(
            f"fit: {os.fspath(directory)} holds checkpoints of a run {written} (steps "
            f"{others}), and this run is {now}. Resume it {written}, or use a new "
            f"checkpoint_dir."
        )
