"""``check_layer``: the fundl layer contract, asserted on example inputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fundl.core import Layer, layer_name


class LayerCase(NamedTuple):
    """A layer with inputs it accepts and the output shapes its documentation promises.

    Attributes:
        layer: the layer.
        inputs: a tuple of input arrays (any pytrees of arrays the layer takes).
        output_shapes: the documented output shape (a pytree of shape tuples).
        train: whether to apply it in training mode.
        grad_modes: the autodiff modes its gradients support (``check_layer``'s
            ``grad_modes``): ``("rev",)`` for reverse mode only.
    """

    layer: Layer
    inputs: tuple[Any, ...]
    output_shapes: Any
    train: bool = False
    grad_modes: tuple[str, ...] = ("fwd", "rev")


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
        expected: a pytree of arrays with the same structure and leaf shapes.
        atol: absolute tolerance.
        rtol: relative tolerance.
        what: what is compared, for the message (e.g. ``"jit vs eager outputs"``).

    Example:
        >>> import numpy as np
        >>> from fundl.testing import assert_trees_close
        >>> assert_trees_close({"w": np.ones(2)}, {"w": np.ones(2) + 1e-9}, atol=1e-6,
        ...                    rtol=0, what="params")
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


def _assert_output_shapes(name: str, outputs: Any, output_shapes: Any) -> None:
    actual = jax.tree_util.tree_map(jnp.shape, outputs)
    expected = jax.tree_util.tree_map(
        tuple, output_shapes, is_leaf=lambda s: isinstance(s, tuple | list)
    )
    if actual != expected:
        raise AssertionError(f"{name}: output shapes {actual}, documented {expected}")


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
    grad_atol: float = 1e-5,
    grad_rtol: float = 1e-5,
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
    4. The same key gives bitwise the same outputs on a second eager call.
    5. ``jax.vmap`` over an extra leading axis of the inputs agrees with a loop.
    6. Gradients of a random linear function of the floating outputs, with respect to the
       params and the floating inputs, agree with central finite differences in float64 along
       a random direction, in forward and reverse mode (``grad_modes`` picks the modes; the
       check of ``jax.test_util.check_grads``, compiled as one program).

    Each transformed program is compiled once (the loop of check 5 reuses the jitted apply of
    check 3), so a case costs a handful of compilations however many ops the layer has.

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
        grad_atol: absolute tolerance of check 6 (``check_grads``' float64 default).
        grad_rtol: relative tolerance of check 6.
        eps: the finite-difference step of check 6. The default, 1e-6, suits float64
            central differences (rounding error ~1e-10, truncation error ~1e-12 times the
            third derivative); 1e-4 leaves truncation errors of 1e-4 on a layer norm of two
            nearly equal features.
        grad_modes: the autodiff modes of check 6: ``("rev",)`` for a layer that is
            differentiable in reverse mode only, such as ``fl.rnn(..., fused_backward=True)``
            (a ``jax.custom_vjp``).

    Returns:
        ``(outputs, new_state)`` of the eager call, in float64, for further assertions.

    Example:
        >>> import jax.numpy as jnp, fundl as fl
        >>> from fundl.testing import check_layer
        >>> outputs, state = check_layer(fl.dense(3), jnp.ones((2, 4)), output_shapes=(2, 3))
        >>> outputs.shape
        (2, 3)
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

        def run(p, s, *xs):
            return layer.apply(p, s, *xs, key=apply_key, train=train)

        outputs, new_state = run(params, state, *inputs)
        _assert_same_specs(
            (outputs, new_state),
            jax.eval_shape(run, params, state, *inputs),
            f"{name}: apply vs jax.eval_shape(apply)",
        )
        if output_shapes is not None:
            _assert_output_shapes(name, outputs, output_shapes)

        jitted = jax.jit(run)
        assert_trees_close(
            jitted(params, state, *inputs),
            (outputs, new_state),
            atol=atol,
            rtol=rtol,
            what=f"{name}: jit vs eager",
        )
        # The same eager computation twice: bitwise equal unless the layer hides state or
        # randomness outside its arguments.
        assert_trees_close(
            run(params, state, *inputs),
            (outputs, new_state),
            atol=0,
            rtol=0,
            what=f"{name}: same key, second call",
        )
        if vmap:
            _check_vmap(name, jitted, params, state, inputs, atol, rtol)
        if grads:
            # the un-jitted apply: forward mode reaches the layer's own tracing (fl.rnn
            # sees jax.jvp there; through a jitted function it could not), and the whole
            # check is one jitted program anyway
            _check_grads(name, run, params, state, inputs, outputs, grad_atol, grad_rtol,
                         eps, grad_modes)  # fmt: skip
        return outputs, new_state


def check_case(case: LayerCase, **options: Any) -> tuple[Any, Any]:
    """:func:`check_layer` on a :class:`LayerCase` (its inputs, mode, shapes and grad modes).

    Args:
        case: the layer and its inputs, e.g. drawn by a hypothesis strategy.
        **options: further ``check_layer`` keywords (tolerances, ``key``, ``vmap``...).

    Returns:
        ``(outputs, new_state)`` of the eager call, as ``check_layer``.

    Example:
        >>> import jax.numpy as jnp, fundl as fl
        >>> from fundl.testing import LayerCase, check_case
        >>> _ = check_case(LayerCase(fl.dense(3), (jnp.ones((2, 4)),), output_shapes=(2, 3)))
    """
    return check_layer(case.layer, *case.inputs, train=case.train,
                       output_shapes=case.output_shapes, grad_modes=case.grad_modes,
                       **options)  # fmt: skip


def _check_vmap(name, jitted, params, state, inputs, atol, rtol):
    def variant(i):
        return jax.tree_util.tree_map(
            lambda x: np.asarray(x) * (1.0 + 0.5 * i) if _is_float(x) else np.asarray(x), inputs
        )

    variants = [variant(i) for i in range(2)]
    stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *variants)
    # one compilation of the batched program; the loop reuses the compiled apply of check 3
    batched = jax.jit(jax.vmap(lambda xs: jitted(params, state, *xs)))(stacked)
    looped = [jitted(params, state, *v) for v in variants]
    looped = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *looped)
    assert_trees_close(batched, looped, atol=atol, rtol=rtol, what=f"{name}: vmap vs loop")


def _check_grads(name, apply, params, state, inputs, outputs, atol, rtol, eps, modes):
    float_idx = [i for i, x in enumerate(inputs) if _is_float(x)]
    rng = np.random.default_rng(1)  # NumPy draws: no eager JAX op to compile per shape
    probes = [
        rng.standard_normal(jnp.shape(o)) if _is_float(o) else None
        for o in jax.tree_util.tree_leaves(outputs)
    ]

    def scalar(p, *float_inputs):
        xs = list(inputs)
        for i, x in zip(float_idx, float_inputs, strict=True):
            xs[i] = x
        out, _ = apply(p, state, *xs)
        leaves = jax.tree_util.tree_leaves(out)
        terms = [jnp.sum(o * w) for o, w in zip(leaves, probes, strict=True) if w is not None]
        return sum(terms[1:], start=terms[0]) if terms else jnp.zeros((), jnp.float64)

    def directional(args, tangents):
        """d/de scalar(args + e * tangents) at e = 0: finite differences and each mode."""

        def at(e):
            return scalar(*jax.tree_util.tree_map(lambda a, t: a + e * t, args, tangents))

        derivatives = {"finite differences": (at(eps) - at(-eps)) / (2 * eps)}
        if "fwd" in modes:
            derivatives["forward mode (jvp)"] = jax.jvp(scalar, args, tangents)[1]
        if "rev" in modes:
            grads = jax.grad(scalar, argnums=tuple(range(len(args))))(*args)
            derivatives["reverse mode (grad)"] = _inner(tangents, grads)
        return derivatives

    args = (params, *(inputs[i] for i in float_idx))
    tangents = jax.tree_util.tree_map(lambda a: rng.standard_normal(jnp.shape(a)), args)
    # one program for the finite differences and both modes: one compilation per case
    derivatives = jax.jit(directional)(args, tangents)
    finite = derivatives.pop("finite differences")
    for mode, value in derivatives.items():
        np.testing.assert_allclose(value, finite, atol=atol, rtol=rtol,
                                   err_msg=f"{name}: {mode} vs finite differences")  # fmt: skip


def _inner(a: Any, b: Any) -> jax.Array:
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return sum((jnp.vdot(x, y) for x, y in pairs), start=jnp.zeros((), jnp.float64))
