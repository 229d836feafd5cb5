"""Pooling: NumPy references (loops over the window), global pools, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fundl as fl

pytestmark = pytest.mark.numerics  # .ci/run reruns these under a second XLA CPU configuration
F32_EPS = float(np.finfo(np.float32).eps)


def np_pool(x, window, strides, padding, kind):
    """Loops over output positions; padded positions are skipped (max and mean alike)."""
    x = np.asarray(x, np.float64)
    n = x.ndim - 2
    sizes = x.shape[1:-1]
    if padding == "VALID":
        pads = [(0, 0)] * n
    elif padding == "SAME":
        pads = []
        for m, w, s in zip(sizes, window, strides, strict=True):
            total = max((-(-m // s) - 1) * s + w - m, 0)
            pads.append((total // 2, total - total // 2))
    else:
        pads = list(padding)
    out = [
        (m + lo + hi - w) // s + 1
        for m, w, s, (lo, hi) in zip(sizes, window, strides, pads, strict=True)
    ]
    y = np.zeros((x.shape[0], *out, x.shape[-1]))
    for pos in np.ndindex(*out):
        values = []
        for off in np.ndindex(*window):
            idx = [p * s + o - lo for p, s, o, (lo, _) in zip(pos, strides, off, pads, strict=True)]
            if all(0 <= i < m for i, m in zip(idx, sizes, strict=True)):
                values.append(x[(slice(None), *idx)])
        values = np.stack(values)  # (count, batch, features)
        y[(slice(None), *pos)] = values.max(0) if kind == "max" else values.mean(0)
    return y


@st.composite
def pool_configs(draw):
    n = draw(st.sampled_from([1, 2, 2, 3]))
    window = tuple(draw(st.integers(1, 3)) for _ in range(n))
    strides = draw(st.one_of(st.none(), st.tuples(*(st.integers(1, 3) for _ in range(n)))))
    mode = draw(st.sampled_from(["SAME", "VALID", "explicit"]))
    pads = tuple((draw(st.integers(0, w - 1)), draw(st.integers(0, w - 1))) for w in window)
    sizes = tuple(draw(st.integers(w, w + 3)) for w in window)
    kind = draw(st.sampled_from(["max", "avg"]))
    return window, strides, pads if mode == "explicit" else mode, sizes, kind, draw(st.integers())


@given(pool_configs())
def test_pool_matches_numpy(config):
    window, strides, padding, sizes, kind, seed = config
    layer = (fl.max_pool if kind == "max" else fl.avg_pool)(window, strides, padding)
    x = np.random.default_rng(seed % 2**32).standard_normal((2, *sizes, 3)).astype(np.float32)
    y, _ = layer.apply((), (), x)
    expected = np_pool(x, window, window if strides is None else strides, padding, kind)
    # a max is exact; a mean sums up to prod(window) float32 values of |x| < 6 in XLA's order
    tol = 6 * int(np.prod(window)) * F32_EPS
    np.testing.assert_allclose(np.asarray(y), expected, rtol=tol, atol=tol)


def test_avg_pool_leaves_padding_out_of_the_mean():
    x = jnp.ones((1, 3, 3, 1))
    y, _ = fl.avg_pool((2, 2), strides=1, padding="SAME").apply((), (), x)
    np.testing.assert_array_equal(np.asarray(y), np.ones((1, 3, 3, 1)))  # means of ones: exact


def test_global_pools():
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    y, _ = fl.global_avg_pool().apply((), (), x)
    tol = 6 * 12 * F32_EPS  # a float32 mean of 12 values of |x| < 6, in XLA's order
    np.testing.assert_allclose(np.asarray(y), x.mean(axis=(1, 2)), rtol=tol, atol=tol)
    y, _ = fl.global_max_pool(keepdims=True).apply((), (), x)
    np.testing.assert_array_equal(np.asarray(y), x.max(axis=(1, 2), keepdims=True))  # a max: exact


def test_max_pool_gradient_goes_to_the_max():
    x = jnp.array([[[1.0], [3.0], [2.0], [0.0]]])
    grad = jax.grad(lambda x: fl.max_pool(2).apply((), (), x)[0].sum())(x)
    np.testing.assert_array_equal(np.asarray(grad).ravel(), [0.0, 1.0, 1.0, 0.0])


def test_error_window_or_stride_zero():
    with pytest.raises(ValueError) as err:
        fl.max_pool((2, 0))
    assert str(err.value) == (
        "max_pool((2, 0)): every window entry must be at least 1, got (2, 0). A window of 0 "
        "covers nothing; use 1 to leave an axis unchanged."
    )
    with pytest.raises(ValueError, match=r"^avg_pool\(\(2, 2\), strides=0\): every strides entry"):
        fl.avg_pool((2, 2), strides=0)


def test_error_rank_and_window_larger_than_valid_input():
    pool = fl.max_pool((2, 2))
    with pytest.raises(ValueError) as err:
        pool.init(jax.random.key(0), jnp.zeros((8, 8)))
    assert str(err.value) == (
        "max_pool((2, 2)): input has shape (8, 8) (rank 2), expected rank 4: (batch, height, "
        "width, features) for a 2-D window."
    )
    with pytest.raises(ValueError) as err:
        fl.avg_pool((3, 3)).apply((), (), jnp.zeros((1, 2, 5, 1)))
    assert str(err.value) == (
        "avg_pool((3, 3)): the window 3 spans 3 along spatial axis 0, but the input is only 2 "
        "long there (padding 'VALID' adds 0). Use padding 'SAME', a smaller window, or a "
        "larger input."
    )


def test_error_padding_not_smaller_than_window():
    with pytest.raises(ValueError, match=r"must be smaller than the window \(2,\) on every axis"):
        fl.max_pool(2, padding=((2, 0),))


def test_error_global_pool_needs_a_spatial_axis():
    with pytest.raises(
        ValueError, match=r"^global_avg_pool\(\): input has shape \(2, 3\), expected"
    ):
        fl.global_avg_pool().init(jax.random.key(0), jnp.zeros((2, 3)))
