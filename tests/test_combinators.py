"""serial, parallel, branch, fan-in/out, residual, shared and function: wiring and keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fundl as fl
from fundl.core import Layer

pytestmark = pytest.mark.numerics  # .ci/run reruns these under a second XLA CPU configuration
F32_EPS = float(np.finfo(np.float32).eps)


def draw_layer(name="draw"):
    """A stochastic test layer: returns a uniform draw of the input's shape from its key."""

    def init(key, x):
        return (), ()

    def apply(params, state, x, key=None, train=False):
        if key is None:
            raise ValueError(f"{name}: needs a key")
        return jax.random.uniform(key, x.shape), state

    return Layer(init, apply)


def test_serial_tuple_params_and_named_params():
    x = jnp.ones((2, 3))
    params, state = fl.serial(fl.dense(4), jax.nn.relu, fl.dense(2)).init(jax.random.key(0), x)
    assert isinstance(params, tuple) and len(params) == 3 and params[1] == ()
    model = fl.serial(body=fl.dense(4), act=jax.nn.relu, head=fl.dense(2))
    params, state = model.init(jax.random.key(0), x)
    assert list(params) == ["body", "act", "head"]
    assert params["head"]["w"].shape == (4, 2)
    y, _ = model.apply(params, state, x)
    h = jax.nn.relu(x @ params["body"]["w"] + params["body"]["b"][None])
    expected = h @ params["head"]["w"] + params["head"]["b"][None]
    # fl.dense's matmul and this one compile differently: float32 dots of 3 and 4 terms
    np.testing.assert_allclose(y, expected, rtol=16 * F32_EPS, atol=16 * F32_EPS)


def test_named_params_allow_surgery():
    """Swapping the head for a new one (transfer learning) keeps the body's params."""
    x = jnp.ones((2, 3))
    old = fl.serial(body=fl.dense(4), head=fl.dense(2))
    new = fl.serial(body=fl.dense(4), head=fl.dense(5))
    old_params, _ = old.init(jax.random.key(0), x)
    new_params, state = new.init(jax.random.key(1), x)
    new_params = {**new_params, "body": old_params["body"]}
    y, _ = new.apply(new_params, state, x)
    assert y.shape == (2, 5)


def test_serial_splits_keys_per_layer():
    model = fl.serial(draw_layer(), draw_layer())
    params, state = model.init(jax.random.key(0), jnp.zeros((3,)))
    # the output is the second layer's draw, made from the second of the split keys
    out2, _ = model.apply(params, state, jnp.zeros(3), key=jax.random.key(1))
    k0, k1 = jax.random.split(jax.random.key(1))
    # random bits are integer arithmetic and uniform's float conversion sets bits: exact
    np.testing.assert_array_equal(out2, jax.random.uniform(k1, (3,)))
    assert not np.array_equal(jax.random.uniform(k0, (3,)), out2)


def test_serial_init_keys_differ_per_layer():
    model = fl.serial(fl.dense(3), fl.dense(3))
    params, _ = model.init(jax.random.key(0), jnp.zeros((1, 3)))
    assert not np.array_equal(params[0]["w"], params[1]["w"])


def test_parallel_and_fan_in():
    x, y = jnp.ones((2, 3)), jnp.ones((2, 5))
    model = fl.parallel(fl.dense(4), fl.dense(6))
    params, state = model.init(jax.random.key(0), x, y)
    (a, b), _ = model.apply(params, state, x, y)
    assert a.shape == (2, 4) and b.shape == (2, 6)
    (a2, b2), _ = model.apply(params, state, (x, y))  # one tuple input, as in a chain
    # the same eager ops on the same arrays: bitwise equal
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(b, b2)


def test_branch_concat_and_sum():
    x = jnp.arange(6.0).reshape(2, 3)
    model = fl.serial(fl.branch(fl.identity(), jnp.negative, jnp.square), fl.fan_in_concat())
    params, state = model.init(jax.random.key(0), x)
    y, _ = model.apply(params, state, x)
    # x holds small integers: every value below is exact in float32 however it is computed
    np.testing.assert_array_equal(y, np.concatenate([x, -x, x**2], axis=-1))
    model = fl.serial(fl.fan_out(3), fl.parallel(fl.identity(), jnp.negative, jnp.square),
                      fl.fan_in_sum())  # fmt: skip
    y, _ = model.apply(*model.init(jax.random.key(0), x), x)
    np.testing.assert_array_equal(y, x + -x + x**2)


def test_residual_adds_input():
    x = jnp.arange(6.0).reshape(2, 3)
    model = fl.residual(fl.dense(3))
    params, state = model.init(jax.random.key(0), x)
    y, _ = model.apply(params, state, x)
    expected = x + x @ params["w"] + params["b"][None]
    # a float32 dot of 3 terms of |x| <= 5, compiled apart from fl.dense's
    np.testing.assert_allclose(y, expected, rtol=16 * F32_EPS, atol=5 * 16 * F32_EPS)


def test_shared_applies_the_same_params():
    x = jnp.ones((2, 3))
    model = fl.shared(fl.dense(3), times=3)
    params, state = model.init(jax.random.key(0), x)
    assert params["w"].shape == (3, 3)  # one set of params
    y, _ = model.apply(params, state, x)
    h = x
    for _ in range(3):
        h = h @ params["w"] + params["b"][None]
    np.testing.assert_allclose(y, h, rtol=1e-5)  # three float32 dense layers: ~100 ulps
    # gradients accumulate over the three uses
    g = jax.grad(lambda p: model.apply(p, state, x)[0].sum())(params)
    assert np.abs(np.asarray(g["w"])).sum() > 0


def test_same_params_applied_twice_by_hand():
    """Weight tying by hand: one layer's params used at two places of a custom layer."""
    enc = fl.dense(3)

    def init(key, x):
        return enc.init(key, x)

    def apply(params, state, x, key=None, train=False):
        h, state = enc.apply(params, state, x)
        y, state = enc.apply(params, state, h)
        return y, state

    tied = Layer(init, apply)
    params, state = tied.init(jax.random.key(0), jnp.ones((1, 3)))
    y, _ = tied.apply(params, state, jnp.ones((1, 3)))
    w, b = params["w"], params["b"][None]
    # two float32 dense layers, compiled apart from fl.dense's: ~100 ulps
    np.testing.assert_allclose(y, (jnp.ones((1, 3)) @ w + b) @ w + b, rtol=1e-5)


def test_function_layer_and_stateless_state_passthrough():
    layer = fl.function(lambda x: 2 * x, name="double")
    assert layer.name == "double"
    params, state = layer.init(jax.random.key(0), jnp.ones(2))
    assert params == () and state == ()
    y, s = layer.apply(params, state, jnp.ones(2))
    np.testing.assert_array_equal(y, [2.0, 2.0])
    assert s == ()


def test_layer_unpacks_like_a_tuple():
    init, apply = fl.dense(2)
    params, state = init(jax.random.key(0), jnp.ones((1, 3)))
    assert apply(params, state, jnp.ones((1, 3)))[0].shape == (1, 2)


def test_model_works_with_optax_and_tree_util():
    import optax

    model = fl.serial(fl.dense(4), jax.nn.relu, fl.dense(1))
    x = jnp.ones((2, 3))
    params, state = model.init(jax.random.key(0), x)
    opt = optax.sgd(0.1)
    opt_state = opt.init(params)
    grads = jax.grad(lambda p: model.apply(p, state, x)[0].sum())(params)
    updates, opt_state = opt.update(grads, opt_state)
    new = optax.apply_updates(params, updates)
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(params)


def test_jitted_step_does_not_recompile():
    from fundl.testing import count_compiles

    model = fl.serial(fl.flatten(), fl.dense(8), jax.nn.relu, fl.dense(3))
    x = jnp.ones((4, 2, 2))
    params, state = model.init(jax.random.key(0), x)

    @jax.jit
    def step(params, x):
        g = jax.grad(lambda p: model.apply(p, state, x)[0].sum())(params)
        return jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, g)

    params = step(params, x)
    x1, x2 = x + 1, x + 2  # eager ops compile too: make the inputs outside the count
    with count_compiles() as compiles:
        params = step(params, x1)
        params = step(params, x2)
    assert compiles == []


@pytest.mark.parametrize(
    "build",
    [lambda: fl.serial(), lambda: fl.parallel(), lambda: fl.branch()],
    ids=["serial", "parallel", "branch"],
)
def test_empty_combinators_raise(build):
    with pytest.raises(ValueError, match=r"needs at least one layer, got none"):
        build()


def test_repeat_of_a_layer_without_params():
    stack = fl.repeat(jnp.tanh, 3)
    x = np.array([0.5, -2.0], np.float32)
    y, _ = stack.apply(*stack.init(jax.random.key(0), x), x)
    np.testing.assert_allclose(y, np.tanh(np.tanh(np.tanh(x))), rtol=1e-6)  # jnp vs np tanh
