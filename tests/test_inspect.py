"""fl.layer_paths, fl.capture and fl.submodel: a hidden layer's output by its path."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fundl as fl

pytestmark = pytest.mark.numerics  # captured values against NumPy and across compilations

X = np.random.default_rng(0).normal(size=(5, 8, 8)).astype(np.float32)  # digits-sized images
# Same computation, compiled differently (a whole model vs its first layers): a few float32
# roundings apart at most.
TOL = dict(rtol=1e-5, atol=1e-6)


def digits_mlp():
    return fl.serial(
        fl.flatten(), fl.dense(16), jax.nn.relu, fl.dense(12), jax.nn.relu, fl.dense(10)
    )


def digits_cnn():
    return fl.serial(
        features=fl.serial(fl.reshape((8, 8, 1)), fl.conv(4, 3), jax.nn.relu, fl.max_pool(2)),
        head=fl.serial(fl.flatten(), fl.dense(10)),
    )


def init(model, x=X):
    return model.init(jax.random.key(0), x)


def test_layer_paths_are_the_paths_errors_print():
    model = digits_cnn()
    paths = fl.layer_paths(model)
    assert list(paths)[:3] == ["serial[features]", "serial[features].serial[0]",
                               "serial[features].serial[1]"]  # fmt: skip
    assert paths["serial[head].serial[1]"].name == "dense(10)"
    params, state = init(model)
    params["head"][1]["w"] = params["head"][1]["w"][:3]  # a wrong shape: the error's path
    with pytest.raises(ValueError, match=r"^serial\[head\]\.serial\[1\] dense\(10\)"):
        model.apply(params, state, X)
    assert fl.layer_paths(fl.dense(3)) == {}


def test_capture_a_hidden_layer_of_the_digits_mlp_against_numpy():
    model = digits_mlp()
    params, state = init(model)
    (logits, captured), new_state = fl.capture(model, ["serial[2]"]).apply(params, state, X)
    w, b = np.asarray(params[1]["w"]), np.asarray(params[1]["b"])
    hidden = np.maximum(X.reshape(5, 64) @ w + b, 0.0)
    np.testing.assert_allclose(captured["serial[2]"], hidden, **TOL)
    np.testing.assert_allclose(logits, model.apply(params, state, X)[0], **TOL)
    assert list(captured) == ["serial[2]"] and new_state == state


def test_capture_equals_the_submodel_in_the_digits_cnn():
    model = digits_cnn()
    params, state = init(model)
    path = "serial[features].serial[2]"
    (_, captured), _ = fl.capture(model, [path]).apply(params, state, X)
    alone, _ = fl.submodel(model, path).apply(params, state, X)
    assert alone.shape == (5, 8, 8, 4)
    np.testing.assert_allclose(captured[path], alone, **TOL)


def test_submodel_does_not_run_the_layers_after_the_path():
    def boom(x):  # init runs it on a batch of 1
        if x.shape[0] > 1:
            raise ValueError("this layer ran")
        return x

    model = fl.serial(fl.dense(4), fl.serial(jnp.tanh, boom), boom)
    params, state = init(model, X[:1, 0])
    y, _ = fl.submodel(model, "serial[1].serial[0]").apply(params, state, X[:, 0])
    w, b = np.asarray(params[0]["w"]), np.asarray(params[0]["b"])
    np.testing.assert_allclose(y, np.tanh(X[:, 0] @ w + b), **TOL)
    with pytest.raises(ValueError, match="this layer ran"):
        fl.capture(model, ["serial[1].serial[0]"]).apply(params, state, X[:, 0])


def test_capture_under_jit_grad_and_vmap():
    model = digits_mlp()
    params, state = init(model)
    path = "serial[4]"
    captured_model, sub = fl.capture(model, [path]), fl.submodel(model, path)

    def by_capture(p, x):
        return jnp.sum(captured_model.apply(p, state, x)[0][1][path] ** 2)

    def by_submodel(p, x):
        return jnp.sum(sub.apply(p, state, x)[0] ** 2)

    g1, g2 = jax.jit(jax.grad(by_capture))(params, X), jax.grad(by_submodel)(params, X)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), g1, g2)
    assert not np.any(g1[5]["w"])  # the head does not reach the captured value
    one = jax.vmap(lambda x: captured_model.apply(params, state, x[None])[0][1][path][0])(X)
    batch = captured_model.apply(params, state, X)[0][1][path]
    np.testing.assert_allclose(one, batch, **TOL)


@pytest.mark.slow  # a scan and a batch norm to compile, eagerly
def test_capture_inside_repeat_is_stacked_per_copy():
    block = fl.serial(fl.dense(6), jnp.tanh)
    model = fl.serial(fl.dense(6), fl.repeat(block, 3))
    x = X[:, 0]
    params, state = init(model, x)
    (y, captured), _ = fl.capture(model, ["serial[1].repeat.serial[1]"]).apply(params, state, x)
    h, expected = x @ np.asarray(params[0]["w"]) + np.asarray(params[0]["b"]), []
    for i in range(3):  # NumPy, block by block
        h = np.tanh(h @ np.asarray(params[1][0]["w"][i]) + np.asarray(params[1][0]["b"][i]))
        expected.append(h)
    np.testing.assert_allclose(captured["serial[1].repeat.serial[1]"], np.stack(expected), **TOL)
    np.testing.assert_allclose(y, expected[-1], **TOL)


@pytest.mark.slow  # a scan and a batch norm to compile, eagerly
def test_capture_keeps_the_state_of_a_stateful_model():
    model = fl.serial(fl.flatten(), fl.dense(8), fl.batch_norm(), fl.shared(fl.dense(8), 2))
    params, state = init(model)
    paths = ["serial[2]", "serial[3].shared"]
    (y, captured), new = fl.capture(model, paths).apply(params, state, X, train=True)
    y_ref, new_ref = model.apply(params, state, X, train=True)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), new, new_ref)
    np.testing.assert_allclose(captured["serial[3].shared"], y_ref, **TOL)  # the last call
    assert captured["serial[2]"].shape == (5, 8)


def test_a_wrong_path_lists_the_paths_there_are():
    model = digits_mlp()
    with pytest.raises(ValueError, match=r"no layer at path 'serial\[9\]'.*\n  serial\[0\]  "
                       r"flatten\n  serial\[1\]  dense\(16\)"):  # fmt: skip
        fl.capture(model, ["serial[9]"])
    with pytest.raises(ValueError, match="no layer at path 'serial1'"):
        fl.submodel(model, "serial1")
    with pytest.raises(TypeError, match=r"a list of path strings.*\['serial\[1\]'\]"):
        fl.capture(model, "serial[1]")


def test_an_unused_capture_costs_nothing():
    model = fl.serial(fl.flatten(), fl.dense(16), jax.nn.relu, fl.dropout(0.5), fl.dense(10))
    params, state = init(model)
    opt = optax.sgd(0.1)
    labels = jnp.arange(5) % 10

    def step_text(apply):
        def step(params, opt_state, x, key):
            def loss(p):
                logits, _ = apply(p, state, x, key=key, train=True)
                return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

            grads = jax.grad(loss)(params)
            updates, opt_state = opt.update(grads, opt_state)
            return optax.apply_updates(params, updates), opt_state

        args = (params, opt.init(params), X, jax.random.key(1))
        return jax.jit(step).lower(*args).as_text()

    def through_capture(*args, **kwargs):
        (out, captured), state = fl.capture(model, []).apply(*args, **kwargs)
        return out, state

    assert step_text(through_capture) == step_text(model.apply)
