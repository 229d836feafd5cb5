"""accuracy and masked_mean against direct NumPy computations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fundl as fl

pytestmark = pytest.mark.numerics  # .ci/run reruns these under a second XLA CPU configuration


def test_accuracy_integer_and_one_hot_labels():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], np.float32)
    labels = np.array([1, 1, 1, 0])
    expected = np.mean([np.argmax(row) == y for row, y in zip(logits, labels, strict=True)])
    assert float(fl.accuracy(logits, labels)) == pytest.approx(expected)  # 0.75
    assert float(fl.accuracy(logits, np.eye(2, dtype=np.float32)[labels])) == pytest.approx(0.75)
    assert float(fl.accuracy(logits, labels, mask=np.array([1, 0, 1, 1], bool))) == 1.0


def test_accuracy_shape_error():
    with pytest.raises(ValueError, match=r"labels of shape \(3,\) do not match logits of shape "
                                         r"\(4, 2\)"):  # fmt: skip
        fl.accuracy(jnp.zeros((4, 2)), jnp.zeros(3, jnp.int32))


def test_masked_mean_values_and_gradients():
    x = jnp.array([1.0, 2.0, jnp.nan, 4.0])
    mask = jnp.array([True, True, False, True])
    assert float(fl.masked_mean(x, mask)) == pytest.approx((1 + 2 + 4) / 3)
    g = jax.grad(lambda x: fl.masked_mean(x, mask))(x)
    # no NaN leaks from the masked entry; float32 1/3 is within an ulp (6e-8) of 1/3
    np.testing.assert_allclose(g, [1 / 3, 1 / 3, 0.0, 1 / 3], rtol=2 * np.finfo(np.float32).eps)
    assert float(fl.masked_mean(x, jnp.zeros(4, bool))) == 0.0  # empty mask: 0, not NaN
    rows = fl.masked_mean(jnp.ones((2, 3)), jnp.array([[1, 0, 0], [0, 0, 0]], bool), axis=1)
    np.testing.assert_array_equal(rows, [1.0, 0.0])  # a mean of ones, and an empty mean: exact


def test_optax_losses_work_on_model_outputs():
    """fundl ships no losses of its own: optax's apply to logits as they come."""
    model = fl.serial(fl.dense(3))
    x = jnp.ones((4, 2))
    params, state = model.init(jax.random.key(0), x)
    logits, _ = model.apply(params, state, x)
    labels = jnp.array([0, 1, 2, 1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    log_p = np.asarray(jax.nn.log_softmax(logits))
    assert float(ce) == pytest.approx(-np.mean(log_p[np.arange(4), np.asarray(labels)]), rel=1e-6)
