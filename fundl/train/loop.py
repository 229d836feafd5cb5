"""The loop: ``fit`` drives the steps over a batch source, epoch after epoch."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import PartitionSpec

from fundl.compilation_cache import cache_by_default
from fundl.core import Layer
from fundl.sharding import ShardingRules, sharding_rules
from fundl.train.callbacks import Callback, call_callbacks, progress_bar
from fundl.train.data import Iterable, Policy, batches, check_batch, eval_batches, n_examples
from fundl.train.placement import Placement, placement
from fundl.train.run import check_nonfinite, open_run, start
from fundl.train.state import TrainState, start_state, state_shapes
from fundl.train.steps import (
    Loss,
    Metric,
    accumulating_core,
    block_steps,
    eval_block_step,
    eval_core,
    loss_is_per_example,
    means,
    metric_names,
    run_eval,
    train_core,
    zero_sums,
)

__all__ = ["fit"]


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
    num_micro_batches: int = 1,
    shuffle: bool = True,
    drop_remainder: bool = False,
    callbacks: Sequence[Callback] = (),
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
    rules: ShardingRules | Sequence[tuple[str, PartitionSpec]] | None = None,
) -> tuple[TrainState, list[dict[str, float]]]:
    """Trains ``model`` for ``epochs`` passes over ``train_data``: Keras's ``fit``, pure inside.

    Each epoch shuffles the in-memory examples with a key derived from ``key`` (the same key
    gives the same batches), runs the step of :func:`make_train_step` on each batch (``K =
    steps_per_call`` steps per dispatch inside one ``lax.scan``), evaluates ``eval_data``
    and appends the epoch's mean metrics to the history. Nothing recompiles after the first
    epoch: the last partial batch of a stateless model is padded and masked (one shape for
    every batch); a model with state (e.g. :func:`fundl.batch_norm`'s statistics) runs it
    at its own size (one more shape, compiled once), so padding never enters the state.

    The first call turns on JAX's persistent compilation cache for the process, so the next
    run loads its compiled programs from disk; see :func:`cache_compilations` to move or
    turn it off.

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
            the same results as K single steps. K counts optimizer steps, each of
            ``num_micro_batches`` micro-batches.
        num_micro_batches: ``N``: gradient accumulation. Each optimizer step takes ``N``
            micro-batches of ``batch_size`` examples (for an iterable, each of its batches
            is split into ``N``; its size must be a multiple of ``N``), sums their gradients
            inside the step's ``lax.scan`` and updates once: the same update as one step on a
            batch of ``N * batch_size`` (the mean over every valid example, a masked partial
            batch included), with the activation memory of one micro-batch.
            ``train_state.step``, ``steps_per_call``, ``checkpoint_every`` and the progress
            bar count optimizer steps. A model's state (batch norm's statistics) is updated
            by each micro-batch in turn.
        shuffle: shuffle in-memory examples each epoch.
        drop_remainder: drop the last partial batch instead of padding it.
        callbacks: functions ``callback(epoch, logs, train_state)`` called after each epoch
            (``epoch`` counts from 1, ``logs`` is the history entry). A callback may return
            or raise :class:`StopTraining` to end training (see :func:`early_stopping`). The train
            state's buffers are donated to the next step: copy what you keep
            (``jax.device_get``).
        progress: show a tqdm progress bar (``tqdm.auto``: a widget in a notebook, text in a
            terminal) with the epoch, the epoch's running loss and metrics (read from the
            device at most once a second, never per step) and the last epoch's ``val_*``;
            ``None`` shows it in a terminal or a Jupyter notebook and hides it where stderr
            is a file or a pipe (CI logs).
        train_state: start from this state (e.g. pretrained params) instead of initializing.
        on_nonfinite: ``"stop"`` (raise :class:`NonFiniteLossError` naming the step, at the
            end of its epoch or at the next checkpoint, whichever is first; no checkpoint is
            written after it) or ``"skip"`` (skip those updates; costs a ``lax.cond`` per
            step).
        loss_scale: see :func:`make_train_step` (float16 training).
        check_data: check in-memory data (and each batch of an iterable) for NaN/inf and
            integer labels outside the model's output range before training.
        checkpoint_dir: a directory for checkpoints of the whole run (train state, data
            position, history); see :mod:`fundl.checkpoint`. On a mesh (a train state on
            several devices) sharded checkpoints, each process writing its own shards
            (:mod:`fundl.sharded_checkpoint`; needs ``pip install "fundl[orbax]"``).
        checkpoint_every: write a checkpoint every this many steps (and always at the end).
        keep_checkpoints: keep the newest this many checkpoints.
        resume: when ``checkpoint_dir`` holds a checkpoint, continue from the newest one;
            the finished run is bitwise the same as one never interrupted. A finished run
            resumed with more ``epochs`` trains on; one a callback stopped is returned.
        mesh: a ``jax.sharding.Mesh`` for data-parallel training: each batch is split over
            the mesh axis ``data_axis`` (``batch_size`` must be a multiple of its size) and
            params and optimizer state are replicated (or split: see ``shard_params`` and
            ``rules``). The model code does not change. A partial batch the devices do not
            divide is padded even for a model with state: pass ``drop_remainder=True`` to
            keep padding out of batch statistics.
        data_axis: the mesh axis to split batches over.
        shard_params: with ``mesh``, also split params and optimizer state over
            ``data_axis`` (FSDP-style: each leaf along its first axis the device count
            divides), so each device holds a share of them; XLA gathers them for the step.
        rules: with ``mesh``, where each param lies: a :class:`fundl.ShardingRules` or
            ``(pattern, PartitionSpec)`` pairs (strict), e.g.
            ``fl.tensor_parallel_rules("model")`` plus rules for the rest on a
            ``("data", "model")`` mesh, or ``fl.fsdp_rules(params, mesh)`` (see
            :mod:`fundl.sharding`). The optimizer state follows its params
            (:func:`fundl.shard_like`), and a fresh train state is initialised under ``jit`` on
            these shardings, so no device ever holds the whole model. Batches are still
            split over ``data_axis`` only.

    Returns:
        ``(train_state, history)``: the final :class:`TrainState` and a list with one dict
        of floats per epoch (``epoch``, ``loss``, metrics, ``val_*``, ``skipped`` when
        updates were skipped, and ``learning_rate``, the rate of the epoch's last update,
        when the optimizer records it: wrap it as
        ``optax.inject_hyperparams(optax.adam)(learning_rate=schedule)``, whose state keeps
        its hyperparameters; a plain ``optax.adam(schedule)`` keeps only a step count).

    Raises:
        NonFiniteLossError: on a NaN/inf loss with ``on_nonfinite="stop"``.
        ValueError: bad data (NaN, out-of-range labels, a batch shaped unlike the first), a
            checkpoint that does not match the model, or bad arguments.
    """
    cache_by_default()  # compiled programs persist across runs (fundl.compilation_cache)
    _check_counts(epochs, batch_size, steps_per_call, checkpoint_every, num_micro_batches)
    init_key, shuffle_key = jax.random.split(jax.random.key(seed or 0) if key is None else key)
    shuffle_seed = [int(v) for v in np.asarray(jax.random.key_data(shuffle_key)).reshape(-1)]
    source = batches(train_data, batch_size * num_micro_batches, shuffle=shuffle,
                     drop_remainder=drop_remainder, seed=shuffle_seed)  # fmt: skip
    _check_splits(source, num_micro_batches)
    shapes = None if mesh is None else state_shapes(model, optimizer, init_key,
                                                    source.example[0], train_state)  # fmt: skip
    place = placement(mesh, data_axis, shard_params, batch_size, shapes, _rules(rules))
    ts = start_state(model, optimizer, init_key, source.example[0], train_state, place.state)
    policy = _policy(model, loss, ts, source.example, place, check_data, num_micro_batches)
    source.validate(policy)
    names = metric_names(metrics)
    evaluate_epoch = _evaluator(model, loss, metrics, names, eval_data, eval_batch_size, place,
                                policy)  # fmt: skip
    run = open_run(checkpoint_dir, keep=keep_checkpoints, every=checkpoint_every,
                   shuffle_seed=shuffle_seed)  # fmt: skip
    begin = start(run, place.put_state(ts), place, epochs, resume)
    if begin.done:  # nothing left to do (or a callback stopped it)
        return begin.train_state, begin.history

    run_key, ts = begin.train_state.key, begin.train_state._replace(key=None)  # ts: the carry
    make_core = train_core if num_micro_batches == 1 else accumulating_core
    core = make_core(model, loss, optimizer, metrics, on_nonfinite, loss_scale)
    steps = block_steps(core, source.take, names, policy.per_example, place, run_key,
                        num_micro_batches)  # fmt: skip
    feed, history = place.put(source.feed), list(begin.history)
    bar = progress_bar(progress, (epochs - begin.epoch + 1) * (source.steps or 0), names, epochs)
    epoch, stop, gstep = begin.epoch - 1, None, int(ts.step)  # gstep: the global step
    try:
        for epoch in range(begin.epoch, epochs + 1):
            resumed = epoch == begin.epoch
            acc = place.put(zero_sums(names, begin.sums if resumed else None))
            blocks = source.blocks(epoch, begin.position if resumed else 0, steps_per_call, policy)
            if bar is not None:
                bar.start_epoch(epoch)
            for block in blocks:
                step = steps.many if block.steps > 1 else steps.one
                ts, acc = step((ts, acc), feed, block.rows)
                gstep, before = gstep + block.steps, gstep
                if bar is not None:
                    bar.update(block.steps, acc)
                if run.due(before, gstep):
                    check_nonfinite(ts._replace(key=run_key), epoch)
                    sums = np.asarray(acc).tolist()
                    run.save(ts._replace(key=run_key), epoch, block.position, sums, history)
            check_nonfinite(ts._replace(key=run_key), epoch)
            logs = {**_epoch_logs(acc, names), **_learning_rate(ts.opt_state)}
            entry = {"epoch": epoch, **logs, **evaluate_epoch(ts)}
            history.append(entry)
            if bar is not None:
                bar.set_postfix(entry)
            stop = call_callbacks(callbacks, epoch, entry, ts._replace(key=run_key))
            if stop is not None:
                ts = ts if stop.train_state is None else stop.train_state._replace(key=None)
                break
        run.save(ts._replace(key=run_key), epoch + 1, 0, None, history, finished=True,
                 stopped=stop is not None)  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    return ts._replace(key=run_key), history


def _check_counts(epochs, batch_size, steps_per_call, checkpoint_every, num_micro_batches):
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"fit: epochs must be an int >= 0, got {epochs!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"fit: batch_size must be a positive int, got {batch_size!r}.")
    if not isinstance(steps_per_call, int) or steps_per_call < 1:
        raise ValueError(f"fit: steps_per_call must be a positive int, got {steps_per_call!r}.")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ValueError(f"fit: checkpoint_every must be >= 1, got {checkpoint_every!r}.")
    if (
        not isinstance(num_micro_batches, int)
        or isinstance(num_micro_batches, bool)
        or (num_micro_batches < 1)
    ):
        raise ValueError(
            f"fit: num_micro_batches must be a positive int (micro-batches per optimizer "
            f"step; 1 for no accumulation), got {num_micro_batches!r}."
        )


def _rules(rules) -> ShardingRules | None:
    """``rules`` as :class:`ShardingRules` (a sequence of pairs is strict)."""
    if rules is None or isinstance(rules, ShardingRules):
        return rules
    return sharding_rules(rules)


def _check_splits(source, num_micro_batches: int) -> None:
    """An iterable's batches split into ``num_micro_batches`` equal micro-batches (in-memory
    batches are ``num_micro_batches * batch_size`` examples, padded)."""
    size = n_examples(source.example[0])
    if isinstance(source, Iterable) and size % num_micro_batches:
        raise ValueError(
            f"fit: a batch of {size} examples does not split into num_micro_batches="
            f"{num_micro_batches} equal micro-batches. Give batches of a multiple of "
            f"{num_micro_batches} examples."
        )


def _policy(model, loss, ts, example, place: Placement, check_data: bool, splits: int) -> Policy:
    """How this run treats its batches, from the model's output shape and state.

    A model with state (batch norm's statistics) runs a partial batch at its own size, so
    padding never enters the statistics (one more compiled shape, made once); a stateless
    model pads and masks it, the same result with one shape. With a mesh, a partial batch the
    devices do not divide is padded either way; with gradient accumulation, so is one that
    does not split into ``splits`` micro-batches.
    """
    out_spec = jax.eval_shape(lambda p, s, x: model.apply(p, s, x)[0], ts.params, ts.state,
                              example[0])  # fmt: skip
    has_state = bool(jax.tree_util.tree_leaves(ts.state))

    def check(inputs, targets, what, where):
        check_batch(out_spec, inputs, targets, what, where)

    return Policy(
        check=check if check_data else None,
        own_size=lambda size: has_state and size % (place.shards * splits) == 0,
        per_example=loss_is_per_example(loss, out_spec, example[1]),
        put=place.put_batch,
    )


def _evaluator(model, loss, metrics, names, eval_data, batch_size, place, policy):
    """``evaluate_epoch(ts) -> {"val_loss": ..., "val_<metric>": ...}`` on ``eval_data``
    (``{}`` without it): its data checked now and put on the devices once."""
    if eval_data is None:
        return lambda ts: {}
    source = eval_batches(eval_data, batch_size, place.shards)
    eval_policy = policy._replace(own_size=lambda size: False, per_example=True)
    source.validate(eval_policy)
    step = eval_block_step(eval_core(model, loss, metrics), source.take, names, place)
    feed = place.put(source.feed)

    def evaluate_epoch(ts):
        logs = run_eval(step, source, feed, ts, names, eval_policy, place)
        return {"val_" + k: v for k, v in logs.items()}

    return evaluate_epoch


def _learning_rate(opt_state: Any) -> dict[str, float]:
    """``{"learning_rate": rate}`` of the last update where the optimizer state records it
    (``optax.inject_hyperparams``, anywhere in a chain), else ``{}``."""
    nodes = jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: hasattr(x, "hyperparams"))
    for node in nodes:
        hyperparams = getattr(node, "hyperparams", None)
        if isinstance(hyperparams, Mapping) and "learning_rate" in hyperparams:
            return {"learning_rate": float(np.asarray(hyperparams["learning_rate"]))}
    return {}


def _epoch_logs(acc: jax.Array, names: list[str]) -> dict[str, float]:
    """The epoch's means, and ``skipped`` when steps were skipped (one transfer)."""
    totals = np.asarray(acc, np.float64)
    logs: dict[str, float] = means(totals, names)
    if totals[-1]:
        logs["skipped"] = int(totals[-1])
    return logs
