"""Property-testing kit: check any layer's contract, with hypothesis strategies to drive it.

``check_layer`` asserts what every fundl layer promises: float64 gradients that agree with
finite differences, ``jit`` equal to eager, ``vmap`` equal to a loop, ``eval_shape`` equal to
real init, predicted output shapes equal to actual ones, and determinism under a fixed key.
``fundl.testing.strategies`` draws valid layer configurations and inputs for hypothesis.

Example:
    >>> import jax.numpy as jnp, fundl as fl
    >>> from fundl.testing import check_layer
    >>> outputs, state = check_layer(fl.dense(3), jnp.ones((2, 4)))
    >>> outputs.shape
    (2, 3)

Requires hypothesis only for ``fundl.testing.strategies`` (``pip install fundl[test]``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

from fundl.core import Layer, layer_name

__all__ = ["check_layer", "count_compiles", "assert_trees_close"]


def __getattr__(name: str) -> Any:
    # ``fl.testing.strategies`` imports hypothesis (the test extra): on first use only.
    if name == "strategies":
        import importlib

        return importlib.import_module("fundl.testing.strategies")
    raise AttributeError(f"module 'fundl.testing' has no attribute {name!r}")


def _is_float(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def _to_f64(tree: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(x, jnp.float64) if _is_float(x) else jnp.asarray(x), tree
    )


def assert_trees_close(actual: Any, expected: Any, *, atol: float, rtol: float, what: str) -> None:
    """Asserts two pytrees have one structure and allclose leaves, naming the first mismatch.

    Args:
        actual: a pytree of arrays.
        expected: a pytree of arrays with the same structure.
        atol: absolute tolerance.
        rtol: relative tolerance.
        what: what is compared, for the message (e.g. ``"jit vs eager outputs"``).
    """
    a_leaves, a_def = jax.tree_util.tree_flatten_with_path(actual)
    e_leaves, e_def = jax.tree_util.tree_flatten_with_path(expected)
    if a_def != e_def:
        raise AssertionError(f"{what}: tree structures differ:\n{a_def}\nvs\n{e_def}")
    for (path, a), (_, e) in zip(a_leaves, e_leaves, strict=True):
        where = jax.tree_util.keystr(path) or "(root)"
        a_np, e_np = np.asarray(a, np.float64), np.asarray(e, np.float64)
        if a_np.shape != e_np.shape:
            raise AssertionError(f"{what} at {where}: shapes {a_np.shape} vs {e_np.shape}")
        np.testing.assert_allclose(a_np, e_np, atol=atol, rtol=rtol, err_msg=f"{what} at {where}")


def _assert_same_specs(actual: Any, expected: Any, what: str) -> None:
    def spec(x):
        return (tuple(jnp.shape(x)), jnp.dtype(x.dtype))

    a, e = jax.tree_util.tree_map(spec, actual), jax.tree_util.tree_map(spec, expected)
    if jax.tree_util.tree_structure(actual) != jax.tree_util.tree_structure(expected) or a != e:
        raise AssertionError(f"{what}:\n  actual:    {a}\n  predicted: {e}")


def check_layer(
    layer: Layer,
    *inputs: Any,
    key: jax.Array | None = None,
    train: bool = False,
    output_shapes: Any = None,
    grads: bool = True,
    vmap: bool = True,
    atol: float = 1e-6,
    rtol: float = 1e-6,
    grad_atol: float | None = None,
    grad_rtol: float | None = None,
    eps: float = 1e-6,
    grad_modes: Sequence[str] = ("fwd", "rev"),
) -> tuple[Any, Any]:
    """Asserts that ``layer`` keeps the fundl layer contract on ``inputs``.

    Runs in float64 (inside ``jax.enable_x64``; floating inputs are cast, params are built
    at the default dtype, float64). Checks, raising ``AssertionError`` with the failing part
    named:

    1. ``jax.eval_shape(layer.init, ...)`` predicts the real params and state (shapes, dtypes,
       tree structure), and ``jax.eval_shape(layer.apply, ...)`` the real outputs.
    2. The outputs have ``output_shapes`` (a shape, or a pytree of shapes), when given.
    3. ``jax.jit(layer.apply)`` agrees with the eager call, outputs and new state.
    4. The same key gives bitwise the same outputs twice.
    5. ``jax.vmap`` over an extra leading axis of the inputs agrees with a Python loop.
    6. Gradients of a random linear function of the floating outputs, with respect to the
       params and the floating inputs, agree with finite differences in float64, forward and
       reverse mode (``jax.test_util.check_grads``; ``grad_modes`` picks the modes).

    Args:
        layer: the layer under test.
        *inputs: example inputs (arrays; integer and boolean inputs are held fixed).
        key: the key for init and apply (default ``jax.random.key(0)``).
        train: apply in training mode.
        output_shapes: the documented output shape(s) to compare against.
        grads: run check 6.
        vmap: run check 5 (turn off for layers whose inputs carry no leading batch axis).
        atol: absolute tolerance of the value checks (3, 5).
        rtol: relative tolerance of the value checks.
        grad_atol: absolute tolerance of check 6 (default: ``check_grads``'s).
        grad_rtol: relative tolerance of check 6.
        eps: the finite-difference step of check 6. The default, 1e-6, suits float64
            central differences (rounding error ~1e-10, truncation error ~1e-12 times the
            third derivative); ``check_grads``' own 1e-4 left truncation errors of 1e-4 on a
            layer norm of two nearly equal features.
        grad_modes: the autodiff modes of check 6: ``("rev",)`` for a layer that is
            differentiable in reverse mode only, such as ``fl.rnn(..., fused_backward=True)``
            (a ``jax.custom_vjp``).

    Returns:
        ``(outputs, new_state)`` of the eager call, in float64, for further assertions.
    """
    with jax.enable_x64(True):
        key = jax.random.key(0) if key is None else key
        init_key, apply_key = jax.random.split(key)
        inputs = _to_f64(inputs)
        name = layer_name(layer)

        specs = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), inputs)
        params, state = layer.init(init_key, *inputs)
        _assert_same_specs(
            (params, state),
            jax.eval_shape(layer.init, init_key, *specs),
            f"{name}: init vs jax.eval_shape(init)",
        )

        def run(p, s, *xs, k=apply_key):
            return layer.apply(p, s, *xs, key=k, train=train)

        outputs, new_state = run(params, state, *inputs)
        _assert_same_specs(
            (outputs, new_state),
            jax.eval_shape(run, params, state, *inputs),
            f"{name}: apply vs jax.eval_shape(apply)",
        )
        if output_shapes is not None:
            actual = jax.tree_util.tree_map(jnp.shape, outputs)
            expected = jax.tree_util.tree_map(
                tuple, output_shapes, is_leaf=lambda s: isinstance(s, tuple | list)
            )
            if actual != expected:
                raise AssertionError(f"{name}: output shapes {actual}, documented {expected}")

        jitted = jax.jit(run)(params, state, *inputs)
        assert_trees_close(
            jitted, (outputs, new_state), atol=atol, rtol=rtol, what=f"{name}: jit vs eager"
        )
        again = run(params, state, *inputs)
        assert_trees_close(
            again, (outputs, new_state), atol=0, rtol=0, what=f"{name}: same key, second call"
        )

        if vmap:
            _check_vmap(name, run, params, state, inputs, atol, rtol)
        if grads:
            _check_grads(run, params, state, inputs, outputs, grad_atol, grad_rtol, eps, grad_modes)
        return outputs, new_state


def _check_vmap(name, run, params, state, inputs, atol, rtol):
    def variant(i):
        return jax.tree_util.tree_map(lambda x: x * (1.0 + 0.5 * i) if _is_float(x) else x, inputs)

    variants = [variant(i) for i in range(2)]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *variants)
    batched = jax.vmap(lambda xs: run(params, state, *xs))(stacked)
    looped = [run(params, state, *v) for v in variants]
    looped = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *looped)
    assert_trees_close(batched, looped, atol=atol, rtol=rtol, what=f"{name}: vmap vs loop")


def _check_grads(run, params, state, inputs, outputs, atol, rtol, eps, modes):
    float_idx = [i for i, x in enumerate(inputs) if _is_float(x)]
    out_leaves, out_def = jax.tree_util.tree_flatten(outputs)
    probe_keys = jax.random.split(jax.random.key(1), len(out_leaves))
    probes = [
        jax.random.normal(k, jnp.shape(o), o.dtype) if _is_float(o) else None
        for k, o in zip(probe_keys, out_leaves, strict=True)
    ]

    def scalar(p, *float_inputs):
        xs = list(inputs)
        for i, x in zip(float_idx, float_inputs, strict=True):
            xs[i] = x
        out, _ = run(p, state, *xs)
        leaves = jax.tree_util.tree_leaves(out)
        terms = [jnp.sum(o * w) for o, w in zip(leaves, probes, strict=True) if w is not None]
        return sum(terms[1:], start=terms[0]) if terms else jnp.zeros((), jnp.float64)

    del out_def
    args = (params, *(inputs[i] for i in float_idx))
    check_grads(jax.jit(scalar), args, order=1, modes=tuple(modes), atol=atol, rtol=rtol, eps=eps)


@contextlib.contextmanager
def count_compiles() -> Iterator[list[str]]:
    """Counts XLA compilations inside the ``with`` block.

    Yields a list that receives one entry per backend compilation; use it to assert that a
    jitted step does not recompile on its second call.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from fundl.testing import count_compiles
        >>> step = jax.jit(lambda x: x * 2)
        >>> _ = step(jnp.ones(3))
        >>> with count_compiles() as compiles:
        ...     _ = step(jnp.ones(3))
        >>> len(compiles)
        0
    """
    events: list[str] = []

    def listener(event: str, duration: float, **kwargs: Any) -> None:
        del duration, kwargs
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
