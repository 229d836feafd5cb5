"""dense, flatten and reshape: numbers against NumPy, dtypes, initializers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fundl as fl

pytestmark = pytest.mark.numerics  # .ci/run reruns these under a second XLA CPU configuration


def numpy_dense(x, w, b):
    """y[..., j] = sum_i x[..., i] w[i, j] + b[j], written as explicit loops over outputs."""
    y = np.zeros((*x.shape[:-1], w.shape[1]))
    for j in range(w.shape[1]):
        for i in range(w.shape[0]):
            y[..., j] += x[..., i] * w[i, j]
        y[..., j] += 0.0 if b is None else b[j]
    return y


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 5)])
def test_dense_matches_numpy(shape, use_bias):
    layer = fl.dense(7, use_bias=use_bias, b_init=jax.nn.initializers.normal(1.0))
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    params, state = layer.init(jax.random.key(0), x)
    assert set(params) == ({"w", "b"} if use_bias else {"w"})
    assert params["w"].shape == (5, 7)
    y, new_state = layer.apply(params, state, x)
    expected = numpy_dense(
        x, np.asarray(params["w"]), np.asarray(params["b"]) if use_bias else None
    )
    # float32 dots of 5 terms against float64: a few ulps of |y| ~ 3
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    assert new_state == state == ()


def test_dense_default_param_dtype_follows_x64():
    x = jnp.zeros((1, 3))
    params, _ = fl.dense(2).init(jax.random.key(0), x)
    assert params["w"].dtype == jnp.float32
    with jax.enable_x64(True):
        params, _ = fl.dense(2).init(jax.random.key(0), jnp.zeros((1, 3)))
        assert params["w"].dtype == jnp.float64


def test_dense_bf16_compute_over_f32_params():
    layer = fl.dense(4, dtype=jnp.bfloat16)
    x = jnp.ones((2, 3), jnp.float32)
    params, state = layer.init(jax.random.key(0), x)
    assert params["w"].dtype == jnp.float32  # storage stays f32
    y, _ = layer.apply(params, state, x)
    assert y.dtype == jnp.bfloat16  # compute in bf16
    y32, _ = fl.dense(4).apply(params, state, x)
    np.testing.assert_allclose(y.astype(jnp.float32), y32, rtol=2e-2, atol=2e-2)  # bf16: 8 bits
    # gradients flow to the f32 params
    g = jax.grad(lambda p: layer.apply(p, state, x)[0].astype(jnp.float32).sum())(params)
    assert g["w"].dtype == jnp.float32


def test_dense_param_dtype_bf16_storage():
    params, _ = fl.dense(4, param_dtype=jnp.bfloat16).init(jax.random.key(0), jnp.zeros((1, 3)))
    assert params["w"].dtype == jnp.bfloat16


def test_dense_initializers_are_used():
    layer = fl.dense(3, w_init=jax.nn.initializers.ones, b_init=jax.nn.initializers.constant(2.0))
    params, _ = layer.init(jax.random.key(0), jnp.zeros((1, 4)))
    np.testing.assert_array_equal(params["w"], np.ones((4, 3)))
    np.testing.assert_array_equal(params["b"], np.full(3, 2.0))


def test_dense_default_init_is_glorot_uniform():
    params, _ = fl.dense(200).init(jax.random.key(0), jnp.zeros((1, 300)))
    limit = np.sqrt(6.0 / (300 + 200))
    w = np.asarray(params["w"])
    assert np.abs(w).max() <= limit
    assert np.abs(w).max() > 0.95 * limit  # fills the range, not a narrower init
    np.testing.assert_array_equal(params["b"], np.zeros(200))


def test_init_allocates_nothing_under_eval_shape():
    model = fl.serial(fl.flatten(), fl.dense(5), jax.nn.relu, fl.dense(2))
    spec = jax.ShapeDtypeStruct((1, 4, 4), jnp.float32)
    params, state = jax.eval_shape(model.init, jax.random.key(0), spec)
    leaves = jax.tree_util.tree_leaves(params)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    assert [leaf.shape for leaf in leaves] == [(5,), (16, 5), (2,), (5, 2)]


def test_flatten_and_reshape():
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    y, _ = fl.flatten().apply((), (), x)
    np.testing.assert_array_equal(y, x.reshape(2, 12))
    z, _ = fl.reshape((4, 3)).apply((), (), x)
    np.testing.assert_array_equal(z, x.reshape(2, 4, 3))
    z, _ = fl.reshape((-1, 2)).apply((), (), x)
    assert z.shape == (2, 6, 2)


def test_activations_are_jax_nn():
    for name in ["relu", "leaky_relu", "elu", "gelu", "silu", "swish", "sigmoid", "tanh"]:
        assert getattr(fl, name) is getattr(jax.nn, name)
    assert fl.softmax is jax.nn.softmax
    assert fl.log_softmax is jax.nn.log_softmax
