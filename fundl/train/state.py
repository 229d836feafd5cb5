"""The train state: everything a run carries from step to step, and how a run starts one."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fundl.core import Layer
from fundl.sharding import init_on_shards, shape_of
from fundl.train.params import check_same_tree

__all__ = ["TrainState", "init_train_state"]


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


def init_train_state(
    model: Layer,
    optimizer: optax.GradientTransformation,
    key: jax.Array,
    example_inputs: Any,
    *,
    params: Any = None,
) -> TrainState:
    """Initializes the model and the optimizer into a :class:`TrainState`.

    The whole init runs as one jitted program, compiled once per model, optimizer and input
    shapes (eagerly, each of its random draws and fills would compile a program of its own).
    On the CPU, a model of at most :data:`FAST_COMPILE_MAX_PARAMS` params gets that program
    compiled without XLA's backend optimisations, which compiles 2.6-2.8x faster.

    Example:
        >>> import jax, jax.numpy as jnp, optax, fundl as fl
        >>> ts = fl.init_train_state(fl.dense(2), optax.sgd(0.1), jax.random.key(0),
        ...                          jnp.zeros((4, 3)))
        >>> int(ts.step), ts.params["w"].shape
        (0, (3, 2))

    Args:
        model: the model.
        optimizer: an optax ``GradientTransformation``.
        key: a PRNG key; split into the init key and the run's step key.
        example_inputs: an example input (array or ``jax.ShapeDtypeStruct``), e.g. a batch
            of shape ``(batch, ...)``; only shapes and dtypes are read.
        params: start from these params instead of fresh ones (pretrained, or made with
            :func:`fundl.graft`); the optimizer state is built for them. Their tree, shapes
            and dtypes must be those ``model.init`` makes.

    Returns:
        A :class:`TrainState` at step 0.

    Raises:
        ValueError: ``params`` do not fit the model, naming the first path that differs.
    """
    specs = jax.tree_util.tree_map(shape_of, example_inputs)
    if params is not None:
        fresh = jax.eval_shape(lambda k: model.init(k, specs)[0], key)
        try:
            check_same_tree(fresh, params, "init_train_state: params", "for this model")
        except ValueError as err:
            raise ValueError(
                f"{err} Pass params made by this model's init (or grafted into them with fl.graft)."
            ) from None
        params = jax.tree_util.tree_map(jnp.asarray, params)
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves((key, params))):
        return fresh_state(model, optimizer, specs, key, params)  # inside the caller's trace
    leaves, tree = jax.tree_util.tree_flatten(specs)
    static = (model, optimizer, tuple(leaves), tree)
    try:
        hash(static)
    except TypeError:  # e.g. an optimizer object that is not a NamedTuple of functions
        init = jax.jit(functools.partial(_from_leaves, *static))
    else:
        init = functools.partial(_init_jit(*static, jax.typeof(key)), *static)
    ts = init(key, params)
    return ts if params is None else ts._replace(params=params)  # the given arrays, no copy


def fresh_state(
    model: Layer, optimizer: optax.GradientTransformation, specs: Any, key: jax.Array, params: Any
) -> TrainState:
    """A train state at step 0: the model's init on ``specs``, its params or ``params``."""
    init_key, step_key = jax.random.split(key)
    fresh, state = model.init(init_key, specs)
    params = fresh if params is None else params
    return TrainState(
        params=params,
        state=state,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        key=step_key,
        bad_step=jnp.full((), -1, jnp.int32),
    )


def _from_leaves(model, optimizer, leaves, tree, key, params):
    """:func:`fresh_state` on flat input specs; without given ``params`` among its outputs
    (a jitted function's outputs are new buffers: they would be copies)."""
    ts = fresh_state(model, optimizer, jax.tree_util.tree_unflatten(tree, leaves), key, params)
    return ts if params is None else ts._replace(params=None)


FAST_COMPILE_MAX_PARAMS = 16_000_000
"""On the CPU, a model with at most this many params initialises from a program compiled
without XLA's backend optimisations: it compiles 2.6-2.8x faster (0.25-0.38 s against
0.67-1.00 s from 0.1 M to 50 M params, most of it the random-number generator) and runs
about 10 ns per param slower, a loss only past about 45 M params (``benchmarks/RESULTS.md``,
issue 17)."""

FAST_COMPILE = {"xla_backend_optimization_level": 0}
"""XLA's options for the small models' init program."""

_INIT = jax.jit(_from_leaves, static_argnums=(0, 1, 2, 3))
_INIT_FAST = jax.jit(_from_leaves, static_argnums=(0, 1, 2, 3), compiler_options=FAST_COMPILE)


@functools.lru_cache(maxsize=64)
def _init_jit(model, optimizer, leaves, tree, key_type) -> Any:
    """The jitted init for this model, optimizer and inputs (jit's cache then holds their
    program): on the CPU, the fast-compiling one for at most FAST_COMPILE_MAX_PARAMS params."""
    if jax.default_backend() != "cpu":
        return _INIT
    shapes = jax.eval_shape(functools.partial(_from_leaves, model, optimizer, leaves, tree),
                            key_type, None)  # fmt: skip
    count = sum(x.size for x in jax.tree_util.tree_leaves(shapes.params))
    return _INIT_FAST if count <= FAST_COMPILE_MAX_PARAMS else _INIT


def state_shapes(
    model: Layer,
    optimizer: optax.GradientTransformation,
    key: jax.Array,
    example_inputs: Any,
    train_state: TrainState | None,
) -> Any:
    """The shapes of ``fit``'s first state (``train_state`` itself when given), made without
    allocating it."""
    if train_state is not None:
        return train_state
    return jax.eval_shape(functools.partial(init_train_state, model, optimizer), key,
                          example_inputs)  # fmt: skip


def start_state(
    model: Layer,
    optimizer: optax.GradientTransformation,
    key: jax.Array,
    example_inputs: Any,
    train_state: TrainState | None,
    shardings: Any = None,
) -> TrainState:
    """``fit``'s first state: a fresh one, or a copy of ``train_state`` (fit donates buffers).

    With ``shardings`` (a tree of shardings shaped like the train state), a fresh state is
    initialised under ``jit`` on them, so each device computes only its shards.
    """
    if train_state is None:
        if shardings is None:
            return init_train_state(model, optimizer, key, example_inputs)
        init = functools.partial(init_train_state, model, optimizer)
        return init_on_shards(init, key, (example_inputs,), shardings)
    check_opt_state(optimizer, train_state)
    return jax.tree_util.tree_map(jnp.copy, train_state)


def check_opt_state(optimizer: optax.GradientTransformation, ts: TrainState) -> None:
    """Raises a clear error when ``ts.opt_state`` is not ``optimizer``'s state."""
    with jax.numpy_dtype_promotion("standard"):  # optax's init, as in the step
        expected = jax.eval_shape(optimizer.init, ts.params)
    try:
        check_same_tree(expected, ts.opt_state, "the optimizer state", "of train_state")
    except ValueError as err:
        raise ValueError(
            f"fit: {err} It was made by another optimizer than the one given to fit. Start "
            f"the optimizer afresh: train_state._replace(opt_state=optimizer.init("
            f"train_state.params))."
        ) from None
