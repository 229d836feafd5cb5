"""embedding, attend and the positional encodings: numbers against NumPy, decoding, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fundl as fl

pytestmark = pytest.mark.numerics  # .ci/run reruns these under a second XLA CPU configuration

KEY = jax.random.key(0)


def test_embedding_is_a_table_lookup():
    layer = fl.embedding(7, 3)
    ids = np.array([[0, 6, 2], [2, 2, 5]], np.int32)
    params, state = layer.init(KEY, ids)
    assert params["table"].shape == (7, 3)
    y, _ = layer.apply(params, state, ids)
    table = np.asarray(params["table"])
    for b in range(2):
        for t in range(3):
            np.testing.assert_array_equal(y[b, t], table[ids[b, t]])


def test_embedding_out_of_range_ids_give_nan():
    layer = fl.embedding(4, 2)
    params, state = layer.init(KEY, jnp.zeros(1, jnp.int32))
    y, _ = layer.apply(params, state, jnp.array([3, 4]))
    assert np.isfinite(y[0]).all() and np.isnan(y[1]).all()


def test_embedding_float_ids_is_a_type_error():
    with pytest.raises(TypeError) as err:
        fl.serial(fl.embedding(10, 4)).init(KEY, jnp.zeros((2, 3)))
    assert str(err.value) == (
        "serial[0] embedding(10, 4): ids have dtype float32, expected an integer dtype. Pass "
        "token ids as integers, e.g. ids.astype(jnp.int32); for float features use fl.dense "
        "instead."
    )


def test_embedding_dtype_and_bad_sizes():
    layer = fl.embedding(5, 3, dtype=jnp.bfloat16)
    params, state = layer.init(KEY, jnp.zeros(2, jnp.int32))
    assert params["table"].dtype == jnp.float32
    assert layer.apply(params, state, jnp.zeros(2, jnp.int32))[0].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"^embedding\(vocab, features\): vocab must be a "
                                         r"positive int, got 0\."):  # fmt: skip
        fl.embedding(0, 3)


def test_attend_is_the_tied_output_projection():
    params, _ = fl.embedding(6, 4).init(KEY, jnp.zeros(1, jnp.int32))
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    logits = fl.attend(params, x)
    table = np.asarray(params["table"])
    expected = np.array([[[x[b, t] @ table[v] for v in range(6)] for t in range(3)]
                         for b in range(2)])  # fmt: skip
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"^attend: x has last dimension \(5,\)"):
        fl.attend(params, jnp.zeros((2, 5)))


def test_sinusoidal_matches_the_formula():
    x = np.zeros((1, 5, 6), np.float32)
    layer = fl.sinusoidal_positions()
    params, state = layer.init(KEY, x)
    y, _ = layer.apply(params, state, x)
    for p in range(5):
        for i in range(3):
            angle = p / 10000 ** (2 * i / 6)
            assert y[0, p, 2 * i] == pytest.approx(np.sin(angle), abs=1e-6)
            assert y[0, p, 2 * i + 1] == pytest.approx(np.cos(angle), abs=1e-6)
    assert fl.sinusoidal_table(jnp.arange(4), 5).shape == (4, 5)  # odd widths drop the last


def test_learned_positions_add_the_table():
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    layer = fl.learned_positions(5)
    params, state = layer.init(KEY, x)
    assert params["table"].shape == (5, 4)
    y, _ = layer.apply(params, state, x)
    np.testing.assert_allclose(y, x + np.asarray(params["table"])[None, :3], rtol=1e-6)
    with pytest.raises(ValueError) as err:
        layer.apply(params, state, np.zeros((1, 6, 4), np.float32))
    assert str(err.value) == (
        "learned_positions(5): the sequence has 6 positions, more than max_len=5. Build the "
        "layer with a larger max_len."
    )


@pytest.mark.parametrize(
    "make", [fl.sinusoidal_positions, lambda **kw: fl.learned_positions(6, **kw)]
)
def test_positions_continue_across_decoding_calls(make):
    x = np.random.default_rng(0).standard_normal((2, 5, 4)).astype(np.float32)
    full, dec = make(), make(decode=True)
    params, state = full.init(KEY, x)
    y, _ = full.apply(params, state, x)
    _, dstate = dec.init(KEY, x)
    assert int(dstate["index"]) == 0
    step = jax.jit(dec.apply)
    a, dstate = step(params, dstate, x[:, :2])
    b, dstate = step(params, dstate, x[:, 2:5])
    assert int(dstate["index"]) == 5
    np.testing.assert_allclose(jnp.concatenate([a, b], axis=1), y, rtol=1e-6, atol=1e-6)


def test_learned_positions_decoding_overflow():
    layer = fl.learned_positions(3, decode=True)
    x = np.zeros((1, 2, 4), np.float32)
    params, state = layer.init(KEY, x)
    _, state = layer.apply(params, state, x)
    expected = r"^learned_positions\(3\): the cache overflows: 2 positions are filled and 2 "
    with pytest.raises(ValueError, match=expected):
        layer.apply(params, state, x)
    y, _ = jax.jit(layer.apply)(params, state, x)  # traced position: NaN past the table
    assert np.isfinite(y[:, 0]).all() and np.isnan(y[:, 1]).all()


def test_rotary_needs_even_head_features():
    with pytest.raises(
        ValueError, match=r"^rotary: head_features must be even to rotate pairs, got 3"
    ):
        fl.rotary(jnp.zeros((1, 2, 1, 3)), jnp.arange(2))
