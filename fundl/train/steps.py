"""The pure steps: a training step and an evaluation step, and the sums of their logs.

A step's core is a pure function of the train state and one batch ``(inputs, targets,
mask)``; :func:`make_train_step` and :func:`make_eval_step` jit it for a caller who drives
the loop, and :func:`fundl.fit` wraps the same core in its own compiled steps.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fundl.core import Layer
from fundl.metrics import masked_mean
from fundl.train.data import Policy, eval_batches, n_examples, unpack_batch
from fundl.train.placement import NO_MESH, Placement
from fundl.train.state import TrainState

__all__ = ["make_train_step", "make_eval_step", "evaluate"]

Loss = Callable[[Any, Any], jax.Array]
Metric = Callable[..., jax.Array]


# --------------------------------------------------------------------------------------
# Losses and metrics


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


def metric_names(metrics: Mapping[str, Metric] | None) -> list[str]:
    """The names of a step's values: ``loss``, then the metrics (checked)."""
    return ["loss", *_normalize_metrics(metrics)]


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


def _count(inputs: Any, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return jnp.asarray(n_examples(inputs), jnp.int32)
    return jnp.sum(mask.astype(jnp.int32))


def _upcast(outputs: Any) -> Any:
    """Casts low-precision floating outputs (bf16, f16) to float32 before the loss."""

    def cast(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4:
            return x.astype(jnp.float32)
        return x

    return jax.tree_util.tree_map(cast, outputs)


def loss_is_per_example(loss: Loss, out_spec: Any, example_targets: Any) -> bool:
    """Whether ``loss`` returns per-example values (maskable) rather than a scalar."""
    targets = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), example_targets
    )
    try:
        value = jax.eval_shape(lambda o, t: loss(_upcast(o), t), out_spec, targets)
    except Exception:  # the step's real call raises the real error, with its traceback
        return True
    return len(getattr(value, "shape", ())) > 0


# --------------------------------------------------------------------------------------
# Step cores


class TrainParts(NamedTuple):
    """The two halves of a training step, shared by :func:`train_core` and
    :func:`accumulating_core`.

    Attributes:
        gradient: ``gradient(params, state, inputs, targets, mask, key, weight=None) ->
            (grads, (value, outputs, new_state))``: the grads of the (scaled) loss, times
            ``weight`` when given; ``value`` is the unscaled, unweighted loss.
        finish: ``finish(ts, grads, value, new_state) -> (ts, finite)``: unscales the grads,
            checks them, applies the optimizer update and advances ``ts.step`` by one.
    """

    gradient: Callable[..., Any]
    finish: Callable[..., Any]


def train_parts(model, loss, optimizer, on_nonfinite, loss_scale) -> TrainParts:
    """The :class:`TrainParts` of a training step (see :func:`make_train_step`)."""
    if on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}.")
    scale = 1.0 if loss_scale is None else float(loss_scale)

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

    def gradient(params, state, inputs, targets, mask, key, weight=None):
        def objective(params):
            outputs, new_state = model.apply(params, state, inputs, key=key, train=True)
            value = _reduce(loss(_upcast(outputs), targets), mask, "loss")
            weighted = value if weight is None else value * weight.astype(value.dtype)
            return weighted * jnp.asarray(scale, value.dtype), (value, outputs, new_state)

        return jax.grad(objective, has_aux=True)(params)

    def finish(ts: TrainState, grads, value, new_state):
        if loss_scale is not None:
            grads = jax.tree_util.tree_map(lambda g: g / jnp.asarray(scale, g.dtype), grads)
        finite = jnp.isfinite(value)
        if loss_scale is not None:  # an f16 overflow shows up in the grads first
            leaves = jax.tree_util.tree_leaves(grads)
            finite = finite & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in leaves]))
        ok = finite & (ts.bad_step < 0)
        args = (grads, ts.params, ts.opt_state, ts.state, new_state)
        if on_nonfinite == "skip":
            params, opt_state, state = jax.lax.cond(ok, update, keep, *args)
        else:
            # No guard in the step: a cond (or a where) around the update doubles the time of
            # a small model's step on CPU. fit checks bad_step before every checkpoint and at
            # every epoch's end instead.
            params, opt_state, state = update(*args)
        bad_step = ts.bad_step
        if on_nonfinite == "stop":
            bad_step = jnp.where((ts.bad_step < 0) & ~finite, ts.step, ts.bad_step)
        new = ts._replace(
            params=params, state=state, opt_state=opt_state, step=ts.step + 1, bad_step=bad_step
        )
        return new, finite

    return TrainParts(gradient, finish)


def train_core(model, loss, optimizer, metrics, on_nonfinite, loss_scale):
    """``core(ts, inputs, targets, mask, run_key=None) -> (ts, logs)``: one training step."""
    parts = train_parts(model, loss, optimizer, on_nonfinite, loss_scale)
    metrics = _normalize_metrics(metrics)

    def core(ts: TrainState, inputs, targets, mask, run_key=None):
        key = jax.random.fold_in(ts.key if run_key is None else run_key, ts.step)
        grads, (value, outputs, new_state) = parts.gradient(
            ts.params, ts.state, inputs, targets, mask, key
        )
        new, finite = parts.finish(ts, grads, value, new_state)
        logs = {"loss": jnp.asarray(value, jnp.float32)}
        logs.update(_compute_metrics(metrics, outputs, targets, mask))
        logs["skipped"] = (~finite).astype(jnp.int32)
        logs["count"] = _count(inputs, mask)
        return new, logs

    return core


def accumulating_core(model, loss, optimizer, metrics, on_nonfinite, loss_scale):
    r"""``core(ts, rows, load, run_key=None) -> (ts, logs)``: one optimizer step whose batch
    is the micro-batches ``load(rows[i])``, ``i < N`` (``rows`` has a leading axis ``N``).

    Gradient accumulation: a ``lax.scan`` over the micro-batches sums the grads of each
    micro-batch's loss times its count of valid examples :math:`c_i`, and divides by
    :math:`\sum_i c_i`: the gradient of the mean loss over every valid example of the N
    micro-batches, as one step on their concatenation would take it (masked and empty
    micro-batches weigh what they hold). Then one optimizer update, and ``ts.step`` advances
    by one. Micro-batch ``i`` draws its key from ``fold_in(fold_in(key, ts.step), i)``; the
    model state runs through the micro-batches in order, and one with no valid example
    leaves it as it was. The logs are the example-weighted means over the N micro-batches.
    """
    parts = train_parts(model, loss, optimizer, on_nonfinite, loss_scale)
    metrics = _normalize_metrics(metrics)
    names = metric_names(metrics)

    def core(ts: TrainState, rows, load, run_key=None):
        step_key = jax.random.fold_in(ts.key if run_key is None else run_key, ts.step)

        def micro(carry, xs):
            grads_sum, state, sums = carry
            i, row = xs
            inputs, targets, mask = load(row)
            count = _count(inputs, mask)
            key = jax.random.fold_in(step_key, i)
            grads, (value, outputs, new_state) = parts.gradient(
                ts.params, state, inputs, targets, mask, key, weight=count
            )
            logs = {"loss": jnp.asarray(value, jnp.float32)}
            logs.update(_compute_metrics(metrics, outputs, targets, mask))
            weight = count.astype(jnp.float32)
            values = [jnp.where(weight > 0, logs[name] * weight, 0.0) for name in names]
            state = jax.tree_util.tree_map(
                lambda new, old: jnp.where(count > 0, new, old), new_state, state
            )
            grads_sum = jax.tree_util.tree_map(jnp.add, grads_sum, grads)
            return (grads_sum, state, sums + jnp.stack([*values, weight])), None

        n = jax.tree_util.tree_leaves(rows)[0].shape[0]
        zeros = (jax.tree_util.tree_map(jnp.zeros_like, ts.params), ts.state,
                 jnp.zeros(len(names) + 1, jnp.float32))  # fmt: skip
        (grads, state, sums), _ = jax.lax.scan(micro, zeros, (jnp.arange(n), rows))
        total = jnp.maximum(sums[-1], 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / total.astype(g.dtype), grads)
        logs = {name: sums[i] / total for i, name in enumerate(names)}
        new, finite = parts.finish(ts, grads, logs["loss"], state)
        logs["skipped"] = (~finite).astype(jnp.int32)
        logs["count"] = sums[-1].astype(jnp.int32)
        return new, logs

    return core


def eval_core(model, loss, metrics):
    """``core(ts, inputs, targets, mask) -> logs``: the model in inference, no gradient."""
    metrics = _normalize_metrics(metrics)

    def core(ts: TrainState, inputs, targets, mask):
        outputs, _ = model.apply(ts.params, ts.state, inputs, train=False)
        value = _reduce(loss(_upcast(outputs), targets), mask, "loss")
        logs = {"loss": jnp.asarray(value).astype(jnp.float32)}
        logs.update(_compute_metrics(metrics, outputs, targets, mask))
        logs["count"] = _count(inputs, mask)
        return logs

    return core


# --------------------------------------------------------------------------------------
# Public step builders


def make_train_step(
    model: Layer,
    loss: Loss,
    optimizer: optax.GradientTransformation,
    metrics: Mapping[str, Metric] | None = None,
    *,
    on_nonfinite: str = "stop",
    loss_scale: float | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    r"""Builds the jitted training step ``train_step(train_state, batch) -> (train_state, logs)``.

    One step is the guide's four: forward pass (``model.apply(..., train=True)`` with the key
    ``fold_in(train_state.key, train_state.step)``), loss, backward pass (``jax.grad``) and
    optax update. The train state is donated to XLA, so its buffers are reused in place: do
    not use the ``train_state`` you passed in after the call.

    Example:
        >>> import jax, jax.numpy as jnp, optax, fundl as fl
        >>> model = fl.serial(fl.dense(8), jax.nn.relu, fl.dense(3))
        >>> opt = optax.sgd(0.1)
        >>> ts = fl.init_train_state(model, opt, jax.random.key(0), jnp.zeros((4, 5)))
        >>> train_step = fl.make_train_step(
        ...     model, optax.softmax_cross_entropy_with_integer_labels, opt)
        >>> ts, logs = train_step(ts, (jnp.ones((4, 5)), jnp.array([0, 1, 2, 0])))
        >>> int(ts.step), sorted(logs)
        (1, ['count', 'loss', 'skipped'])

    Args:
        model: the model.
        loss: ``loss(outputs, targets)``, per-example values of shape ``(batch, ...)``
            (averaged over the masked examples) or a scalar. Low-precision floating outputs
            (bfloat16, float16) are cast to float32 before the loss.
        optimizer: an optax ``GradientTransformation`` (schedules go inside it).
        metrics: optional ``{name: metric(outputs, targets)}`` (see :mod:`fundl.train`).
        on_nonfinite: ``"stop"``: the first step with a NaN/inf loss is recorded in
            ``train_state.bad_step`` (the update is applied; :func:`fundl.fit` then raises
            :class:`fundl.NonFiniteLossError` and writes no checkpoint after it);
            ``"skip"``: a step with a non-finite loss leaves params, model state and
            optimizer state unchanged (a ``lax.cond``; ``logs["skipped"]`` is 1) and
            training continues.
        loss_scale: a static loss-scaling factor for float16 compute: the loss is multiplied
            by it before ``jax.grad`` and the grads divided after, so small float16 grads do
            not underflow; a step whose grads overflow is treated as non-finite (use
            ``on_nonfinite="skip"`` to skip such steps).

    Returns:
        ``train_step(train_state, batch)``; ``batch`` is ``(inputs, targets)`` or ``(inputs,
        targets, mask)`` with ``mask`` booleans of shape ``(batch,)``. ``logs`` holds float32
        scalars ``loss`` and one per metric (means over the batch's valid examples),
        ``skipped`` and ``count`` (the number of valid examples).
    """
    core = train_core(model, loss, optimizer, metrics, on_nonfinite, loss_scale)

    def train_step(train_state, batch):
        inputs, targets, mask = unpack_batch(batch, "train_step")
        return core(train_state, inputs, targets, mask)

    return jax.jit(train_step, donate_argnums=0)


def make_eval_step(
    model: Layer, loss: Loss, metrics: Mapping[str, Metric] | None = None
) -> Callable[[TrainState, Any], dict[str, jax.Array]]:
    """Builds the jitted evaluation step ``eval_step(train_state, batch) -> logs``.

    The model runs with ``train=False`` and no key; no gradient is taken and the train state
    is not changed (nor donated).

    Example:
        >>> import jax, jax.numpy as jnp, optax, fundl as fl
        >>> model = fl.dense(3)
        >>> ts = fl.init_train_state(model, optax.sgd(0.1), jax.random.key(0), jnp.zeros((2, 4)))
        >>> eval_step = fl.make_eval_step(model, optax.softmax_cross_entropy_with_integer_labels)
        >>> sorted(eval_step(ts, (jnp.ones((2, 4)), jnp.array([0, 2]))))
        ['count', 'loss']

    Args:
        model: the model.
        loss: as in :func:`make_train_step`.
        metrics: as in :func:`make_train_step`.

    Returns:
        ``eval_step(train_state, batch)`` returning ``loss``, the metrics and ``count``.
    """
    core = eval_core(model, loss, metrics)

    def eval_step(train_state, batch):
        inputs, targets, mask = unpack_batch(batch, "eval_step")
        return core(train_state, inputs, targets, mask)

    return jax.jit(eval_step)


# --------------------------------------------------------------------------------------
# Sums of logs


def accumulate(acc: jax.Array, logs: dict[str, jax.Array], names: list[str]) -> jax.Array:
    """Adds one step's logs to ``acc = [sum(value * count) per name..., count, skipped]``.

    A skipped step (non-finite loss) adds only to ``skipped``: its examples count in neither
    the sums nor the count.
    """
    skipped = logs["skipped"].astype(jnp.float32) if "skipped" in logs else jnp.float32(0)
    weight = logs["count"].astype(jnp.float32) * (1.0 - skipped)
    values = [jnp.where(weight > 0, logs[name].astype(jnp.float32) * weight, 0.0) for name in names]
    return acc + jnp.stack([*values, weight, skipped])


def zero_sums(names: list[str], sums: list[float] | None = None) -> jax.Array:
    """The empty ``acc`` of :func:`accumulate` (or one restored from a checkpoint)."""
    return jnp.asarray(sums or [0.0] * (len(names) + 2), jnp.float32)


def means(acc: jax.Array, names: list[str]) -> dict[str, float]:
    """The example-weighted means of ``acc``'s values, as floats (one transfer)."""
    totals = np.asarray(acc, np.float64)
    count = max(float(totals[-2]), 1.0)
    return {name: float(totals[i] / count) for i, name in enumerate(names)}


# --------------------------------------------------------------------------------------
# Steps over a batch source


class BlockSteps(NamedTuple):
    """``fit``'s compiled steps over a source's blocks; each folds its logs into ``acc``.

    Attributes:
        one: ``one((ts, acc), feed, rows) -> (ts, acc)``: one batch; donates ``(ts, acc)``.
        many: the same over a block of ``K`` steps (``rows`` with a leading ``K`` axis),
            inside one ``lax.scan``.
    """

    one: Callable[..., Any]
    many: Callable[..., Any]


def block_steps(
    core, take, names, per_example, place: Placement, run_key, num_micro_batches: int = 1
) -> BlockSteps:
    """Wraps a train :func:`train_core` for ``fit``: batches from ``take``, sums on device.

    The carry is the train state without its key: the key is the same at every step and, as
    a typed PRNG key argument, would cost dispatch time on every call, so the steps close
    over ``run_key`` instead. The epoch's logs are summed on the device into ``acc`` (see
    :func:`accumulate`), so an epoch costs one transfer to the host.

    With ``num_micro_batches`` ``N > 1``, ``core`` is an :func:`accumulating_core`: a step's
    rows (leading axis ``N * micro``) are split into ``N`` micro-batches of ``micro`` rows,
    each taken from the feed inside the accumulation's scan.
    """

    def load(feed, rows):
        inputs, targets, mask = take(feed, rows)
        inputs, targets = place.constrain((inputs, targets))
        mask = place.constrain(mask) if per_example else None
        return inputs, targets, mask

    def one(state, feed, rows):
        carry, acc = state
        if num_micro_batches == 1:
            carry, logs = core(carry, *load(feed, rows), run_key)
        else:
            micro = jax.tree_util.tree_map(
                lambda a: a.reshape(num_micro_batches, -1, *a.shape[1:]), rows
            )
            carry, logs = core(carry, micro, partial(load, feed), run_key)
        return (place.constrain_carry(carry), accumulate(acc, logs, names)), None

    def many(state, feed, rows):
        return jax.lax.scan(lambda c, r: one(c, feed, r), state, rows)[0]

    return BlockSteps(
        one=jax.jit(lambda state, feed, rows: one(state, feed, rows)[0], donate_argnums=0),
        many=jax.jit(many, donate_argnums=0),
    )


def eval_block_step(core, take, names, place: Placement):
    """``step(acc, ts, feed, rows) -> acc``: an eval :func:`eval_core` over a source's block."""

    def step(acc, ts, feed, rows):
        inputs, targets, mask = take(feed, rows)
        inputs, targets, mask = place.constrain((inputs, targets, mask))
        return accumulate(acc, core(ts, inputs, targets, mask), names)

    return jax.jit(step)


def run_eval(step, source, feed, ts, names, policy: Policy, place: Placement) -> dict[str, float]:
    """Runs ``step`` over every block of ``source``: the means of ``loss`` and the metrics."""
    acc = place.put(zero_sums(names))
    for block in source.blocks(0, 0, 1, policy):
        acc = step(acc, ts, feed, block.rows)
    return means(acc, names)


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

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, optax, fundl as fl
        >>> model = fl.dense(3)
        >>> ts = fl.init_train_state(model, optax.sgd(0.1), jax.random.key(0), jnp.zeros((1, 4)))
        >>> x, y = np.ones((10, 4), np.float32), np.zeros((10,), np.int32)
        >>> logs = fl.evaluate(model, optax.softmax_cross_entropy_with_integer_labels, ts,
        ...                    (x, y), batch_size=4, metrics={"accuracy": fl.accuracy})
        >>> sorted(logs)
        ['accuracy', 'loss']

    Args:
        model: the model.
        loss: as in :func:`make_train_step`.
        train_state: the state whose params are evaluated.
        data: ``(inputs, targets)`` arrays with a leading example axis, or an iterable of
            ``(inputs, targets)`` batches.
        batch_size: the evaluation batch size for in-memory data (the last batch is padded
            and masked, so any size compiles once).
        metrics: as in :func:`make_train_step`.

    Returns:
        ``{"loss": ..., name: ...}``: example-weighted means over the whole data, as floats.
    """
    names = metric_names(metrics)
    source = eval_batches(data, batch_size, NO_MESH.shards)
    step = eval_block_step(eval_core(model, loss, metrics), source.take, names, NO_MESH)
    policy = Policy(check=None, own_size=lambda size: False, per_example=True, put=NO_MESH.put)
    return run_eval(step, source, NO_MESH.put(source.feed), train_state, names, policy, NO_MESH)
