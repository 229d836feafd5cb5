"""fundl.testing: check_layer catches each kind of broken layer (so its passes mean
something); the strategies draw what they promise."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fundl as fl
from fundl.core import Layer
from fundl.testing import (
    LayerCase,
    assert_compiles_once,
    check_case,
    check_layer,
    count_compiles,
)
from fundl.testing import strategies as fst
from tests import cases

X = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)


def stateless(apply_fn, init_fn=None):
    def init(key, x):
        return (init_fn(key, x) if init_fn else ()), ()

    def apply(params, state, x, key=None, train=False):
        return apply_fn(params, x), state

    return Layer(init, apply)


def test_a_correct_layer_passes():
    out, state = check_layer(fl.dense(5), X, output_shapes=(3, 5))
    assert out.dtype == jnp.float64
    assert state == ()


def test_wrong_gradient_is_caught():
    @jax.custom_jvp
    def bad_square(x):
        return x**2

    @bad_square.defjvp
    def _(primals, tangents):
        (x,), (t,) = primals, tangents
        return x**2, 3.0 * x * t  # the derivative of x**2 is 2x

    with pytest.raises(AssertionError):
        check_layer(stateless(lambda p, x: bad_square(x)), X)


def test_impure_layer_is_caught():
    counter = itertools.count()

    def apply(p, x):
        return x + float(next(counter))  # a hidden Python side effect

    with pytest.raises(AssertionError, match=r"jit vs eager|same key, second call"):
        check_layer(stateless(apply), X, grads=False)


def test_wrong_documented_shape_is_caught():
    with pytest.raises(AssertionError, match=r"output shapes \(3, 5\), documented \(3, 4\)"):
        check_layer(fl.dense(5), X, output_shapes=(3, 4))


def test_bad_batching_rule_is_caught():
    @jax.custom_batching.custom_vmap
    def f(x):
        return 2 * x

    @f.def_vmap
    def _(axis_size, in_batched, x):
        return 3 * x, in_batched[0]  # disagrees with the unbatched rule

    with pytest.raises(AssertionError, match=r"vmap vs loop"):
        check_layer(stateless(lambda p, x: f(x)), X, grads=False)


def test_init_that_branches_on_values_is_caught():
    """init may read shapes only: one that branches on input values fails eval_shape."""

    def branching_init(key, x):
        return {"w": jnp.ones((x.shape[-1], 2 if float(jnp.sum(x)) > 0 else 3))}

    layer = stateless(lambda p, x: x @ p["w"], branching_init)
    with pytest.raises(jax.errors.ConcretizationTypeError):
        check_layer(layer, X, grads=False)


def test_count_compiles_sees_a_recompile():
    f = jax.jit(lambda x: x + 1)
    a, b = jnp.ones(3), jnp.ones(4)
    f(a)
    with count_compiles() as compiles:
        f(a)
        f(b)  # new shape: one compilation
    assert len(compiles) == 1


def _two_batches(step):
    """Two calls of ``step`` through :func:`assert_compiles_once`, the second a ragged batch."""
    with assert_compiles_once(step) as watched:
        params, _ = watched(jnp.ones(3), jnp.ones((2, 4)))
        watched(params, jnp.ones((1, 4)))


def test_assert_compiles_once_names_the_argument_that_changed():
    step = jax.jit(lambda params, x: (params * 2, x))
    with pytest.raises(AssertionError) as info:
        _two_batches(step)
    assert str(info.value) == (
        "<lambda> compiled again after its first call (on call(s) 2 of 2): the arguments "
        "that changed since the first call: x: float32[2,4] -> float32[1,4]. Keep every "
        "argument's shape and dtype fixed (pad the last batch), and mark Python values that "
        "change as traced arrays, not static arguments."
    )


def test_assert_compiles_once_passes_a_stable_donating_step():
    step = jax.jit(lambda state, x: (state + x, jnp.sum(state)), donate_argnums=0)
    with assert_compiles_once(step) as watched:
        state = jnp.zeros(3)
        for _ in range(3):
            state, _ = watched(state, jnp.ones(3))  # the donated state fed forward
    np.testing.assert_array_equal(state, [3.0, 3.0, 3.0])


def _scaled(step, ns):
    with assert_compiles_once(step) as watched:
        for n in ns:
            watched({"w": jnp.ones(2)}, n)


def test_assert_compiles_once_names_a_changing_static_value():
    step = jax.jit(lambda tree, n: tree["w"] * n, static_argnums=1)
    with pytest.raises(AssertionError, match=r"call\(s\) 3 of 3\): .*: n: int 1 -> int 2\."):
        _scaled(step, (1, 1, 2))


@given(fst.float_dtypes(), cases.dense_cases())
def test_dense_computes_in_the_input_dtype(dtype, case):
    x = case.inputs[0].astype(dtype)
    params, state = case.layer.init(jax.random.key(0), x)
    y, _ = case.layer.apply(params, state, x)
    assert y.dtype == dtype
    assert y.shape == case.output_shapes


def test_check_case_passes_the_case_fields():
    case = LayerCase(fl.dense(5), (X,), output_shapes=(3, 4))
    with pytest.raises(AssertionError, match=r"output shapes \(3, 5\), documented \(3, 4\)"):
        check_case(case)
    outputs, _ = check_case(case._replace(output_shapes=(3, 5)), grads=False)
    assert outputs.shape == (3, 5)


@given(fst.layer_cases(fl.dense(2), st.tuples(fst.batch_sizes(3), fst.feature_sizes(3)),
                       output_shapes=lambda shape: (shape[0], 2)))  # fmt: skip
def test_layer_cases_draw_normal_inputs_of_the_drawn_shapes(case):
    (x,) = case.inputs
    assert x.dtype == np.float32 and 1 <= x.shape[0] <= 3 and 1 <= x.shape[1] <= 3
    assert case.output_shapes == (x.shape[0], 2)
    assert not case.train and case.grad_modes == ("fwd", "rev")


@given(fst.keys())
def test_keys_are_typed_prng_keys(key):
    assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ()
