"""Batch sources: in-memory arrays and iterables of batches behind one interface.

A source has an ``example`` batch (for init and the checks), a ``feed`` (what every step
reads on the devices), and ``blocks(epoch, start, k, policy)``, an iterator of
:class:`Block` values; inside the compiled step, ``take(feed, block.rows)`` gives the batch
as ``(inputs, targets, mask)``.

- :class:`InMemory`: ``(inputs, targets)`` arrays with a leading example axis. The feed is
  the whole data, put on the devices once; a block's rows are the example indices of its
  steps (``-1`` for padding), so a step gathers its batch on the device and ``K`` steps run
  in one call.
- :class:`Iterable`: an iterable of ``(inputs, targets)`` batches, read afresh each epoch.
  The feed is empty; a block's rows are one (padded) batch with its mask.

A partial batch is padded and masked (one compiled shape), or, where the :class:`Policy`
says so (a model with state, such as batch norm's statistics), run at its own size, so
padding never enters the state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from collections.abc import Iterable as IterableABC
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__: list[str] = []


class Block(NamedTuple):
    """One call's worth of a source.

    Attributes:
        rows: what ``take`` reads: in memory, int32 example indices of shape ``(batch,)``,
            or ``(steps, batch)`` when ``steps > 1`` (``-1`` marks padding); for an iterable,
            the batch ``(inputs, targets, mask)``, on the devices.
        steps: how many steps the block holds.
        position: the epoch's position after the block (steps done), for checkpoints.
    """

    rows: Any
    steps: int
    position: int


class Policy(NamedTuple):
    """How a run treats its batches.

    Attributes:
        check: ``check(inputs, targets, what, where)`` raises on bad data (see
            :func:`check_batch`), or ``None`` for no checks.
        own_size: ``own_size(size)``: a partial batch of this size runs unpadded.
        per_example: the loss returns per-example values, so padding can be masked.
        put: puts a host batch on the devices.
    """

    check: Callable[[Any, Any, str, str], None] | None
    own_size: Callable[[int], bool]
    per_example: bool
    put: Callable[[Any], Any]


def n_examples(tree: Any) -> int:
    """The leading (example) axis of the first leaf of ``tree``."""
    return int(np.shape(jax.tree_util.tree_leaves(tree)[0])[0])


def unpack_batch(batch: Any, who: str) -> tuple[Any, Any, Any]:
    """``(inputs, targets, mask)`` of a batch ``(inputs, targets)`` or ``(inputs, targets,
    mask)`` (``mask`` is ``None`` when absent)."""
    if not isinstance(batch, tuple | list) or len(batch) not in (2, 3):
        raise TypeError(
            f"{who}: a batch is a tuple (inputs, targets) or (inputs, targets, mask), got "
            f"{type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, tuple | list) else "")
            + ". Wrap your arrays, e.g. step(train_state, (x, y))."
        )
    inputs, targets = batch[0], batch[1]
    mask = batch[2] if len(batch) == 3 else None
    return inputs, targets, mask


# --------------------------------------------------------------------------------------
# Checks


def check_batch(out_spec: Any, inputs: Any, targets: Any, what: str, where: str = "") -> None:
    """Raises a ``ValueError`` on NaN/inf in the data or integer labels outside the model's
    classes (integer targets of shape ``outputs.shape[:-1]`` are class ids)."""
    _check_finite(inputs, f"{what} inputs", where)
    _check_finite(targets, f"{what} targets", where)
    _check_labels(out_spec, targets, f"{what} targets", where)


def _check_finite(tree: Any, what: str, where: str) -> None:
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        arr = np.asarray(x)
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            bad = np.argwhere(~np.isfinite(arr))[0]
            raise ValueError(
                f"fit: {what}{jax.tree_util.keystr(path)}{where} contains NaN or inf "
                f"(first at index {tuple(int(i) for i in bad)}). Clean or impute the data "
                f"before training."
            )


def _check_labels(outputs_spec: Any, targets: Any, what: str, where: str) -> None:
    if not hasattr(outputs_spec, "shape") or not hasattr(targets, "dtype"):
        return
    t = np.asarray(targets)
    if not np.issubdtype(t.dtype, np.integer) or tuple(t.shape[1:]) != tuple(
        outputs_spec.shape[1:-1]
    ):
        return
    classes = outputs_spec.shape[-1]
    if t.size and (t.min() < 0 or t.max() >= classes):
        bad = t.min() if t.min() < 0 else t.max()
        raise ValueError(
            f"fit: {what}{where} has the label {int(bad)}, outside 0..{classes - 1} for a "
            f"model with {classes} outputs. Give the last layer as many units as classes, or "
            f"remap the labels."
        )


# --------------------------------------------------------------------------------------
# In-memory data


class InMemory(NamedTuple):
    """``(inputs, targets)`` arrays with a leading example axis ``(n, ...)``.

    Attributes:
        inputs: an array or pytree of arrays, ``(n, ...)``.
        targets: the same for the targets.
        batch_size: examples per step.
        shuffle: draw a new order every epoch (from ``seed`` and the epoch).
        drop_remainder: drop the last partial batch instead of running it.
        seed: the shuffle's seed, a list of ints (the data of a PRNG key).
        what: the data's name in messages.
    """

    inputs: Any
    targets: Any
    batch_size: int
    shuffle: bool
    drop_remainder: bool
    seed: list[int]
    what: str

    @property
    def example(self) -> tuple[Any, Any]:
        return jax.tree_util.tree_map(lambda x: x[: self.batch_size], (self.inputs, self.targets))

    @property
    def steps(self) -> int:
        n, size = n_examples(self.inputs), self.batch_size
        return n // size if self.drop_remainder else -(-n // size)

    @property
    def feed(self) -> tuple[Any, Any]:
        return self.inputs, self.targets

    @staticmethod
    def take(feed: Any, rows: jax.Array) -> tuple[Any, Any, jax.Array]:
        index = jnp.maximum(rows, 0)
        inputs, targets = jax.tree_util.tree_map(lambda a: jnp.take(a, index, axis=0), feed)
        return inputs, targets, rows >= 0

    def tail(self) -> int:
        """The size of the last partial batch, 0 when there is none."""
        return 0 if self.drop_remainder else n_examples(self.inputs) % self.batch_size

    def validate(self, policy: Policy) -> None:
        """Checks the whole data once, before training."""
        if policy.check is not None:
            policy.check(self.inputs, self.targets, self.what, "")
        tail = self.tail()
        if tail and not policy.per_example and not policy.own_size(tail):
            n = n_examples(self.inputs)
            raise ValueError(
                f"fit: the loss returns a scalar, so the last partial batch ({tail} of {n} "
                f"examples with batch_size={self.batch_size}) cannot be masked. Return "
                f"per-example losses (e.g. optax's losses without .mean()) or pass "
                f"drop_remainder=True."
            )

    def plan(self, epoch: int) -> np.ndarray:
        """The epoch's example indices, ``(steps, batch_size)`` int32, ``-1`` for padding."""
        n, size = n_examples(self.inputs), self.steps * self.batch_size
        order = np.arange(n)
        if self.shuffle:  # NumPy's generator seeded by the key's data and the epoch
            order = np.random.default_rng([*self.seed, epoch]).permutation(n)
        idx = np.full((size,), -1, np.int32)
        idx[: min(n, size)] = order[: min(n, size)]
        return idx.reshape(self.steps, self.batch_size)

    def blocks(self, epoch: int, start: int, k: int, policy: Policy) -> Iterator[Block]:
        """Blocks of ``k`` steps from position ``start``; single steps where ``k`` does not
        fit, and the partial batch at its own size where the policy says so."""
        idx, steps, tail = self.plan(epoch), self.steps, self.tail()
        own_tail = bool(tail) and policy.own_size(tail)
        blocks_end = steps - 1 if own_tail else steps  # an own-size tail runs alone
        pos = start
        while pos < steps:
            if k > 1 and pos + k <= blocks_end:
                yield Block(idx[pos : pos + k], k, pos + k)
                pos += k
            elif own_tail and pos == steps - 1:
                yield Block(idx[pos][:tail], 1, pos + 1)  # the partial batch, at its own size
                pos += 1
            else:
                yield Block(idx[pos], 1, pos + 1)
                pos += 1


# --------------------------------------------------------------------------------------
# Iterables of batches


class Iterable(NamedTuple):
    """An iterable of ``(inputs, targets)`` batches, iterated afresh each epoch.

    Attributes:
        data: the batches: a list, or any object whose ``__iter__`` starts a new pass (a
            one-shot iterator serves one pass).
        first: the first batch, read ahead for the example; every batch needs its shapes
            (a smaller one is padded or run at its own size).
        what: the data's name in messages.
    """

    data: IterableABC[Any]
    first: Any
    what: str

    @property
    def example(self) -> tuple[Any, Any]:
        inputs, targets, _ = unpack_batch(self.first, f"fit: {self.what}")
        return inputs, targets

    steps = None
    feed = ()

    @staticmethod
    def take(feed: Any, rows: Any) -> tuple[Any, Any, Any]:
        del feed
        return rows

    def validate(self, policy: Policy) -> None:
        """Nothing to check before the run: each batch is checked as it is read."""
        del policy

    def blocks(self, epoch: int, start: int, k: int, policy: Policy) -> Iterator[Block]:
        """One block per batch from position ``start``: checked, padded and put on the
        devices."""
        del k
        full, spec = n_examples(self.example[0]), _spec(self.example)
        prefix = "fit: " if self.what == "train_data" else f"fit: {self.what} "
        seen = False
        for i, batch in enumerate(self.data):
            seen = True
            if i < start:  # resuming: skip the batches already trained on
                continue
            inputs, targets, _ = unpack_batch(batch, f"fit: {self.what}")
            size = n_examples(inputs)
            if _spec((inputs, targets)) != spec or size > full:
                raise ValueError(
                    f"{prefix}batch {i} of epoch {epoch} has batch size {size} and per-example "
                    f"shapes/dtypes {_spec((inputs, targets))}, unlike the first batch (batch "
                    f"size {full}, {spec}). Every batch needs the first batch's shape (only a "
                    f"smaller last batch is padded); a new shape would recompile the step."
                )
            where = f" (batch {i} of epoch {epoch})"
            if policy.check is not None:
                policy.check(inputs, targets, self.what, where)
            own = size < full and policy.own_size(size)
            if size < full and not policy.per_example and not own:
                raise ValueError(
                    f"{prefix}batch {i} of epoch {epoch} is smaller than the first ({size} < "
                    f"{full}) and the loss returns a scalar, so it cannot be padded and masked. "
                    f"Return per-example losses."
                )
            yield Block(policy.put(pad_batch((inputs, targets), size if own else full)), 1, i + 1)
        if not seen:
            raise ValueError(
                f"fit: {self.what} gave no batches in epoch {epoch}. A one-shot iterator (a "
                f"generator) is read once; pass a re-iterable object (a list, or one whose "
                f"__iter__ starts a new pass) or epochs=1."
            )


def _spec(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: (tuple(np.shape(x)[1:]), np.dtype(x.dtype)), tree)


def pad_batch(batch: tuple[Any, Any], size: int) -> tuple[Any, Any, np.ndarray]:
    """``(inputs, targets, mask)``: the batch padded with zeros to ``size`` examples."""
    n = n_examples(batch)
    mask = np.arange(size) < n

    def pad(x):
        x = np.asarray(x)
        return np.concatenate([x, np.zeros((size - n, *x.shape[1:]), x.dtype)])

    padded = jax.tree_util.tree_map(pad, batch) if n < size else batch
    return padded[0], padded[1], mask


def _chain_first(first: Any, rest: IterableABC[Any]) -> Iterator[Any]:
    yield first
    yield from rest


# --------------------------------------------------------------------------------------
# Making a source


def batches(
    data: Any,
    batch_size: int,
    *,
    shuffle: bool = False,
    drop_remainder: bool = False,
    seed: list[int] | None = None,
    what: str = "train_data",
) -> InMemory | Iterable:
    """The source for ``data``: :class:`InMemory` for a tuple of arrays, else :class:`Iterable`.

    Only a tuple is ``(inputs, targets)``; a list is a list of batches (even of two).
    """
    if _is_in_memory(data):
        inputs, targets = _as_pair(data, what)
        return InMemory(inputs, targets, batch_size, shuffle, drop_remainder, seed or [], what)
    if isinstance(data, tuple) and len(data) == 2:
        _as_pair(data, what)  # a clear error for arrays mixed with others
    try:
        first = next(iter(data))
    except TypeError:
        raise TypeError(
            f"fit: {what} must be a tuple (inputs, targets) of arrays with a leading example "
            f"axis, or an iterable of such batches; got {type(data).__name__}."
        ) from None
    except StopIteration:
        raise ValueError(f"fit: {what} is an empty iterable.") from None
    unpack_batch(first, f"fit: {what}")
    one_shot = iter(data) is data  # a generator: feed the batch read ahead first
    return Iterable(_chain_first(first, data) if one_shot else data, first, what)


def eval_batches(data: Any, batch_size: int, shards: int) -> InMemory | Iterable:
    """The source of held-out data: in order, every example once (the last batch padded);
    in-memory batches are at most ``batch_size``, a multiple of ``shards`` devices."""
    if not _is_in_memory(data):
        return batches(data, batch_size, what="eval_data")
    inputs, targets = _as_pair(data, "eval_data")
    size = -(-min(batch_size, n_examples(inputs)) // shards) * shards
    return InMemory(inputs, targets, size, False, False, [], "eval_data")


def _is_in_memory(data: Any) -> bool:
    return (
        isinstance(data, tuple)
        and len(data) == 2
        and all(
            hasattr(x, "shape") and hasattr(x, "dtype") for x in jax.tree_util.tree_leaves(data)
        )
    )


def _as_pair(data: Any, what: str) -> tuple[Any, Any]:
    if not isinstance(data, tuple | list) or len(data) != 2:
        raise TypeError(
            f"fit: {what} must be a tuple (inputs, targets) of arrays with a leading example "
            f"axis, or an iterable of such batches; got {type(data).__name__}."
        )
    inputs, targets = data
    leaves = jax.tree_util.tree_leaves((inputs, targets))
    sizes = {int(np.shape(x)[0]) if np.ndim(x) else -1 for x in leaves}
    if len(sizes) != 1 or -1 in sizes:
        shapes = [np.shape(x) for x in leaves]
        raise ValueError(
            f"fit: every array of {what} needs the same leading example axis, got shapes {shapes}."
        )
    return inputs, targets
