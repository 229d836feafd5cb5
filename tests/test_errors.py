"""Errors teach: each names the layer's path, the expected and actual value, and the fix."""

import jax
import jax.numpy as jnp
import pytest

import fundl as fl

KEY = jax.random.key(0)


def seed_model():
    return fl.serial(fl.flatten(), fl.dense(128), jax.nn.relu, fl.dense(64), jax.nn.relu,
                     fl.dense(10))  # fmt: skip


def test_wrong_input_width_names_path_and_shapes():
    model = seed_model()
    params, state = model.init(KEY, jnp.zeros((1, 28, 28)))
    with pytest.raises(ValueError) as err:
        model.apply(params, state, jnp.zeros((2, 10, 10)))
    assert str(err.value) == (
        "serial[1] dense(128): input has last dimension 100, params expect 784. "
        "Feed inputs of shape (..., 784) or re-init the params on this input."
    )


def test_wrong_width_is_caught_at_trace_time_under_jit():
    model = seed_model()
    params, state = model.init(KEY, jnp.zeros((1, 28, 28)))
    with pytest.raises(ValueError, match=r"^serial\[1\] dense\(128\): input has last dimension"):
        jax.jit(model.apply)(params, state, jnp.zeros((2, 10, 10)))


def test_mismatched_params_deep_in_the_model():
    """A later layer whose params expect another width than the layer before it gives."""
    model = fl.serial(fl.dense(100), jax.nn.relu, fl.dense(64), jax.nn.relu, fl.dense(10))
    params, state = model.init(KEY, jnp.zeros((1, 5)))
    params = (params[0], params[1], {"w": jnp.zeros((128, 64)), "b": jnp.zeros(64)}, *params[3:])
    with pytest.raises(ValueError, match=r"^serial\[2\] dense\(64\): input has last dimension 100, "
                                         r"params expect 128\."):  # fmt: skip
        model.apply(params, state, jnp.zeros((1, 5)))


def test_nested_paths_are_joined():
    model = fl.serial(fl.dense(3), fl.serial(body=fl.dense(4), head=fl.dense(2)))
    params, state = model.init(KEY, jnp.zeros((1, 2)))
    bad = (params[0], {**params[1], "head": {"w": jnp.zeros((5, 2)), "b": jnp.zeros(2)}})
    with pytest.raises(ValueError, match=r"^serial\[1\]\.serial\[head\] dense\(2\): input has "
                                         r"last dimension 4, params expect 5"):  # fmt: skip
        model.apply(bad, state, jnp.zeros((1, 2)))


def test_integer_input_to_dense():
    with pytest.raises(TypeError) as err:
        fl.serial(fl.dense(4)).init(KEY, jnp.zeros((2, 3), jnp.int32))
    assert str(err.value) == (
        "serial[0] dense(4): input dtype is int32, expected a floating-point dtype. "
        "Cast it, e.g. x.astype(jnp.float32), or use fl.embedding."
    )


def test_scalar_input_to_dense():
    with pytest.raises(ValueError, match=r"^dense\(4\): input is a scalar, expected shape "
                                         r"\(\.\.\., in_features\)"):  # fmt: skip
        fl.dense(4).init(KEY, jnp.zeros(()))


def test_empty_model():
    with pytest.raises(ValueError) as err:
        fl.serial()
    assert str(err.value) == (
        "serial() needs at least one layer, got none. "
        "Pass layers, e.g. fl.serial(fl.dense(64), jax.nn.relu)."
    )


def test_uncalled_constructor():
    with pytest.raises(TypeError) as err:
        fl.serial(fl.flatten, fl.dense(3))
    assert str(err.value) == (
        "serial[0] got the layer constructor flatten itself, not a layer. "
        "Call it with its arguments, e.g. fl.flatten(...) instead of fl.flatten."
    )


def test_not_a_layer():
    with pytest.raises(TypeError, match=r"^serial\[1\] expected a fundl Layer or a function of "
                                        r"arrays, got int \(5\)"):  # fmt: skip
        fl.serial(fl.dense(3), 5)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"features must be a positive int, got 0"):
        fl.dense(0)
    with pytest.raises(ValueError, match=r"^fan_out\(times\): times must be a positive int, got 0"):
        fl.fan_out(0)
    with pytest.raises(ValueError, match=r"times must be a positive int, got 0"):
        fl.shared(fl.dense(2), 0)


def test_params_of_the_wrong_structure():
    model = fl.serial(fl.dense(3), fl.dense(2))
    params, state = model.init(KEY, jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"serial: params should be a tuple of 2 entries, got "
                                         r"length 1"):  # fmt: skip
        model.apply(params[:1], state, jnp.zeros((1, 2)))
    named = fl.serial(a=fl.dense(3), b=fl.dense(2))
    params, state = named.init(KEY, jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"params should be a dict with keys \['a', 'b'\], got "
                                         r"\['a'\]"):  # fmt: skip
        named.apply({"a": params["a"]}, state, jnp.zeros((1, 2)))


def test_residual_shape_mismatch():
    layer = fl.residual(fl.dense(5))
    params, state = layer.init(KEY, jnp.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"^residual\(dense\(5\)\): the branch maps shape "
                                         r"\(1, 3\) to \(1, 5\)"):  # fmt: skip
        layer.apply(params, state, jnp.zeros((1, 3)))


def test_parallel_input_count():
    layer = fl.parallel(fl.dense(2), fl.dense(2))
    with pytest.raises(ValueError, match=r"^parallel: expected 2 inputs \(one per layer\), got 3"):
        layer.init(KEY, jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.zeros((1, 2)))


def test_reshape_size_mismatch():
    with pytest.raises(ValueError, match=r"reshape\(\(5,\)\): cannot reshape examples of shape "
                                         r"\(2, 3\) \(6 values\) to \(5,\)"):  # fmt: skip
        fl.reshape((5,)).init(KEY, jnp.zeros((1, 2, 3)))


def test_mixed_positional_and_named():
    with pytest.raises(TypeError, match=r"pass layers either positionally or by keyword"):
        fl.serial(fl.dense(2), head=fl.dense(3))
