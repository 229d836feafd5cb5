"""The training loop as a small combinator: pure jitted steps, and ``fit`` that drives them.

Batches are ``(inputs, targets)`` tuples (or ``(inputs, targets, mask)``): the model is
applied to ``inputs`` (one array or one pytree passed as the model's single input), and the
loss is called as ``loss(outputs, targets)``, so optax's losses work as they are:
``optax.softmax_cross_entropy_with_integer_labels`` returns per-example values of shape
``(batch,)``, and the step averages them over the examples whose ``mask`` is true (all of
them when there is no mask). A loss may also return a scalar (already averaged); ``fit``
then needs ``drop_remainder=True`` when the batch size does not divide the data, because a
scalar cannot be re-weighted to ignore padding.

Metrics are plain functions ``metric(outputs, targets) -> values`` in the same shape rules
(per-example values are mask-averaged); a metric whose signature has a ``mask`` keyword (such
as :func:`fundl.accuracy`) receives the mask instead.

Several hosts: the same code runs on a multi-host cluster. Call
``jax.distributed.initialize()`` at the start of every process (on CPU, with
``jax.config.update("jax_cpu_collectives_implementation", "gloo")`` first), build the mesh
over all hosts' devices (``jax.make_mesh((jax.device_count(),), ("data",))``) and pass it as
``fit(..., mesh=mesh)``. Every process runs the same script with the same in-memory data and
seed: the shuffle is derived from the key, so all draw the same batches, and each builds only
its own devices' shards. Give each process its own ``checkpoint_dir`` (e.g. on local disk).
The suite tests two processes on loopback.
"""

from __future__ import annotations

import inspect
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fundl.core import Layer, layer_name
from fundl.metrics import masked_mean

__all__ = [
    "TrainState",
    "NonFiniteLossError",
    "init_train_state",
    "train_step",
    "eval_step",
    "fit",
    "evaluate",
    "early_stopping",
    "freeze",
    "load_params",
    "StopTraining",
]

Loss = Callable[[Any, Any], jax.Array]
Metric = Callable[..., jax.Array]


class TrainState(NamedTuple):
    """Everything a training run carries from step to step: a pytree of arrays.

    Attributes:
        params: the model's params (a pytree of float arrays).
        state: the model's non-trained state (e.g. batch-norm statistics), ``()`` if none.
        opt_state: the optax optimizer's state.
        step: int32 scalar, the number of batches consumed so far.
        key: the run's PRNG key; the step ``s`` uses ``jax.random.fold_in(key, s)`` for
            dropout, so every step draws fresh masks and runs with one seed are identical.
        bad_step: int32 scalar, ``-1``, or the first step whose loss was non-finite (with
            ``on_nonfinite="stop"``).
    """

    params: Any
    state: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array
    bad_step: jax.Array


class NonFiniteLossError(FloatingPointError):
    """Raised by :func:`fit` when a loss is NaN or infinite (``on_nonfinite="stop"``).

    ``fit`` checks for a non-finite loss at every epoch's end and before every checkpoint,
    so no checkpoint is written after it: resume from the newest checkpoint (or rerun with
    ``on_nonfinite="skip"``).

    Attributes:
        step: the global step (0-based) whose loss was first non-finite.
        train_state: the :class:`TrainState` when training stopped (its params may be NaN).
    """

    def __init__(self, message: str, step: int, train_state: TrainState):
        super().__init__(message)
        self.step = step
        self.train_state = train_state


def init_train_state(
    model: Layer,
    optimizer: optax.GradientTransformation,
    key: jax.Array,
    example_inputs: Any,
    *,
    params: Any = None,
) -> TrainState:
    """Initializes the model and the optimizer into a :class:`TrainState`.

    Args:
        model: the model.
        optimizer: an optax ``GradientTransformation``.
        key: a PRNG key; split into the init key and the run's step key.
        example_inputs: an example input (array or ``jax.ShapeDtypeStruct``), e.g. a batch
            of shape ``(batch, ...)``; only shapes and dtypes are read.
        params: start from these params instead of fresh ones (pretrained, or made with
            :func:`load_params`); the optimizer state is built for them. Their tree, shapes
            and dtypes must be those ``model.init`` makes.

    Returns:
        A :class:`TrainState` at step 0.

    Raises:
        ValueError: ``params`` do not fit the model, naming the first path that differs.
    """
    init_key, step_key = jax.random.split(key)
    fresh, state = model.init(init_key, example_inputs)
    if params is None:
        params = fresh
    else:
        try:
            _check_same_tree(fresh, params, "init_train_state: params", "for this model")
        except ValueError as err:
            raise ValueError(
                f"{err} Pass params made by this model's init (or loaded into them with "
                f"fl.load_params)."
            ) from None
        params = jax.tree_util.tree_map(jnp.asarray, params)
    return TrainState(
        params=params,
        state=state,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        key=step_key,
        bad_step=jnp.full((), -1, jnp.int32),
    )


# --------------------------------------------------------------------------------------
# Steps


def _unpack_batch(batch: Any, who: str) -> tuple[Any, Any, Any]:
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


def _n_examples(tree: Any) -> int:
    return int(jnp.shape(jax.tree_util.tree_leaves(tree)[0])[0])


def _reduce(values: jax.Array, mask: jax.Array | None, what: str) -> jax.Array:
    values = jnp.asarray(values)
    if values.ndim == 0:
        return values
    if mask is None:
        return jnp.mean(values)
    if values.shape[0] != mask.shape[0]:
        raise ValueError(
            f"{what} returned values of shape {values.shape}, expected per-example values "
            f"(batch={mask.shape[0]}, ...) or a scalar."
        )
    m = mask.reshape(mask.shape + (1,) * (values.ndim - 1))
    return masked_mean(values, jnp.broadcast_to(m, values.shape))


def _wants_mask(fn: Callable[..., Any]) -> bool:
    try:
        return "mask" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _normalize_metrics(metrics: Mapping[str, Metric] | None) -> dict[str, Metric]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"metrics must be a dict of name -> function(outputs, targets), got "
            f"{type(metrics).__name__}. E.g. metrics={{'accuracy': fl.accuracy}}."
        )
    for name, fn in metrics.items():
        if not callable(fn):
            raise TypeError(f"metrics[{name!r}] must be a function, got {type(fn).__name__}.")
        if name == "loss":
            raise ValueError("metrics: the name 'loss' is reserved for the loss; pick another.")
    return dict(metrics)


def _compute_metrics(metrics, outputs, targets, mask):
    out = {}
    for name, fn in metrics.items():
        if _wants_mask(fn):
            value = fn(outputs, targets, mask=mask)
        else:
            value = _reduce(fn(outputs, targets), mask, f"metric {name!r}")
        out[name] = jnp.asarray(value, jnp.float32)
    return out


def _upcast(outputs: Any) -> Any:
    """Casts low-precision floating outputs (bf16, f16) to float32 before the loss."""

    def cast(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4:
            return x.astype(jnp.float32)
        return x

    return jax.tree_util.tree_map(cast, outputs)


def _make_core(model, loss, optimizer, metrics, on_nonfinite, loss_scale):
    if on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}.")
    metrics = _normalize_metrics(metrics)
    scale = 1.0 if loss_scale is None else float(loss_scale)

    def core(ts: TrainState, inputs, targets, mask, run_key=None):
        key = jax.random.fold_in(ts.key if run_key is None else run_key, ts.step)

        def objective(params):
            outputs, new_state = model.apply(params, ts.state, inputs, key=key, train=True)
            value = _reduce(loss(_upcast(outputs), targets), mask, "loss")
            return value * jnp.asarray(scale, value.dtype), (value, outputs, new_state)

        grads, (value, outputs, new_state) = jax.grad(objective, has_aux=True)(ts.params)
        if loss_scale is not None:
            grads = jax.tree_util.tree_map(lambda g: g / jnp.asarray(scale, g.dtype), grads)
        finite = jnp.isfinite(value)
        if loss_scale is not None:  # an f16 overflow shows up in the grads first
            leaves = jax.tree_util.tree_leaves(grads)
            finite = finite & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in leaves]))
        ok = finite & (ts.bad_step < 0)

        def update(grads, params, opt_state, state, new_state):
            del state
            # optax is not clean under strict dtype promotion (adam's bias correction computes
            # `1 - decay**count` with an int32 count), so its update runs under standard rules.
            with jax.numpy_dtype_promotion("standard"):
                updates, opt_state = optimizer.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state, new_state

        def keep(grads, params, opt_state, state, new_state):
            del grads, new_state
            return params, opt_state, state

        args = (grads, ts.params, ts.opt_state, ts.state, new_state)
        if on_nonfinite == "skip":
            params, opt_state, state = jax.lax.cond(ok, update, keep, *args)
        else:
            # No guard in the step: a cond (or a where) around the update doubles the time of
            # a small model's step on CPU (measured: the seed MLP, 250 vs 130 us). fit checks
            # bad_step before every checkpoint and at every epoch's end instead.
            params, opt_state, state = update(*args)
        bad_step = ts.bad_step
        if on_nonfinite == "stop":
            bad_step = jnp.where((ts.bad_step < 0) & ~finite, ts.step, ts.bad_step)
        new = ts._replace(
            params=params, state=state, opt_state=opt_state, step=ts.step + 1, bad_step=bad_step
        )
        logs = {"loss": jnp.asarray(value, jnp.float32)}
        logs.update(_compute_metrics(metrics, outputs, targets, mask))
        logs["skipped"] = (~finite).astype(jnp.int32)
        logs["count"] = (
            jnp.sum(mask.astype(jnp.int32))
            if mask is not None
            else jnp.asarray(_n_examples(inputs), jnp.int32)
        )
        return new, logs

    return core


def train_step(
    model: Layer,
    loss: Loss,
    optimizer: optax.GradientTransformation,
    metrics: Mapping[str, Metric] | None = None,
    *,
    on_nonfinite: str = "stop",
    loss_scale: float | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    r"""Builds the jitted training step ``step(train_state, batch) -> (train_state, logs)``.

    One step is the guide's four: forward pass (``model.apply(..., train=True)`` with the key
    ``fold_in(train_state.key, train_state.step)``), loss, backward pass (``jax.grad``) and
    optax update. The train state is donated to XLA, so its buffers are reused in place: do
    not use the ``train_state`` you passed in after the call.

    Example:
        >>> import jax, jax.numpy as jnp, optax, fundl as fl
        >>> model = fl.serial(fl.dense(8), jax.nn.relu, fl.dense(3))
        >>> opt = optax.sgd(0.1)
        >>> ts = fl.init_train_state(model, opt, jax.random.key(0), jnp.zeros((4, 5)))
        >>> step = fl.train_step(model, optax.softmax_cross_entropy_with_integer_labels, opt)
        >>> ts, logs = step(ts, (jnp.ones((4, 5)), jnp.array([0, 1, 2, 0])))
        >>> int(ts.step), sorted(logs)
        (1, ['count', 'loss', 'skipped'])

    Args:
        model: the model.
        loss: ``loss(outputs, targets)``, per-example values of shape ``(batch, ...)``
            (averaged over the masked examples) or a scalar. Low-precision floating outputs
            (bfloat16, float16) are cast to float32 before the loss.
        optimizer: an optax ``GradientTransformation`` (schedules go inside it).
        metrics: optional ``{name: metric(outputs, targets)}`` (see the module docstring).
        on_nonfinite: ``"stop"``: the first step with a NaN/inf loss is recorded in
            ``train_state.bad_step`` (the update is applied; :func:`fit` then raises
            :class:`NonFiniteLossError` and writes no checkpoint after it); ``"skip"``: a step
            with a non-finite loss leaves params, model state and optimizer state unchanged
            (a ``lax.cond``; ``logs["skipped"]`` is 1) and training continues.
        loss_scale: a static loss-scaling factor for float16 compute: the loss is multiplied
            by it before ``jax.grad`` and the grads divided after, so small float16 grads do
            not underflow; a step whose grads overflow is treated as non-finite (use
            ``on_nonfinite="skip"`` to skip such steps).

    Returns:
        ``step(train_state, batch)``; ``batch`` is ``(inputs, targets)`` or ``(inputs,
        targets, mask)`` with ``mask`` booleans of shape ``(batch,)``. ``logs`` holds float32
        scalars ``loss`` and one per metric (means over the batch's valid examples),
        ``skipped`` and ``count`` (the number of valid examples).
    """
    core = _make_core(model, loss, optimizer, metrics, on_nonfinite, loss_scale)

    def step(train_state, batch):
        inputs, targets, mask = _unpack_batch(batch, "train_step")
        return core(train_state, inputs, targets, mask)

    step.__name__ = f"train_step({layer_name(model)})"
    return jax.jit(step, donate_argnums=0)


def _make_eval(model, loss, metrics):
    metrics = _normalize_metrics(metrics)

    def core(ts: TrainState, inputs, targets, mask):
        outputs, _ = model.apply(ts.params, ts.state, inputs, train=False)
        logs = {"loss": jnp.asarray(_reduce(loss(_upcast(outputs), targets), mask, "loss"))}
        logs["loss"] = logs["loss"].astype(jnp.float32)
        logs.update(_compute_metrics(metrics, outputs, targets, mask))
        logs["count"] = (
            jnp.sum(mask.astype(jnp.int32))
            if mask is not None
            else jnp.asarray(_n_examples(inputs), jnp.int32)
        )
        return logs

    return core


def eval_step(
    model: Layer, loss: Loss, metrics: Mapping[str, Metric] | None = None
) -> Callable[[TrainState, Any], dict[str, jax.Array]]:
    """Builds the jitted evaluation step ``evaluate(train_state, batch) -> logs``.

    The model runs with ``train=False`` and no key; no gradient is taken and the train state
    is not changed (nor donated).

    Args:
        model: the model.
        loss: as in :func:`train_step`.
        metrics: as in :func:`train_step`.

    Returns:
        ``evaluate(train_state, batch)`` returning ``loss``, the metrics and ``count``.
    """
    core = _make_eval(model, loss, metrics)

    def evaluate(train_state, batch):
        inputs, targets, mask = _unpack_batch(batch, "eval_step")
        return core(train_state, inputs, targets, mask)

    return jax.jit(evaluate)


# --------------------------------------------------------------------------------------
# Data


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


def _is_in_memory(data: Any) -> bool:
    # Only a tuple is (inputs, targets); a list is a list of batches (even of two).
    return (
        isinstance(data, tuple)
        and len(data) == 2
        and all(
            hasattr(x, "shape") and hasattr(x, "dtype") for x in jax.tree_util.tree_leaves(data)
        )
    )


def _check_finite(tree: Any, what: str, where: str = "") -> None:
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        arr = np.asarray(x)
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            bad = np.argwhere(~np.isfinite(arr))[0]
            raise ValueError(
                f"fit: {what}{jax.tree_util.keystr(path)}{where} contains NaN or inf "
                f"(first at index {tuple(int(i) for i in bad)}). Clean or impute the data "
                f"before training."
            )


def _check_labels(outputs_spec: Any, targets: Any, what: str, where: str = "") -> None:
    """Integer targets of shape outputs.shape[:-1] are class ids: check 0 <= id < classes."""
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


def _spec(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: (tuple(np.shape(x)[1:]), np.dtype(x.dtype)), tree)


def _batch_size_of(tree: Any) -> int:
    return int(np.shape(jax.tree_util.tree_leaves(tree)[0])[0])


def _pad_batch(batch: tuple[Any, Any], size: int) -> tuple[Any, Any, np.ndarray]:
    n = _batch_size_of(batch)
    mask = np.arange(size) < n

    def pad(x):
        x = np.asarray(x)
        return np.concatenate([x, np.zeros((size - n, *x.shape[1:]), x.dtype)])

    padded = jax.tree_util.tree_map(pad, batch) if n < size else batch
    return padded[0], padded[1], mask


# --------------------------------------------------------------------------------------
# Callbacks and helpers


def early_stopping(
    monitor: str = "val_loss",
    *,
    patience: int = 3,
    mode: str = "min",
    min_delta: float = 0.0,
    restore_best: bool = True,
) -> Callable[[int, dict[str, float], TrainState], Any]:
    """A callback that stops training when ``monitor`` stops improving.

    Example:
        >>> stop = early_stopping("val_loss", patience=2)
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


class StopTraining(NamedTuple):
    """Returned by a callback to end ``fit`` after this epoch.

    Attributes:
        train_state: a train state to end with (e.g. the best epoch's), or ``None`` to keep
            the current one.
    """

    train_state: TrainState | None = None


def freeze(optimizer: optax.GradientTransformation, trainable: Any) -> optax.GradientTransformation:
    """Trains only the params where ``trainable`` is true; the others keep their values.

    Built on ``optax.multi_transform``: trainable leaves get ``optimizer``, frozen leaves
    ``optax.set_to_zero()`` (no update and no optimizer state for them).

    Example:
        >>> import jax, jax.numpy as jnp, optax, fundl as fl
        >>> model = fl.serial(body=fl.dense(4), head=fl.dense(2))
        >>> params, _ = model.init(jax.random.key(0), jnp.zeros((1, 3)))
        >>> mask = {"body": False, "head": True}
        >>> opt = fl.freeze(optax.adam(1e-3), mask)

    Args:
        optimizer: the optimizer for the trainable params.
        trainable: a pytree of booleans with the params' structure, or a prefix of it (e.g.
            ``{"body": False, "head": True}``), or a function ``params -> such a tree``.

    Returns:
        An optax ``GradientTransformation``.
    """

    def labels(params):
        mask = trainable(params) if callable(trainable) else trainable
        try:
            return jax.tree_util.tree_map(
                lambda m, sub: jax.tree_util.tree_map(lambda _: "train" if m else "freeze", sub),
                mask,
                params,
            )
        except ValueError as err:
            raise ValueError(
                f"freeze: the trainable mask does not match the params' tree: {err}. Give "
                f"a tree of booleans with the params' structure or a prefix of it."
            ) from None

    return optax.multi_transform({"train": optimizer, "freeze": optax.set_to_zero()}, labels)


def load_params(params: Any, pretrained: Any, at: Sequence[Any] = ()) -> Any:
    """Copies ``pretrained`` into ``params`` at the subtree ``at``, checking every shape.

    Transfer learning: build the new model, init it, then load the pretrained body into it,
    e.g. ``load_params(params, old_params["body"], at=("body",))``.

    Args:
        params: the new model's params.
        pretrained: the params to copy in; same tree structure and shapes as the subtree.
        at: the path of the subtree (dict keys or tuple indices); ``()`` is the whole tree.

    Returns:
        A new params tree (``params`` is not modified).

    Raises:
        ValueError: naming the first path whose structure, shape or dtype differs.
    """
    at = tuple(at)

    def replace(tree, path):
        if not path:
            _check_same_tree(tree, pretrained, "load_params: pretrained", "at " + repr(at))
            return jax.tree_util.tree_map(jnp.asarray, pretrained)
        head, rest = path[0], path[1:]
        if isinstance(tree, dict):
            if head not in tree:
                raise ValueError(f"load_params: no key {head!r} in params (keys {list(tree)}).")
            return {**tree, head: replace(tree[head], rest)}
        if (
            isinstance(tree, tuple | list)
            and isinstance(head, int)
            and -len(tree) <= head < len(tree)
        ):
            items = list(tree)
            items[head] = replace(items[head], rest)
            return type(tree)(items)
        raise ValueError(f"load_params: cannot index {type(tree).__name__} with {head!r}.")

    return replace(params, at)


def _check_same_tree(expected: Any, actual: Any, what: str, where: str) -> None:
    e_leaves, e_def = jax.tree_util.tree_flatten_with_path(expected)
    a_leaves, a_def = jax.tree_util.tree_flatten_with_path(actual)
    e_paths = {jax.tree_util.keystr(p): x for p, x in e_leaves}
    a_paths = {jax.tree_util.keystr(p): x for p, x in a_leaves}
    missing, extra = sorted(set(e_paths) - set(a_paths)), sorted(set(a_paths) - set(e_paths))
    if missing or extra:
        raise ValueError(
            f"{what} {where} has a different tree: missing {missing}, unexpected {extra}."
        )
    for p, e in e_paths.items():
        a = a_paths[p]
        if tuple(np.shape(e)) != tuple(np.shape(a)) or np.dtype(e.dtype) != np.dtype(a.dtype):
            raise ValueError(
                f"{what} {where} differs at {p}: expected {np.dtype(e.dtype)}{list(np.shape(e))}"
                f", got {np.dtype(a.dtype)}{list(np.shape(a))}."
            )
    if e_def != a_def:
        raise ValueError(f"{what} {where} has a different tree structure: {a_def} vs {e_def}.")


def _check_opt_state(optimizer: optax.GradientTransformation, ts: TrainState) -> None:
    """Raises a clear error when ``ts.opt_state`` is not ``optimizer``'s state."""
    with jax.numpy_dtype_promotion("standard"):  # optax's init, as in the step
        expected = jax.eval_shape(optimizer.init, ts.params)
    try:
        _check_same_tree(expected, ts.opt_state, "the optimizer state", "of train_state")
    except ValueError as err:
        raise ValueError(
            f"fit: {err} It was made by another optimizer than the one given to fit. Start "
            f"the optimizer afresh: train_state._replace(opt_state=optimizer.init("
            f"train_state.params))."
        ) from None


# --------------------------------------------------------------------------------------
# fit


def _epoch_rng(shuffle_seed: list[int], epoch: int) -> np.random.Generator:
    # NumPy's generator seeded by the shuffle key's data and the epoch: no device work.
    return np.random.default_rng([*shuffle_seed, epoch])


def _epoch_plan(n: int, batch_size: int, drop_remainder: bool, shuffle: bool, rng):
    """The epoch's example indices, ``(steps, batch_size)`` int32, ``-1`` for padding."""
    order = rng.permutation(n) if shuffle else np.arange(n)
    steps = n // batch_size if drop_remainder else -(-n // batch_size)
    idx = np.full((steps * batch_size,), -1, np.int32)
    take = min(n, steps * batch_size)
    idx[:take] = order[:take]
    return idx.reshape(steps, batch_size)


class _Sums:
    """Example-weighted running sums of an epoch's logs, as plain floats.

    A skipped step (non-finite loss) adds nothing: its examples count in neither the sums nor
    the count.
    """

    def __init__(self, sums: dict[str, float] | None = None, count: int = 0):
        self.sums: dict[str, float] = dict(sums or {})
        self.count = int(count)
        self.skipped = 0

    def add(self, logs_list: list[dict[str, Any]]) -> None:
        for logs in logs_list:
            skipped = np.asarray(logs.get("skipped", 0)).reshape(-1) > 0
            count = np.asarray(logs["count"], np.float64).reshape(-1) * ~skipped
            for name, value in logs.items():
                if name in ("count", "skipped"):
                    continue
                v = np.where(skipped, 0.0, np.asarray(value, np.float64).reshape(-1))
                self.sums[name] = self.sums.get(name, 0.0) + float(np.sum(v * count))
            self.count += int(np.sum(count))
            self.skipped += int(np.sum(skipped))

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}


def evaluate(
    model: Layer,
    loss: Loss,
    train_state: TrainState,
    data: Any,
    *,
    batch_size: int = 256,
    metrics: Mapping[str, Metric] | None = None,
) -> dict[str, float]:
    """Evaluates a train state on in-memory data or an iterable of batches.

    Args:
        model: the model.
        loss: as in :func:`train_step`.
        train_state: the state whose params are evaluated.
        data: ``(inputs, targets)`` arrays with a leading example axis, or an iterable of
            ``(inputs, targets)`` batches.
        batch_size: the evaluation batch size for in-memory data (the last batch is padded
            and masked, so any size compiles once).
        metrics: as in :func:`train_step`.

    Returns:
        ``{"loss": ..., name: ...}``: example-weighted means over the whole data, as floats.
    """
    step = _make_eval(model, loss, metrics)
    return _evaluate(jax.jit(step), train_state, data, batch_size, None, 1)


def _evaluate(step, ts, data, batch_size, sharding, shards) -> dict[str, float]:
    sums = _Sums()
    logs = []
    if _is_in_memory(data):
        inputs, targets = _as_pair(data, "eval_data")
        n = _batch_size_of(inputs)
        size = -(-min(batch_size, n) // shards) * shards  # a multiple of the devices
        for start in range(0, n, size):
            chunk = jax.tree_util.tree_map(lambda x, s=start: x[s : s + size], (inputs, targets))
            batch = _pad_batch(chunk, size)
            logs.append(step(ts, *_place(batch, sharding)))
    else:
        first = None
        for batch in data:
            inputs, targets, _ = _unpack_batch(batch, "fit: eval_data")
            first = first or _batch_size_of(inputs)
            batch = _pad_batch((inputs, targets), max(first, _batch_size_of(inputs)))
            logs.append(step(ts, *_place(batch, sharding)))
    sums.add(jax.device_get(logs))
    return sums.means()


def _place(tree: Any, sharding: jax.sharding.Sharding | None) -> Any:
    """Puts ``tree`` on ``sharding``'s devices (default: the default device) once, so steps
    that take it do not copy it from the host on every call; across hosts, each process
    builds its shards from the same full value."""
    if sharding is None:
        return jax.device_put(tree)
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def put(x):  # several processes: each builds its own shards from the full value
        if _is_key(x):
            return jax.random.wrap_key_data(
                put(jax.random.key_data(x)), impl=jax.random.key_impl(x)
            )
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(put, tree)


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def fit(
    model: Layer,
    loss: Loss,
    optimizer: optax.GradientTransformation,
    train_data: Any,
    *,
    epochs: int,
    batch_size: int = 32,
    key: jax.Array | None = None,
    seed: int | None = None,
    eval_data: Any = None,
    eval_batch_size: int = 256,
    metrics: Mapping[str, Metric] | None = None,
    steps_per_call: int = 1,
    shuffle: bool = True,
    drop_remainder: bool = False,
    callbacks: Sequence[Callable[[int, dict[str, float], TrainState], Any]] = (),
    progress: bool | None = None,
    train_state: TrainState | None = None,
    on_nonfinite: str = "stop",
    loss_scale: float | None = None,
    check_data: bool = True,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 3,
    resume: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    data_axis: str = "data",
    shard_params: bool = False,
) -> tuple[TrainState, list[dict[str, float]]]:
    """Trains ``model`` for ``epochs`` passes over ``train_data``: Keras's ``fit``, pure inside.

    Each epoch shuffles the in-memory examples with a key derived from ``key`` (the same key
    gives the same batches), runs the jitted :func:`train_step` on each batch (``K =
    steps_per_call`` steps per dispatch inside one ``lax.scan``), evaluates ``eval_data``
    and appends the epoch's mean metrics to the history. Nothing recompiles after the first
    epoch: the last partial batch of a stateless model is padded and masked (one shape for
    every batch); a model with state (e.g. :func:`fundl.batch_norm`'s statistics) runs it
    at its own size (one more shape, compiled once), so padding never enters the state.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, optax, fundl as fl
        >>> x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
        >>> y = (x[:, 0] > 0).astype(np.int32)
        >>> model = fl.serial(fl.dense(16), jax.nn.relu, fl.dense(2))
        >>> ts, history = fl.fit(model, optax.softmax_cross_entropy_with_integer_labels,
        ...                      optax.adam(1e-2), (x, y), epochs=3, batch_size=10, seed=0,
        ...                      metrics={"accuracy": fl.accuracy}, progress=False)
        >>> len(history), sorted(history[0])
        (3, ['accuracy', 'epoch', 'loss'])

    Args:
        model: the model.
        loss: ``loss(outputs, targets)``; per-example values (optax's losses as they are) or
            a scalar (then a stateless model needs ``drop_remainder=True`` if
            ``batch_size`` does not divide the data: a padded batch cannot be masked).
        optimizer: an optax ``GradientTransformation``.
        train_data: ``(inputs, targets)``, a tuple: arrays (NumPy or JAX) or pytrees of
            arrays with a leading example axis ``(n, ...)``; or an iterable (e.g. a list) of
            ``(inputs, targets)`` batches, iterated afresh each epoch (a list, or any object
            whose ``__iter__`` starts a new pass; a one-shot generator serves one epoch).
            Batches must have the first batch's shape; a smaller one is padded and masked,
            or, for a model with state, run at its own size (each size compiles once).
        epochs: the number of epochs.
        batch_size: examples per step for in-memory data.
        key: a PRNG key for init, shuffling and dropout (or give ``seed``).
        seed: an int seed, used when ``key`` is None (default 0).
        eval_data: held-out ``(inputs, targets)`` or iterable, evaluated after every epoch;
            its metrics appear in the history prefixed ``val_``.
        eval_batch_size: the batch size of the held-out evaluation.
        metrics: ``{name: metric(outputs, targets)}``, e.g. ``{"accuracy": fl.accuracy}``.
        steps_per_call: ``K``: steps per dispatch for in-memory data. The epoch's batches
            run in blocks of K inside one compiled ``lax.scan`` (leftover steps singly), with
            the same results as K single steps.
        shuffle: shuffle in-memory examples each epoch.
        drop_remainder: drop the last partial batch instead of padding it.
        callbacks: functions ``callback(epoch, logs, train_state)`` called after each epoch
            (``epoch`` counts from 1, ``logs`` is the history entry). A callback may return
            :class:`StopTraining` to end training (see :func:`early_stopping`). The train
            state's buffers are donated to the next step: copy what you keep
            (``jax.device_get``).
        progress: show a tqdm progress bar; ``None`` shows it only when stderr is a
            terminal.
        train_state: start from this state (e.g. pretrained params) instead of initializing.
        on_nonfinite: ``"stop"`` (raise :class:`NonFiniteLossError` naming the step, at the
            end of its epoch or at the next checkpoint, whichever is first; no checkpoint is
            written after it) or ``"skip"`` (skip those updates; costs a ``lax.cond`` per
            step).
        loss_scale: see :func:`train_step` (float16 training).
        check_data: check in-memory data (and each batch of an iterable) for NaN/inf and
            integer labels outside the model's output range before training.
        checkpoint_dir: a directory for checkpoints of the whole run (train state, data
            position, history); see :mod:`fundl.checkpoint`.
        checkpoint_every: write a checkpoint every this many steps (and always at the end).
        keep_checkpoints: keep the newest this many checkpoints.
        resume: when ``checkpoint_dir`` holds a checkpoint, continue from the newest one;
            the finished run is bitwise the same as one never interrupted. A finished run
            resumed with more ``epochs`` trains on; one a callback stopped is returned.
        mesh: a ``jax.sharding.Mesh`` for data-parallel training: each batch is split over
            the mesh axis ``data_axis`` (``batch_size`` must be a multiple of its size) and
            params and optimizer state are replicated. The model code does not change. A
            partial batch the devices do not divide is padded even for a model with state:
            pass ``drop_remainder=True`` to keep padding out of batch statistics.
        data_axis: the mesh axis to split batches over.
        shard_params: with ``mesh``, also split params and optimizer state over
            ``data_axis`` (FSDP-style: each leaf along its first axis the device count
            divides), so each device holds a share of them; XLA gathers them for the step.

    Returns:
        ``(train_state, history)``: the final :class:`TrainState` and a list with one dict
        of floats per epoch (``epoch``, ``loss``, metrics, ``val_*``, ``skipped`` when
        updates were skipped).

    Raises:
        NonFiniteLossError: on a NaN/inf loss with ``on_nonfinite="stop"``.
        ValueError: bad data (NaN, out-of-range labels, a batch shaped unlike the first), a
            checkpoint that does not match the model, or bad arguments.
    """
    from fundl import checkpoint as ckpt

    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"fit: epochs must be an int >= 0, got {epochs!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"fit: batch_size must be a positive int, got {batch_size!r}.")
    if not isinstance(steps_per_call, int) or steps_per_call < 1:
        raise ValueError(f"fit: steps_per_call must be a positive int, got {steps_per_call!r}.")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ValueError(f"fit: checkpoint_every must be >= 1, got {checkpoint_every!r}.")
    if key is None:
        key = jax.random.key(0 if seed is None else seed)
    init_key, shuffle_key = jax.random.split(key)
    shuffle_seed = _key_list(shuffle_key)

    in_memory = _is_in_memory(train_data)
    pending: list[Any] = []  # a batch read ahead from an iterable, fed first
    if in_memory:
        inputs, targets = _as_pair(train_data, "train_data")
        n = _batch_size_of(inputs)
        example = jax.tree_util.tree_map(lambda x: x[:batch_size], inputs)
        example_targets = jax.tree_util.tree_map(lambda x: x[:batch_size], targets)
    else:
        if isinstance(train_data, tuple) and len(train_data) == 2:
            _as_pair(train_data, "train_data")  # a clear error for arrays mixed with others
        source = train_data
        one_shot = iter(source) is source
        try:
            first_batch = next(iter(source))
        except StopIteration:
            raise ValueError("fit: train_data is an empty iterable.") from None
        example, example_targets, _ = _unpack_batch(first_batch, "fit: train_data")
        if one_shot:
            pending.append(first_batch)
    if train_state is None:
        train_state = init_train_state(model, optimizer, init_key, example)
    else:
        _check_opt_state(optimizer, train_state)
        train_state = jax.tree_util.tree_map(jnp.copy, train_state)  # fit donates its buffers
    out_spec = jax.eval_shape(
        lambda p, s, x: model.apply(p, s, x)[0], train_state.params, train_state.state, example
    )
    per_example = _loss_is_per_example(loss, out_spec, example_targets)

    if in_memory and check_data:
        _check_finite(inputs, "train_data inputs")
        _check_finite(targets, "train_data targets")
        _check_labels(out_spec, targets, "train_data targets")
    if eval_data is not None and _is_in_memory(eval_data) and check_data:
        e_inputs, e_targets = _as_pair(eval_data, "eval_data")
        _check_finite(e_inputs, "eval_data inputs")
        _check_finite(e_targets, "eval_data targets")
        _check_labels(out_spec, e_targets, "eval_data targets")
    # A model with state (batch norm's statistics) runs a partial batch at its own size, so
    # padding never enters the statistics (one more compiled shape, made once); a stateless
    # model pads and masks it, the same result with one shape. With a mesh, a partial batch
    # the devices do not divide is padded either way.
    has_state = bool(jax.tree_util.tree_leaves(train_state.state))
    shards_of_mesh = mesh.shape.get(data_axis, 1) if mesh is not None else 1

    def exact(size: int) -> bool:
        return has_state and size % shards_of_mesh == 0

    partial = in_memory and not drop_remainder and n % batch_size
    if partial and not per_example and not exact(n % batch_size):
        raise ValueError(
            f"fit: the loss returns a scalar, so the last partial batch ({n % batch_size} of "
            f"{n} examples with batch_size={batch_size}) cannot be masked. Return per-example "
            f"losses (e.g. optax's losses without .mean()) or pass drop_remainder=True."
        )

    batch_sharding = state_sharding = shardings = None
    shards = 1
    if mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        if data_axis not in mesh.axis_names:
            raise ValueError(f"fit: mesh has axes {mesh.axis_names}, not {data_axis!r}.")
        shards = mesh.shape[data_axis]
        if batch_size % shards:
            raise ValueError(
                f"fit: batch_size={batch_size} must be a multiple of the {shards} devices on "
                f"mesh axis {data_axis!r}."
            )
        # fit places data and state itself and lets XLA partition the step, so it uses the
        # mesh's devices with automatic axes (jax.make_mesh defaults to explicit axes).
        auto = jax.sharding.Mesh(
            mesh.devices,
            mesh.axis_names,
            axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names),
        )
        batch_sharding = NamedSharding(auto, PartitionSpec(data_axis))
        state_sharding = NamedSharding(auto, PartitionSpec())

        def leaf_sharding(x):
            # FSDP-style: split a param (and its optimizer moments) along its first axis
            # that the devices divide; scalars, keys and small leaves stay replicated.
            if shard_params and not _is_key(x):
                for axis, size in enumerate(np.shape(x)):
                    if size % shards == 0 and size >= shards:
                        spec = [None] * np.ndim(x)
                        spec[axis] = data_axis
                        return NamedSharding(auto, PartitionSpec(*spec))
            return state_sharding

        shardings = jax.tree_util.tree_map(leaf_sharding, train_state)
        train_state = jax.tree_util.tree_map(_place, train_state, shardings)

    core = _make_core(model, loss, optimizer, metrics, on_nonfinite, loss_scale)
    value_names = ["loss", *_normalize_metrics(metrics)]
    eval_core = jax.jit(_make_eval(model, loss, metrics))

    def constrain(tree):
        if batch_sharding is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, batch_sharding)

    def constrain_carry(carry):  # keep each leaf's layout from step to step
        if shardings is None:
            return carry
        return jax.lax.with_sharding_constraint(carry, shardings._replace(key=None))

    if in_memory:
        device_data = _place((inputs, targets), state_sharding)

        # The carry is the train state without its key: the key is the same at every step
        # and, as a typed PRNG key argument, would cost ~60 us of dispatch per call (measured
        # on 2 CPU cores), so the steps close over it instead.
        # The epoch's logs are summed on the device into ``acc`` (see _accumulate), so an
        # epoch costs one transfer to the host instead of one per step and metric.
        def one(state, data, idx):
            carry, acc = state
            take = jnp.maximum(idx, 0)
            x, y = constrain(jax.tree_util.tree_map(lambda a: jnp.take(a, take, axis=0), data))
            mask = constrain(idx >= 0) if per_example else None
            carry, logs = core(carry, x, y, mask, run_key)
            return (constrain_carry(carry), _accumulate(acc, logs, value_names)), None

        def many(state, data, idx):
            return jax.lax.scan(lambda c, i: one(c, data, i), state, idx)[0]

        step_one = jax.jit(lambda state, data, idx: one(state, data, idx)[0], donate_argnums=0)
        step_many = jax.jit(many, donate_argnums=0)
        steps_per_epoch = n // batch_size if drop_remainder else -(-n // batch_size)
    else:

        def direct(state, x, y, m):
            carry, acc = state
            x, y = constrain((x, y))
            carry, logs = core(carry, x, y, constrain(m) if per_example else None, run_key)
            return constrain_carry(carry), _accumulate(acc, logs, value_names)

        step_direct = jax.jit(direct, donate_argnums=0)
        steps_per_epoch = 0

    # Resume from the newest checkpoint.
    history: list[dict[str, float]] = []
    start_epoch, start_pos, start_sums = 1, 0, None
    manager = None
    if checkpoint_dir is not None:
        manager = ckpt.CheckpointManager(checkpoint_dir, keep=keep_checkpoints)
        if resume and manager.latest() is not None:
            restored, meta = manager.restore(train_state)
            if meta.get("shuffle_key") != shuffle_seed:
                raise ValueError(
                    f"fit: the checkpoint in {os.fspath(checkpoint_dir)} was written by a run "
                    f"with another key/seed; resume with the same seed or use a new "
                    f"checkpoint_dir."
                )
            train_state = (
                jax.tree_util.tree_map(_place, restored, shardings)
                if mesh
                else jax.device_put(restored)
            )
            history = meta["history"]
            if meta.get("finished") and (meta.get("stopped") or meta["epoch"] > epochs):
                return train_state, history  # nothing left to do (or a callback stopped it)
            start_epoch, start_pos = meta["epoch"], meta["position"]
            start_sums = meta["sums"]

    def save(ts, epoch, pos, sums, history, finished=False, stopped=False):
        """Checkpoints the run; ``sums`` is the epoch's accumulator as a list of floats."""
        if manager is None or int(ts.bad_step) >= 0:  # never write a NaN run over a good one
            return
        meta = {
            "epoch": epoch,
            "position": pos,
            "sums": sums,
            "history": history,
            "finished": finished,
            "stopped": stopped,
            "shuffle_key": shuffle_seed,
        }
        manager.save(int(ts.step), with_key(ts), meta)

    def check_bad(ts, epoch):
        bad = int(ts.bad_step)
        if bad >= 0:
            raise NonFiniteLossError(
                f"fit: the loss became NaN or inf at step {bad} (epoch {epoch}); training "
                f"stopped, and no checkpoint was written after that step (resume from the "
                f"newest one). Lower the learning rate, check the data, clip gradients "
                f"(optax.clip_by_global_norm), or pass on_nonfinite='skip'.",
                bad,
                with_key(ts),
            )

    show = sys.stderr.isatty() if progress is None else bool(progress)
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=(epochs - start_epoch + 1) * steps_per_epoch or None,
            unit="step",
            dynamic_ncols=True,
        )

    run_key = train_state.key
    ts = train_state._replace(key=None)  # the carry; with_key(ts) is the full train state

    def with_key(carry):
        return carry._replace(key=run_key)

    gstep = int(ts.step)  # the global step, tracked on the host (no sync per step)
    first_spec = None
    epoch = start_epoch - 1  # the last epoch done (for the final checkpoint)
    stop = False

    def after_call(ts, acc, k, epoch, pos):
        nonlocal gstep
        if bar is not None:
            bar.update(k)
        before, gstep = gstep, gstep + k
        if checkpoint_every and gstep // checkpoint_every > before // checkpoint_every:
            check_bad(ts, epoch)
            save(ts, epoch, pos, np.asarray(acc).tolist(), history)

    try:
        for epoch in range(start_epoch, epochs + 1):
            pos = start_pos if epoch == start_epoch else 0
            sums0 = start_sums if epoch == start_epoch and start_sums else None
            acc = jnp.asarray(sums0 or [0.0] * (len(value_names) + 2), jnp.float32)
            acc = _place(acc, state_sharding)
            if in_memory:
                rng = _epoch_rng(shuffle_seed, epoch)
                idx = _epoch_plan(n, batch_size, drop_remainder, shuffle, rng)
                exact_tail = partial and exact(n % batch_size)
                blocks_end = steps_per_epoch - 1 if exact_tail else steps_per_epoch
                while pos < steps_per_epoch:
                    k = steps_per_call if pos + steps_per_call <= blocks_end else 1
                    if k > 1:
                        ts, acc = step_many((ts, acc), device_data, idx[pos : pos + k])
                    else:
                        row = idx[pos]
                        if exact_tail and pos == steps_per_epoch - 1:
                            row = row[row >= 0]  # the partial batch, at its own size
                        ts, acc = step_one((ts, acc), device_data, row)
                    pos += k
                    after_call(ts, acc, k, epoch, pos)
            else:
                batches = iter(source) if not pending else _chain_first(pending.pop(), source)
                for i, batch in enumerate(batches):
                    if i < pos:  # resuming: skip the batches already trained on
                        continue
                    x, y, _ = _unpack_batch(batch, "fit: train_data")
                    bs, spec = _batch_size_of(x), _spec((x, y))
                    first_spec = first_spec or (spec, bs)
                    if spec != first_spec[0] or bs > first_spec[1]:
                        raise ValueError(
                            f"fit: batch {i} of epoch {epoch} has batch size {bs} and per-example "
                            f"shapes/dtypes {spec}, unlike the first batch (batch size "
                            f"{first_spec[1]}, {first_spec[0]}). Every batch needs the first "
                            f"batch's shape (only a smaller last batch is padded); a new shape "
                            f"would recompile the step."
                        )
                    if check_data:
                        where = f" (batch {i} of epoch {epoch})"
                        _check_finite(x, "train_data inputs", where)
                        _check_finite(y, "train_data targets", where)
                        _check_labels(out_spec, y, "train_data targets", where)
                    own_size = bs < first_spec[1] and exact(bs)
                    if bs < first_spec[1] and not per_example and not own_size:
                        raise ValueError(
                            f"fit: batch {i} of epoch {epoch} is smaller than the first ({bs} < "
                            f"{first_spec[1]}) and the loss returns a scalar, so it cannot be "
                            f"padded and masked. Return per-example losses."
                        )
                    padded = _pad_batch((x, y), bs if own_size else first_spec[1])
                    ts, acc = step_direct((ts, acc), *_place(padded, batch_sharding))
                    pos = i + 1
                    after_call(ts, acc, 1, epoch, pos)
                if pos == 0:
                    raise ValueError(
                        f"fit: train_data gave no batches in epoch {epoch}. A one-shot "
                        f"iterator (a generator) is read once; pass a re-iterable object (a "
                        f"list, or one whose __iter__ starts a new pass) or epochs=1."
                    )
            check_bad(ts, epoch)
            totals = np.asarray(acc, np.float64)
            count = max(float(totals[-2]), 1.0)
            entry: dict[str, float] = {"epoch": epoch}
            entry.update({name: float(totals[i] / count) for i, name in enumerate(value_names)})
            if totals[-1]:
                entry["skipped"] = int(totals[-1])
            if eval_data is not None:
                val = _evaluate(eval_core, ts, eval_data, eval_batch_size, batch_sharding, shards)
                entry.update({"val_" + k: v for k, v in val.items()})
            history.append(entry)
            if bar is not None:
                bar.set_postfix({k: f"{v:.4g}" for k, v in entry.items() if k != "epoch"})
            for callback in callbacks:
                result = callback(epoch, entry, with_key(ts))
                if isinstance(result, StopTraining):
                    stop = True
                    if result.train_state is not None:
                        ts = result.train_state._replace(key=None)
            if stop:
                break
        save(ts, epoch + 1, 0, None, history, finished=True, stopped=stop)
    finally:
        if bar is not None:
            bar.close()
    return with_key(ts), history


def _accumulate(acc: jax.Array, logs: dict[str, jax.Array], names: list[str]) -> jax.Array:
    """Adds one step's logs to ``acc = [sum(value * count) per name..., count, skipped]``.

    A skipped step (non-finite loss) adds only to ``skipped``: its examples count in neither
    the sums nor the count.
    """
    skipped = logs["skipped"].astype(jnp.float32)
    weight = logs["count"].astype(jnp.float32) * (1.0 - skipped)
    values = [jnp.where(weight > 0, logs[name].astype(jnp.float32) * weight, 0.0) for name in names]
    return acc + jnp.stack([*values, weight, skipped])


def _key_list(key: jax.Array) -> list[int]:
    return [int(v) for v in np.asarray(jax.random.key_data(key)).reshape(-1)]


def _chain_first(first: Any, rest: Iterable[Any]):
    yield first
    yield from rest


def _loss_is_per_example(loss, out_spec, example_targets) -> bool:
    targets = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), example_targets
    )
    try:
        value = jax.eval_shape(lambda o, t: loss(_upcast(o), t), out_spec, targets)
    except Exception:  # the step's real call raises the real error, with its traceback
        return True
    return len(getattr(value, "shape", ())) > 0
