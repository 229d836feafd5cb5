"""Side inputs (lengths=, mask=) reach every layer that takes them, through any combinator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fundl as fl
from fundl.core import Layer, named, side_inputs

pytestmark = pytest.mark.numerics  # padded runs against each sequence run alone

LENGTHS = np.array([6, 2, 4])
X = np.random.default_rng(0).normal(size=(3, 6, 4)).astype(np.float32)  # padded at the end
# A padded batch and one sequence alone are different XLA programs (other shapes, other
# fusions): the same float32 operations, rounded in another order at most.
TOL = dict(rtol=1e-5, atol=1e-6)


def assert_each_sequence_as_alone(model, params, state, y, what):
    apply = jax.jit(model.apply)
    for b, n in enumerate(LENGTHS):
        alone, _ = apply(params, state, X[b : b + 1, :n])
        np.testing.assert_allclose(y[b, :n], alone[0], **TOL, err_msg=f"{what}, sequence {b}")


def bidirectional_lstm(features):
    return fl.bidirectional(fl.rnn(fl.lstm_cell(features)),
                            fl.rnn(fl.lstm_cell(features), reverse=True))  # fmt: skip


@pytest.mark.slow  # compiles a model for each of four shapes
def test_a_bidirectional_lstm_stack_reads_lengths_in_every_layer():
    model = fl.serial(bidirectional_lstm(5), fl.dropout(0.5), bidirectional_lstm(3), fl.dense(2))
    params, state = model.init(jax.random.key(0), X)
    y, _ = jax.jit(model.apply)(params, state, X, lengths=jnp.asarray(LENGTHS))
    assert_each_sequence_as_alone(model, params, state, y, "with lengths")
    unmasked, _ = jax.jit(model.apply)(params, state, X)  # backward layers then read padding
    assert not np.allclose(unmasked[1, :2], y[1, :2], **TOL)


@pytest.mark.slow  # compiles a model for each of four shapes
def test_an_encoder_stack_reads_the_padding_mask_in_every_block():
    model = fl.serial(fl.dense(8), fl.repeat(fl.encoder_block(8, 2), 2), fl.layer_norm())
    params, state = model.init(jax.random.key(0), X)
    mask = (np.arange(6)[None, :] < LENGTHS[:, None])[:, None, :]  # (batch, 1, time): keys
    y, _ = jax.jit(model.apply)(params, state, X, mask=mask)
    assert_each_sequence_as_alone(model, params, state, y, "with a padding mask")
    (out, captured), _ = fl.capture(model, ["serial[1]"]).apply(params, state, X, mask=mask)
    stack_out, _ = fl.submodel(model, "serial[1]").apply(params, state, X, mask=mask)
    np.testing.assert_allclose(out, y, **TOL)
    np.testing.assert_allclose(captured["serial[1]"], stack_out, **TOL)


def scale_by():
    """A layer with a side input of its own: ``x * factor``."""

    def apply(params, state, x, *, factor=1.0, key=None, train=False):
        return x * factor, state

    return named(Layer(lambda key, x: ((), ()), apply), "scale_by", side_inputs=("factor",))


def test_each_combinator_passes_a_side_input_only_to_the_layers_that_declare_it():
    model = fl.serial(
        fl.residual(scale_by()), fl.branch(scale_by(), jnp.negative), fl.fan_in_sum(),
        fl.shared(scale_by(), 2), fl.remat(fl.repeat(scale_by(), 2)),
    )  # fmt: skip
    assert side_inputs(model) == ("factor",)
    x = np.array([[1.0, 2.0]], np.float32)
    params, state = model.init(jax.random.key(0), x)
    y, _ = model.apply(params, state, x, factor=3.0)
    expected = (x + 3 * x) * 3 - (x + 3 * x)  # residual, then branch summed
    np.testing.assert_allclose(y, expected * 3**2 * 3**2)  # shared twice, repeat twice


def test_a_side_input_nobody_takes_names_who_takes_what():
    model = fl.serial(fl.dense(8), fl.rnn(fl.gru_cell(4)), fl.encoder_block(4, 2))
    params = state = ((), (), ())  # the side inputs are checked before any layer runs
    with pytest.raises(TypeError, match=r"^serial: no layer in it takes the side input lenghts=\. "
                       r"Its layers that take side inputs: serial\[1\] rnn\(gru_cell\(4\)\) takes "
                       r"lengths=; serial\[2\] encoder_block\(4, 2\) takes mask=\.$"):  # fmt: skip
        model.apply(params, state, X, lenghts=LENGTHS)
    plain = fl.serial(fl.dense(2), fl.residual(fl.dense(2)))
    with pytest.raises(TypeError, match="None of its layers takes side inputs"):
        plain.apply(((), ()), ((), ()), X, mask=None)


def test_a_plain_models_train_step_compiles_as_its_layers_called_by_hand():
    first, second = fl.dense(8), fl.dense(2)
    model = fl.serial(first, jax.nn.relu, second)
    params, state = model.init(jax.random.key(0), X)

    def by_hand(params, state, x):
        h, _ = first.apply(params[0], state[0], x)
        y, _ = second.apply(params[2], state[2], jax.nn.relu(h))
        return y, state

    def step_text(apply):
        def step(params):
            return jax.grad(lambda p: jnp.sum(apply(p, state, X)[0] ** 2))(params)

        return jax.jit(step).lower(params).as_text()

    assert step_text(model.apply) == step_text(by_hand)
