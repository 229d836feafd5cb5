"""remat and repeat(remat=True): the same numbers as the plain layer, with less memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fundl as fl
from fundl.core import layer_info

pytestmark = pytest.mark.numerics  # .ci/run reruns these under a second XLA CPU configuration
# remat runs the same ops, but the rematerialized program is compiled separately (XLA may
# fuse and order the float64 sums differently): equal to a few float64 ulps.
F64_TOL = 64 * float(np.finfo(np.float64).eps)


def loss_of(model, state, key=None):
    def loss(params, x):
        y, new_state = model.apply(params, state, x, key=key, train=True)
        return jnp.sum(y**2), new_state

    return loss


def test_remat_matches_numpy_and_the_plain_layer():
    """y = tanh(x W + b) and the gradient of sum(y), against NumPy's hand-written backprop."""
    with jax.enable_x64(True):
        plain = fl.serial(fl.dense(5), jnp.tanh)
        model = fl.remat(plain, policy=jax.checkpoint_policies.dots_saveable)
        x = jax.random.normal(jax.random.key(1), (3, 4), jnp.float64)
        params, state = model.init(jax.random.key(0), x)
        y, _ = model.apply(params, state, x)
        grads = jax.grad(lambda p: jnp.sum(model.apply(p, state, x)[0]))(params)

        w, b = (np.asarray(params[0][k]) for k in ("w", "b"))
        ref = np.tanh(np.asarray(x) @ w + b)
        np.testing.assert_allclose(y, ref, rtol=F64_TOL, atol=F64_TOL)
        dz = 1.0 - ref**2  # d tanh(z) / dz, summed over the outputs
        np.testing.assert_allclose(grads[0]["w"], np.asarray(x).T @ dz, rtol=F64_TOL, atol=F64_TOL)
        np.testing.assert_allclose(grads[0]["b"], dz.sum(0), rtol=F64_TOL, atol=F64_TOL)

        plain_grads = jax.grad(lambda p: jnp.sum(plain.apply(p, state, x)[0]))(params)
        fl.testing.assert_trees_close(grads, plain_grads, rtol=F64_TOL, atol=F64_TOL, what="grads")


def test_keys_state_and_train_flow_through():
    """Dropout draws the same mask from the same key; batch norm's statistics update alike."""
    with jax.enable_x64(True):
        plain = fl.serial(fl.dense(6), fl.batch_norm(), jax.nn.relu, fl.dropout(0.5))
        model = fl.remat(plain)
        x = jax.random.normal(jax.random.key(1), (8, 3), jnp.float64)
        params, state = model.init(jax.random.key(0), x)
        key = jax.random.key(2)
        (a, sa), ga = jax.value_and_grad(loss_of(model, state, key), has_aux=True)(params, x)
        (b, sb), gb = jax.value_and_grad(loss_of(plain, state, key), has_aux=True)(params, x)
        np.testing.assert_allclose(a, b, rtol=F64_TOL)
        fl.testing.assert_trees_close(sa, sb, rtol=F64_TOL, atol=F64_TOL, what="state")
        fl.testing.assert_trees_close(ga, gb, rtol=F64_TOL, atol=F64_TOL, what="grads")
        assert not np.allclose(sa[1].mean, state[1].mean)  # the statistics did move
        with pytest.raises(ValueError, match=r"remat.*dropout.*key"):
            model.apply(params, state, x, train=True)  # no key in training: the child says so


def test_remat_under_jit_vmap_and_grad():
    with jax.enable_x64(True):
        model = fl.remat(fl.serial(fl.dense(4), jnp.tanh, fl.dense(2)))
        x = jax.random.normal(jax.random.key(1), (5, 3), jnp.float64)
        params, state = model.init(jax.random.key(0), x)
        eager, _ = model.apply(params, state, x)
        jitted, _ = jax.jit(model.apply)(params, state, x)
        mapped, _ = jax.vmap(model.apply, in_axes=(None, None, 0))(params, state, x)
        np.testing.assert_allclose(jitted, eager, rtol=F64_TOL, atol=F64_TOL)
        np.testing.assert_allclose(mapped, eager, rtol=F64_TOL, atol=F64_TOL)
        grad = jax.jit(jax.grad(lambda p: loss_of(model, state)(p, x)[0]))(params)
        plain = layer_info(model).children[0][1]
        expected = jax.grad(lambda p: loss_of(plain, state)(p, x)[0])(params)
        fl.testing.assert_trees_close(grad, expected, rtol=F64_TOL, atol=F64_TOL, what="grads")


def test_repeat_remat_matches_plain_repeat():
    with jax.enable_x64(True):
        block = fl.serial(fl.dense(8), jnp.tanh, fl.dropout(0.1))
        x = jax.random.normal(jax.random.key(1), (4, 8), jnp.float64)
        plain, model = fl.repeat(block, 3), fl.repeat(block, 3, remat=True)
        params, state = model.init(jax.random.key(0), x)
        key = jax.random.key(2)
        ga = jax.grad(lambda p: loss_of(model, state, key)(p, x)[0])(params)
        gb = jax.grad(lambda p: loss_of(plain, state, key)(p, x)[0])(params)
        fl.testing.assert_trees_close(ga, gb, rtol=F64_TOL, atol=F64_TOL, what="grads")


def test_name_children_and_error_paths():
    inner = fl.dense(4)
    model = fl.remat(inner)
    assert model.name == "remat(dense(4))"
    assert layer_info(model).children == (("remat", inner),)
    net = fl.serial(fl.dense(3), model)
    params, state = net.init(jax.random.key(0), jnp.zeros((2, 3)))
    params = (params[0], {"w": jnp.zeros((5, 4)), "b": jnp.zeros(4)})
    with pytest.raises(ValueError) as err:
        net.apply(params, state, jnp.zeros((2, 3)))
    assert str(err.value).startswith(
        "serial[1].remat dense(4): input has last dimension 3, params expect 5."
    )


def test_bad_options_say_what_to_pass():
    with pytest.raises(TypeError, match=r"remat\(dense\(4\)\): policy must be a function"):
        fl.remat(fl.dense(4), policy="dots_saveable")
    with pytest.raises(TypeError, match=r"remat must be True or False.*fl\.remat\(layer, pol"):
        fl.repeat(fl.dense(4), 2, remat=jax.checkpoint_policies.dots_saveable)


def train_step_temp_bytes(remat: bool) -> int:
    """XLA's scratch memory of the compiled gradient of a deep dense+tanh stack."""
    model = fl.repeat(fl.serial(fl.dense(128), jnp.tanh), 16, remat=remat)
    x = jnp.zeros((64, 128))
    params, state = model.init(jax.random.key(0), x)
    grad = jax.jit(jax.grad(lambda p, x: loss_of(model, state)(p, x)[0]))
    return grad.lower(params, x).compile().memory_analysis().temp_size_in_bytes


def test_repeat_remat_lowers_the_gradients_memory():
    """Without remat the scan keeps every block's intermediates for the backward pass; with
    it, only each block's input: XLA's own accounting of the compiled program shows it."""
    plain, remat = train_step_temp_bytes(False), train_step_temp_bytes(True)
    assert remat < 0.6 * plain, (remat, plain)
