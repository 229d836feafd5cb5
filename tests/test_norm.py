"""Normalization: batch_norm's statistics and state against NumPy, the other norms against
NumPy formulas, properties (inference is affine), state threading, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fundl as fl
from fundl.testing import assert_trees_close, check_layer

pytestmark = pytest.mark.numerics  # .ci/run reruns these under a second XLA CPU configuration
F32_EPS = float(np.finfo(np.float32).eps)


def np_batch_norm_steps(xs, momentum, eps, scale, bias):
    """Training-mode outputs of each batch in ``xs`` and the final running statistics."""
    mean_r = np.zeros(xs[0].shape[-1])
    var_r = np.ones(xs[0].shape[-1])
    outs = []
    for x in xs:
        x = np.asarray(x, np.float64)
        flat = x.reshape(-1, x.shape[-1])
        mu = flat.sum(0) / len(flat)
        var = ((flat - mu) ** 2).sum(0) / len(flat)
        outs.append((x - mu) / np.sqrt(var + eps) * scale + bias)
        mean_r = momentum * mean_r + (1 - momentum) * mu
        var_r = momentum * var_r + (1 - momentum) * var
    return outs, mean_r, var_r


@given(
    st.sampled_from([(4, 3), (2, 5, 3), (3, 4, 4, 2), (2, 2, 2, 2, 3)]),
    st.sampled_from([0.0, 0.5, 0.9, 0.99]),
    st.integers(0, 1000),
)
def test_batch_norm_train_and_inference_match_numpy_under_jit(shape, momentum, seed):
    rng = np.random.default_rng(seed)
    xs = [(rng.standard_normal(shape) * 3 + 2).astype(np.float32) for _ in range(3)]
    layer = fl.batch_norm(momentum=momentum, epsilon=1e-3)
    params, state = layer.init(jax.random.key(0), xs[0])
    params = {"scale": jnp.asarray(rng.uniform(0.5, 2, shape[-1]), jnp.float32),
              "bias": jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)}  # fmt: skip
    apply = jax.jit(layer.apply, static_argnames="train")
    outs = []
    for x in xs:
        y, state = apply(params, state, x, train=True)
        outs.append(y)
    scale, bias = np.asarray(params["scale"]), np.asarray(params["bias"])
    expected, mean_r, var_r = np_batch_norm_steps(xs, momentum, 1e-3, scale, bias)
    assert isinstance(state, fl.BatchNormState)
    # float32 statistics of up to 48 values against float64: ~sqrt(48) ulps, times 3 steps
    np.testing.assert_allclose(np.asarray(state.mean), mean_r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.var), var_r, rtol=1e-5, atol=1e-6)
    for y, e in zip(outs, expected, strict=True):
        np.testing.assert_allclose(np.asarray(y), e, rtol=1e-4, atol=1e-4)  # |y| ~ 10, float32
    # inference: the running statistics, and the state is returned unchanged
    x = xs[0]
    y, after = apply(params, state, x, train=False)
    e = (x - mean_r) / np.sqrt(var_r + 1e-3) * scale + bias
    np.testing.assert_allclose(np.asarray(y), e, rtol=1e-4, atol=1e-4)  # |y| ~ 10, float32
    # inference returns the state it was given, untouched: bitwise
    jax.tree_util.tree_map(np.testing.assert_array_equal, after, state)


@given(st.integers(0, 1000), st.floats(-3, 3))
def test_batch_norm_inference_is_affine(seed, a):
    """f(a x1 + (1 - a) x2) == a f(x1) + (1 - a) f(x2) for any real a: f is affine."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(seed)
        layer = fl.batch_norm(momentum=0.5)
        x1, x2 = (jnp.asarray(rng.standard_normal((3, 4, 2))) for _ in range(2))
        params, state = layer.init(jax.random.key(0), x1)
        _, state = layer.apply(params, state, x1 * 2 + 1, train=True)  # non-trivial stats
        params = {"scale": jnp.asarray([2.0, -1.0]), "bias": jnp.asarray([0.5, 3.0])}

        def f(x):
            return layer.apply(params, state, x)[0]

        # float64 (eps 2e-16) on values ~10: 1e-10 leaves room for any evaluation order
        np.testing.assert_allclose(
            f(a * x1 + (1 - a) * x2), a * f(x1) + (1 - a) * f(x2), rtol=1e-10, atol=1e-10
        )


def test_batch_norm_options_and_param_tree():
    layer = fl.batch_norm(use_scale=False)
    params, state = layer.init(jax.random.key(0), jnp.zeros((1, 3)))
    assert jax.tree_util.tree_map(jnp.shape, params) == {"bias": (3,)}
    assert state._asdict().keys() == {"mean", "var"}
    assert (
        fl.batch_norm(use_bias=False, use_scale=False).init(jax.random.key(0), jnp.zeros((1, 3)))[0]
        == {}
    )


@given(st.integers(0, 1000), st.sampled_from([(2, 6), (2, 3, 6), (1, 2, 2, 6)]))
def test_layer_group_rms_norm_match_numpy(seed, shape):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    scale = rng.uniform(0.5, 2, shape[-1]).astype(np.float32)
    bias = rng.standard_normal(shape[-1]).astype(np.float32)
    p = {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}
    xd = x.astype(np.float64)

    def close(actual, expected, spread):
        # float32 rounds x - mean by ~eps * |x|, which normalizing divides by the spread of
        # the values normalized together: a group of nearly equal values is ill-conditioned,
        # so the tolerance grows with |x| / spread (hypothesis found groups of two values
        # 3e-3 apart, off by 6e-5); well-spread groups keep the 1e-5 tolerance.
        tol = 1e-5 + 1e-5 * np.abs(expected) + 8 * np.finfo(np.float32).eps * spread * scale
        assert np.all(np.abs(np.asarray(actual) - expected) <= tol)

    y, _ = fl.layer_norm(epsilon=1e-5).apply(p, (), x)
    mu, var = xd.mean(-1, keepdims=True), xd.var(-1, keepdims=True)
    cond = np.abs(xd).max(-1, keepdims=True) / np.sqrt(var + 1e-5)
    close(y, (xd - mu) / np.sqrt(var + 1e-5) * scale + bias, cond)

    y, _ = fl.rms_norm(epsilon=1e-6).apply({"scale": p["scale"]}, (), x)
    ms = (xd**2).mean(-1, keepdims=True)
    # no subtraction, so well conditioned: a float32 mean of 6 squares, ~10 ulps
    np.testing.assert_allclose(np.asarray(y), xd / np.sqrt(ms + 1e-6) * scale, rtol=1e-5, atol=1e-5)

    groups = 3
    y, _ = fl.group_norm(groups, epsilon=1e-5).apply(p, (), x)
    expected, cond = np.empty_like(xd), np.empty_like(xd)
    per = shape[-1] // groups
    for b in range(shape[0]):
        for g in range(groups):
            block = xd[b, ..., g * per : (g + 1) * per]
            std = np.sqrt(block.var() + 1e-5)
            expected[b, ..., g * per : (g + 1) * per] = (block - block.mean()) / std
            cond[b, ..., g * per : (g + 1) * per] = np.abs(block).max() / std
    close(y, expected * scale + bias, cond)


def test_norms_keep_bfloat16_compute_dtype():
    x = jnp.ones((2, 4), jnp.bfloat16)
    for layer in (fl.batch_norm(), fl.layer_norm(), fl.group_norm(2), fl.rms_norm()):
        params, state = layer.init(jax.random.key(0), x)
        assert layer.apply(params, state, x, train=True)[0].dtype == jnp.bfloat16, layer.name


def test_state_threads_through_serial_in_train_and_inference():
    model = fl.serial(
        fl.conv(4, (3, 3)), fl.batch_norm(), jax.nn.relu, fl.max_pool((2, 2)),
        fl.dropout(0.5), fl.flatten(), fl.dense(3), fl.batch_norm(),
    )  # fmt: skip
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6, 6, 1)), jnp.float32)
    params, state = model.init(jax.random.key(0), x)
    _, trained = model.apply(params, state, x, key=jax.random.key(1), train=True)
    for i in (1, 7):
        assert not np.allclose(trained[i].mean, state[i].mean)
    _, same = model.apply(params, trained, x)
    # inference returns the state it was given, untouched: bitwise
    jax.tree_util.tree_map(np.testing.assert_array_equal, same, trained)
    # a jitted optax step: the new state comes back with the loss
    opt = optax.sgd(0.1)

    @jax.jit
    def step(params, state, opt_state, key):
        def loss(p):
            y, s = model.apply(p, state, x, key=key, train=True)
            return jnp.mean(y**2), s

        (value, state), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), state, opt_state, value

    _, s2, _, _ = step(params, state, opt.init(params), jax.random.key(1))
    # jit vs eager: the batch statistics are float32 sums over batch * height * width = 144
    # values, which the jitted step fuses and orders differently: up to ~144 ulps relative
    tol = 144 * F32_EPS
    assert_trees_close(s2, trained, atol=tol, rtol=tol, what="jitted step vs eager state")


def test_every_combinator_threads_batch_norm_state():
    """parallel, branch, residual and shared return the updated state of a batch_norm inside,
    and inference leaves it alone."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)) + 5.0, jnp.float32)
    key = jax.random.key(0)
    models = {
        "parallel": fl.parallel(fl.batch_norm(0.5), fl.dropout(0.5)),
        "branch": fl.serial(fl.branch(fl.batch_norm(0.5), fl.dropout(0.5)), fl.fan_in_sum()),
        "residual": fl.residual(fl.serial(fl.dense(3), fl.batch_norm(0.5))),
        "shared": fl.shared(fl.batch_norm(0.5), 2),
    }
    for name, model in models.items():
        inputs = (x, x) if name == "parallel" else (x,)
        params, state = model.init(key, *inputs)
        _, trained = model.apply(params, state, *inputs, key=key, train=True)
        means = [s.mean for s in jax.tree_util.tree_leaves(
            trained, is_leaf=lambda s: isinstance(s, fl.BatchNormState)
        ) if isinstance(s, fl.BatchNormState)]  # fmt: skip
        assert len(means) == 1, name
        assert np.abs(np.asarray(means[0])).min() > 0.1, name  # moved away from its start, 0
        _, same = model.apply(params, trained, *inputs)
        # inference returns the state it was given, untouched: bitwise
        jax.tree_util.tree_map(np.testing.assert_array_equal, same, trained)
    # shared applies the layer twice, threading the state: the first update gives
    # 0.5 * mean(x); the second sees the normalized output (mean 0): 0.25 * mean(x)
    bn = fl.shared(fl.batch_norm(0.5), 2)
    params, state = bn.init(key, x)
    _, state = bn.apply(params, state, x, train=True)
    expected = 0.25 * np.asarray(x, np.float64).mean(0)
    np.testing.assert_allclose(np.asarray(state.mean), expected, rtol=1e-5, atol=1e-6)


def test_cnn_in_training_mode_keeps_the_contract():
    """A serial mixing conv, batch_norm, pooling, dropout and dense: check_layer in training
    mode (batch statistics, state update, a dropout mask from a fixed key)."""
    model = fl.serial(fl.conv(2, (3, 3)), fl.batch_norm(), jax.nn.relu, fl.avg_pool((2, 2)),
                      fl.dropout(0.25), fl.flatten(), fl.dense(3))  # fmt: skip
    x = np.random.default_rng(0).standard_normal((2, 4, 4, 2)).astype(np.float32)
    out, state = check_layer(model, x, train=True, output_shapes=(2, 3))
    assert state[1].mean.shape == (2,)


def test_errors():
    with pytest.raises(ValueError) as err:
        fl.batch_norm(momentum=1.0)
    assert str(err.value) == ("batch_norm(momentum=1.0): momentum must be in [0, 1), got 1.0.")
    with pytest.raises(ValueError, match=r"^layer_norm\(epsilon=0\.0\): epsilon must be > 0"):
        fl.layer_norm(epsilon=0.0)
    with pytest.raises(ValueError) as err:
        fl.group_norm(4).init(jax.random.key(0), jnp.zeros((1, 5, 6)))
    assert str(err.value) == (
        "group_norm(4): input has 6 features (channels), not divisible by num_groups=4. Use a "
        "number of groups that divides 6."
    )
    with pytest.raises(ValueError, match=r"^batch_norm\(.*\): input has shape \(3,\), expected"):
        fl.batch_norm().init(jax.random.key(0), jnp.zeros(3))
    bn = fl.batch_norm()
    params, state = bn.init(jax.random.key(0), jnp.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"input has 4 features, params have shape \(3,\)"):
        bn.apply(params, state, jnp.zeros((1, 4)))
