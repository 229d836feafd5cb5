"""dropout: inference is the identity, training needs a key, the mean is preserved, masks are
never shared between layers, edge rates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fundl as fl

pytestmark = pytest.mark.numerics  # .ci/run reruns these under a second XLA CPU configuration
F32_EPS = float(np.finfo(np.float32).eps)


def test_inference_is_the_identity_and_needs_no_key():
    x = jnp.arange(6.0).reshape(2, 3)
    y, state = fl.dropout(0.5).apply((), (), x)
    assert y is x and state == ()


def test_training_drops_and_rescales():
    x = jnp.ones((1000,))
    y, _ = fl.dropout(0.25).apply((), (), x, key=jax.random.key(0), train=True)
    values = np.unique(np.asarray(y))
    assert len(values) == 2 and values[0] == 0.0
    # 1 / 0.75 in float32, within an ulp: XLA may multiply by the reciprocal instead
    np.testing.assert_allclose(values[1], 1 / 0.75, rtol=2 * F32_EPS)
    assert 0.2 < float(jnp.mean(y == 0)) < 0.3  # 250 expected drops; sd ~14


def test_fixed_key_is_deterministic():
    x = jnp.ones((4, 5))
    layer = fl.dropout(0.5)
    a, _ = layer.apply((), (), x, key=jax.random.key(3), train=True)
    b, _ = jax.jit(layer.apply, static_argnames="train")(
        (), (), x, key=jax.random.key(3), train=True
    )
    # the mask is integer arithmetic (bitwise under jit); the rescale may differ by an ulp
    np.testing.assert_array_equal(np.asarray(a) == 0, np.asarray(b) == 0)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2 * F32_EPS)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_expected_value_equals_the_input(rate):
    """Averaged over n independent masks, each output converges to its input.

    Each sample of output i is x_i * m / (1 - rate), m ~ Bernoulli(1 - rate): mean x_i,
    standard deviation |x_i| * sqrt(rate / (1 - rate)). The mean of n = 4000 samples has
    standard deviation sd_i = |x_i| * sqrt(rate / ((1 - rate) n)); we allow 5 sd_i (plus
    float32 rounding). With 64 entries, a correct layer fails this with probability about
    64 * 6e-7 (and the keys are fixed, so the test is deterministic). The bound, 5 sd_i, is
    2.6%, 7.9% and 16% of |x_i| at the rates tested, so a missing rescaling (mean off by
    rate * |x_i|, at least 10%) is caught at each of them.
    """
    n = 4000
    x = jnp.asarray(np.random.default_rng(0).uniform(0.5, 2.0, 64), jnp.float32)
    keys = jax.random.split(jax.random.key(42), n)
    layer = fl.dropout(rate)
    samples = jax.vmap(lambda k: layer.apply((), (), x, key=k, train=True)[0])(keys)
    mean = np.asarray(samples, np.float64).mean(axis=0)
    sd = np.abs(np.asarray(x)) * np.sqrt(rate / ((1 - rate) * n))
    assert np.all(np.abs(mean - np.asarray(x)) <= 5 * sd + 1e-6)


def test_two_dropout_layers_never_share_a_mask():
    x = jnp.ones((20000,))
    key = jax.random.key(0)
    # side by side: the two branches' masks differ
    (a, b), _ = fl.branch(fl.dropout(0.5), fl.dropout(0.5)).apply(
        ((), ()), ((), ()), x, key=key, train=True
    )
    assert float(jnp.mean((a == 0) == (b == 0))) < 0.55  # independent masks agree half the time
    # in a row: with independent masks, a quarter survives; with one shared mask, a half
    y, _ = fl.serial(fl.dropout(0.5), fl.dropout(0.5)).apply(
        ((), ()), ((), ()), x, key=key, train=True
    )
    assert 0.23 < float(jnp.mean(y != 0)) < 0.27  # 5000 expected survivors; sd ~61
    # shared(...) too gives each application its own key
    y, _ = fl.shared(fl.dropout(0.5), 2).apply((), (), x, key=key, train=True)
    assert 0.23 < float(jnp.mean(y != 0)) < 0.27


def test_edge_rates():
    x = jnp.arange(1.0, 5.0)
    key = jax.random.key(0)
    y, _ = fl.dropout(0.0).apply((), (), x, key=key, train=True)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))  # x / 1: exact
    y, _ = fl.dropout(1.0).apply((), (), x, key=key, train=True)
    np.testing.assert_array_equal(np.asarray(y), np.zeros(4))
    grad = jax.grad(lambda x: fl.dropout(1.0).apply((), (), x, key=key, train=True)[0].sum())(x)
    assert np.isfinite(np.asarray(grad)).all()


def test_errors():
    with pytest.raises(ValueError) as err:
        fl.dropout(0.5).apply((), (), jnp.ones(3), train=True)
    assert str(err.value) == (
        "dropout(0.5): train=True needs a PRNG key to draw the dropout mask; pass "
        "key=jax.random.key(seed) to apply (a fresh one each step, e.g. from "
        "jax.random.split), or train=False for inference."
    )
    model = fl.serial(fl.dense(3), fl.dropout(0.1))
    params, state = model.init(jax.random.key(0), jnp.ones((1, 2)))
    with pytest.raises(ValueError, match=r"^serial\[1\] dropout\(0\.1\): train=True needs a PRNG"):
        model.apply(params, state, jnp.ones((1, 2)), train=True)
    with pytest.raises(ValueError) as err:
        fl.dropout(1.5)
    assert str(err.value) == (
        "dropout(1.5): rate is the probability to drop an input and must be a number in [0, 1], "
        "got 1.5."
    )
