"""An int kernel_size or window is that size on every spatial axis of the input.

``conv(8, 3)`` on images ``(batch, h, w, c)`` is a 3x3 convolution (as Keras's
``Conv2D(8, 3)``); on sequences it is 1-D and on volumes 3x3x3. A tuple fixes the number of
spatial axes, and an input of another rank is an error that says what to change.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fundl as fl
from tests import test_conv

F32_EPS = float(np.finfo(np.float32).eps)


def np_conv(x, w, b, strides):
    """The NumPy loop of tests/test_conv.py with SAME padding, no dilation, one group."""
    n = x.ndim - 2
    return test_conv.np_conv(x, w, b, strides, "SAME", (1,) * n, 1)


def check_conv(x, strides, features=8, kernel=3):
    layer = fl.conv(features, kernel, strides=strides)
    params, _ = layer.init(jax.random.key(0), x)
    y, _ = layer.apply(params, (), x)
    n = x.ndim - 2
    w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
    assert w.shape == (*(kernel,) * n, x.shape[-1], features)
    xs = np.asarray(x, np.float64)
    steps = (strides,) * n
    expected = np_conv(xs, w, b, steps)
    # float32 against a float64 reference: a sum of m products is off by at most about
    # m * eps * sum |x w| (the standard bound on recursive summation), m the fan-in + bias.
    fan_in = kernel**n * x.shape[-1] + 1
    bound = fan_in * F32_EPS * (np_conv(np.abs(xs), np.abs(w), np.abs(b), steps))
    assert y.shape == expected.shape
    assert np.all(np.abs(np.asarray(y, np.float64) - expected) <= bound)


def test_int_kernel_on_images_is_a_square_kernel():
    x = jax.random.normal(jax.random.key(1), (2, 7, 6, 3))
    check_conv(x, strides=1)
    check_conv(x, strides=2)


def test_int_kernel_on_sequences_is_1d():
    check_conv(jax.random.normal(jax.random.key(2), (2, 9, 5)), strides=1, features=4)


def test_int_kernel_on_volumes_is_a_cube():
    check_conv(jax.random.normal(jax.random.key(3), (1, 4, 5, 3, 2)), strides=2, kernel=2)


def test_int_kernel_equals_the_tuple_kernel():
    x = jax.random.normal(jax.random.key(4), (2, 6, 6, 3))
    for square, tupled in [
        (fl.conv(4, 3, strides=2, dilation=2), fl.conv(4, (3, 3), strides=(2, 2), dilation=2)),
        (fl.conv_transpose(4, 3, strides=2), fl.conv_transpose(4, (3, 3), strides=2)),
    ]:
        params, _ = tupled.init(jax.random.key(0), x)
        assert jax.tree.map(jnp.shape, square.init(jax.random.key(0), x)[0]) == jax.tree.map(
            jnp.shape, params
        )
        # the same program (one lax call with the same arguments), so the same numbers
        np.testing.assert_array_equal(
            square.apply(params, (), x)[0], tupled.apply(params, (), x)[0]
        )


def test_one_layer_follows_the_rank_of_each_input():
    layer = fl.conv(2, 3)
    for shape in [(1, 5, 1), (1, 5, 5, 1), (1, 5, 5, 5, 1)]:
        params, _ = layer.init(jax.random.key(0), jnp.zeros(shape))
        assert params["w"].shape == (3,) * (len(shape) - 2) + (1, 2)


def test_int_window_pools_every_spatial_axis():
    x = jax.random.normal(jax.random.key(5), (2, 6, 4, 3))
    blocks = np.asarray(x).reshape(2, 3, 2, 2, 2, 3)  # (batch, i, u, j, v, c), 2x2 windows
    y_max, _ = fl.max_pool(2).apply((), (), x)
    # the max selects one of its inputs: no rounding, so the values are equal
    np.testing.assert_array_equal(y_max, blocks.max(axis=(2, 4)))
    y_avg, _ = fl.avg_pool(2).apply((), (), x)
    expected = blocks.astype(np.float64).mean(axis=(2, 4))
    # a mean of 4 float32 values: at most about 4 eps relative to the mean of |x|
    bound = 4 * F32_EPS * np.abs(blocks.astype(np.float64)).mean(axis=(2, 4))
    assert np.all(np.abs(np.asarray(y_avg, np.float64) - expected) <= bound)


def test_int_window_with_strides_and_padding_on_images():
    x = jax.random.normal(jax.random.key(6), (1, 5, 5, 2))
    y, _ = fl.max_pool(3, strides=2, padding="SAME").apply((), (), x)
    xp = np.pad(np.asarray(x), [(0, 0), (1, 1), (1, 1), (0, 0)], constant_values=-np.inf)
    expected = np.stack(
        [
            np.stack(
                [xp[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].max(axis=(1, 2)) for j in range(3)], 1
            )
            for i in range(3)
        ],
        1,
    )
    np.testing.assert_array_equal(y, expected)  # a max: exact, as above


# Errors: the message names the layer, both shapes and the fix.


def test_error_tuple_kernel_on_another_rank():
    with pytest.raises(ValueError) as err:
        fl.conv(8, (3, 3)).init(jax.random.key(0), jnp.zeros((2, 5, 5, 5, 1)))
    assert str(err.value) == (
        "conv(8, (3, 3)): input has shape (2, 5, 5, 5, 1) (rank 5), expected rank 4: (batch, "
        "height, width, features) for a 2-D kernel. For an input with 3 spatial axes (depth, "
        "height, width), give kernel_size an int (that size on every spatial axis) or a tuple "
        "of 3."
    )


def test_error_tuple_window_on_another_rank():
    with pytest.raises(ValueError) as err:
        fl.max_pool((2,)).init(jax.random.key(0), jnp.zeros((1, 4, 4, 2)))
    assert str(err.value) == (
        "max_pool((2,)): input has shape (1, 4, 4, 2) (rank 4), expected rank 3: (batch, "
        "length, features) for a 1-D window. For an input with 2 spatial axes (height, width), "
        "give window an int (that size on every spatial axis) or a tuple of 2."
    )


def test_error_int_kernel_without_a_spatial_axis():
    with pytest.raises(ValueError) as err:
        fl.conv(8, 3).init(jax.random.key(0), jnp.zeros((5, 1)))
    assert str(err.value) == (
        "conv(8, 3): input has shape (5, 1) (rank 2), expected (batch, *spatial, features) "
        "with at least one spatial axis (rank >= 3). Add a batch axis (x[None]) or, for "
        "one-channel data, a channel axis (x[..., None])."
    )


@pytest.mark.parametrize(
    ("make", "arg", "value"),
    [
        (lambda v: fl.conv(8, 3, strides=v), "strides", (2, 2)),
        (lambda v: fl.conv(8, 3, dilation=v), "dilation", (1, 2)),
        (lambda v: fl.conv_transpose(8, 3, padding=v), "padding", ((1, 1), (1, 1))),
        (lambda v: fl.avg_pool(2, strides=v), "strides", (1, 1)),
    ],
)
def test_error_int_kernel_with_a_tuple_of_another_rank(make, arg, value):
    layer = make(value)
    with pytest.raises(ValueError) as err:
        layer.init(jax.random.key(0), jnp.zeros((2, 9, 4)))
    assert str(err.value) == (
        f"{layer.name}: {arg}={value!r} has 2 entries, but the input has shape (2, 9, 4): 1 "
        f"spatial axis (length). Give {arg} one entry per spatial axis, or an int for every "
        f"axis."
    )


def test_error_causal_int_kernel_on_images():
    layer = fl.conv(8, 3, padding="CAUSAL")
    layer.init(jax.random.key(0), jnp.zeros((1, 5, 2)))  # sequences: fine
    with pytest.raises(ValueError, match=re.escape(
        "conv(8, 3, padding='CAUSAL'): padding 'CAUSAL' is for 1-D inputs (batch, length, "
        "features), got 2 spatial axes. Use 'SAME', 'VALID' or explicit (low, high) pairs."
    )):  # fmt: skip
        layer.init(jax.random.key(0), jnp.zeros((1, 5, 5, 2)))


def test_error_kernel_size_type_says_int_is_every_axis():
    with pytest.raises(TypeError) as err:
        fl.conv(8, "3")
    assert str(err.value) == (
        "conv(8, '3'): kernel_size must be an int (that size on every spatial axis) or a tuple "
        "of ints, one per spatial axis, got '3'. E.g. 3 or (3, 3) for images."
    )


def test_construction_still_checks_what_it_can():
    # an int kernel defers only the rank: bad values fail when the layer is built
    for make, message in [
        (lambda: fl.conv(8, 0), r"every kernel_size entry must be at least 1, got \(0,\)"),
        (lambda: fl.conv(8, 3, strides=0), r"every strides entry must be at least 1"),
        (lambda: fl.max_pool(2, padding=((2, 2),)), r"must be smaller than the window \(2,\)"),
        (lambda: fl.conv(8, 3, strides=(1, 2), dilation=(1, 1, 1)), r"dilation must be an int"),
    ]:
        with pytest.raises((TypeError, ValueError), match=message):
            make()


def test_name_shows_the_arguments_as_given():
    assert fl.conv(8, 3).name == "conv(8, 3)"
    assert fl.max_pool(2, strides=1).name == "max_pool(2, strides=1)"
    assert fl.conv_transpose(8, (3, 3)).name == "conv_transpose(8, (3, 3))"
