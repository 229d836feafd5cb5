"""conv and conv_transpose: NumPy references (loops over the window), properties, errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fundl as fl

pytestmark = pytest.mark.numerics  # .ci/run reruns these under a second XLA CPU configuration


def _same_pads(sizes, spans, strides):
    """TensorFlow's "SAME": ceil(n / s) outputs, the odd padding element at the high end."""
    pads = []
    for n, k, s in zip(sizes, spans, strides, strict=True):
        total = max((-(-n // s) - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
    return pads


def _spans(kernel, dilation):
    return [d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True)]


def _pads(padding, sizes, kernel, strides, dilation):
    spans = _spans(kernel, dilation)
    if padding == "SAME":
        return _same_pads(sizes, spans, strides)
    if padding == "VALID":
        return [(0, 0)] * len(sizes)
    if padding == "CAUSAL":
        return [(k - 1, 0) for k in spans]
    return [tuple(p) for p in padding]


def np_conv(x, w, b, strides, padding, dilation, groups):
    """Direct convolution: for every output position, sum over the kernel window."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    n = x.ndim - 2
    kernel = w.shape[:n]
    pads = _pads(padding, x.shape[1:-1], kernel, strides, dilation)
    xp = np.pad(x, [(0, 0), *pads, (0, 0)])
    cin, cout = w.shape[-2], w.shape[-1]  # cin: channels per group
    oper = cout // groups
    out_sizes = [
        (xp.shape[1 + i] - (dilation[i] * (kernel[i] - 1) + 1)) // strides[i] + 1 for i in range(n)
    ]
    y = np.zeros((x.shape[0], *out_sizes, cout))
    for pos in np.ndindex(*out_sizes):
        for kpos in np.ndindex(*kernel):
            idx = tuple(
                p * s + k * d for p, s, k, d in zip(pos, strides, kpos, dilation, strict=True)
            )
            patch = xp[(slice(None), *idx)]  # (batch, in_features)
            for g in range(groups):
                y[(slice(None), *pos, slice(g * oper, (g + 1) * oper))] += (
                    patch[:, g * cin : (g + 1) * cin] @ w[kpos][:, g * oper : (g + 1) * oper]
                )
    return y if b is None else y + np.asarray(b, np.float64)


def np_conv_transpose(x, w, b, strides, padding, dilation, groups):
    """Scatter definition: input position i adds x[i] * w[u] at output i * s + u * d - lo."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    n = x.ndim - 2
    kernel = w.shape[:n]
    spans = _spans(kernel, dilation)
    sizes = x.shape[1:-1]
    if padding == "VALID":
        crops = [(0, 0)] * n
    elif padding in ("SAME", "CAUSAL"):  # outputs n * s: crop k - s in total
        crops = []
        for k, s in zip(spans, strides, strict=True):
            lo = 0 if padding == "CAUSAL" else max(k - s, 0) // 2
            crops.append((lo, k - s - lo))
    else:
        crops = [tuple(p) for p in padding]
    full = [(m - 1) * s + k for m, s, k in zip(sizes, strides, spans, strict=True)]
    cin, cout = w.shape[-2], w.shape[-1]
    oper = cout // groups
    y = np.zeros((x.shape[0], *full, cout))
    for pos in np.ndindex(*sizes):
        for kpos in np.ndindex(*kernel):
            idx = tuple(
                p * s + k * d for p, s, k, d in zip(pos, strides, kpos, dilation, strict=True)
            )
            for g in range(groups):
                y[(slice(None), *idx, slice(g * oper, (g + 1) * oper))] += (
                    x[(slice(None), *pos, slice(g * cin, (g + 1) * cin))]
                    @ w[kpos][:, g * oper : (g + 1) * oper]
                )
    # crop lo and hi; a negative hi means extra zeros at the end
    y = np.pad(y, [(0, 0), *[(0, max(-hi, 0)) for _, hi in crops], (0, 0)])
    ends = [f - lo - hi for f, (lo, hi) in zip(full, crops, strict=True)]
    y = y[(slice(None), *(slice(lo, lo + e) for (lo, _), e in zip(crops, ends, strict=True)))]
    return y if b is None else y + np.asarray(b, np.float64)


@st.composite
def configs(draw, transpose=False):
    n = draw(st.sampled_from([1, 1, 2, 2, 3]))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(n))
    strides = tuple(draw(st.integers(1, 3)) for _ in range(n))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(n))
    groups = draw(st.sampled_from([1, 2, 3]))
    cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    modes = ["SAME", "VALID", "explicit"] + (["CAUSAL"] if n == 1 else [])
    mode = draw(st.sampled_from(modes))
    spans = _spans(kernel, dilation)
    if transpose:
        padding = tuple(
            (draw(st.integers(0, (k - 1) // 2)), draw(st.integers(0, (k - 1) // 2))) for k in spans
        )
        sizes = tuple(draw(st.integers(1, 3)) for _ in range(n))
    else:
        padding = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(n))
        sizes = tuple(draw(st.integers(k, k + 3)) for k in spans)
    padding = padding if mode == "explicit" else mode
    seed = draw(st.integers(0, 2**16))
    return kernel, strides, dilation, groups, cin, cout, padding, sizes, seed


@given(configs())
def test_conv_matches_numpy(config):
    kernel, strides, dilation, groups, cin, cout, padding, sizes, seed = config
    layer = fl.conv(cout, kernel, strides, padding, dilation, groups)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, *sizes, cin)).astype(np.float32)
    params, _ = layer.init(jax.random.key(seed), x)
    params["b"] = jnp.asarray(rng.standard_normal(cout), jnp.float32)
    y, _ = layer.apply(params, (), x)
    expected = np_conv(x, params["w"], params["b"], strides, padding, dilation, groups)
    assert y.shape == expected.shape
    # float32 sums of at most 3*3*3*6 products of O(1) terms, in XLA's order: ~sqrt(n) ulps
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


@given(configs(transpose=True))
def test_conv_transpose_matches_numpy(config):
    kernel, strides, dilation, groups, cin, cout, padding, sizes, seed = config
    layer = fl.conv_transpose(cout, kernel, strides, padding, dilation, groups)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, *sizes, cin)).astype(np.float32)
    params, _ = layer.init(jax.random.key(seed), x)
    params["b"] = jnp.asarray(rng.standard_normal(cout), jnp.float32)
    y, _ = layer.apply(params, (), x)
    expected = np_conv_transpose(x, params["w"], params["b"], strides, padding, dilation, groups)
    assert y.shape == expected.shape
    # float32 sums of at most 3*3*3*6 products of O(1) terms, in XLA's order: ~sqrt(n) ulps
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kernel", "strides", "padding", "size"),
    [
        ((3, 3), (1, 1), "SAME", 6),
        ((3, 3), (2, 2), "SAME", 6),
        ((4, 2), (2, 1), "SAME", 8),
        ((3, 3), (2, 2), "VALID", 7),
        ((2, 3), (1, 2), ((1, 0), (1, 1)), 5),
    ],
)
def test_conv_transpose_is_the_adjoint_of_conv(kernel, strides, padding, size):
    """<conv(x), y> == <x, conv_transpose(y)> with the kernel's in/out axes swapped, and
    conv_transpose maps conv's output shape back to its input shape."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        fwd = fl.conv(3, kernel, strides, padding, use_bias=False)
        bwd = fl.conv_transpose(2, kernel, strides, padding, use_bias=False)
        x = jnp.asarray(rng.standard_normal((1, size, size, 2)))
        p, _ = fwd.init(jax.random.key(0), x)
        y, _ = fwd.apply(p, (), x)
        probe = jnp.asarray(rng.standard_normal(y.shape))
        back, _ = bwd.apply({"w": jnp.swapaxes(p["w"], -1, -2)}, (), probe)
        assert back.shape == x.shape
        # float64 (eps 2e-16) sums of a few hundred products: 1e-10 is any summation order
        np.testing.assert_allclose(float(jnp.vdot(y, probe)), float(jnp.vdot(x, back)), rtol=1e-10)


@given(
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 2),
    st.integers(-2, 2),
    st.integers(-2, 2),
    st.integers(0, 1000),
)
def test_same_conv_commutes_with_translation(kh, kw, dil, dy, dx, seed):
    """Shifting the input of a stride-1 SAME conv shifts its output, away from the borders:
    the input is zero outside a central patch so that no window reaches a border."""
    layer = fl.conv(2, (kh, kw), padding="SAME", dilation=dil)
    rng = np.random.default_rng(seed)
    x = np.zeros((1, 16, 16, 2), np.float32)
    x[:, 6:10, 6:10] = rng.standard_normal((1, 4, 4, 2))
    params, _ = layer.init(jax.random.key(seed), x)
    params["b"] = jnp.ones(2)

    def shift(a):
        return np.roll(np.asarray(a), (dy, dx), axis=(1, 2))

    y_of_shifted, _ = layer.apply(params, (), shift(x))
    y, _ = layer.apply(params, (), x)
    # one program, but each output position may be summed in another order (vector tiles vs
    # edges): float32 sums of kh * kw * 2 products of |w x| < 3
    tol = 3 * kh * kw * 2 * float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(np.asarray(y_of_shifted), shift(y), rtol=tol, atol=tol)


@pytest.mark.parametrize(("kernel", "dilation", "stride"), [(3, 1, 1), (2, 3, 1), (4, 2, 2)])
def test_causal_conv_sees_no_future(kernel, dilation, stride):
    """d y[t] / d x[t'] is exactly zero for every input step t' after output step t's
    position t * stride."""
    layer = fl.conv(2, kernel, stride, "CAUSAL", dilation)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 10, 3)), jnp.float32)
    params, _ = layer.init(jax.random.key(0), x)
    jac = jax.jacobian(lambda x: layer.apply(params, (), x)[0])(x)  # (1, T', 2, 1, 10, 3)
    jac = np.abs(np.asarray(jac[0, :, :, 0])).sum(axis=(1, 3))  # (T', 10)
    assert jac.shape == (-(-10 // stride), 10)
    for t, t_in in itertools.product(range(jac.shape[0]), range(10)):
        if t_in > t * stride:
            assert jac[t, t_in] == 0.0, (t, t_in)
    assert (jac[:, 0] > 0).any()  # and it does see the past


@pytest.mark.parametrize(("kernel", "stride"), [(3, 1), (4, 2), (2, 3)])
def test_causal_conv_transpose_sees_no_future(kernel, stride):
    """Output step t of a CAUSAL conv_transpose depends on no input after step t // s."""
    layer = fl.conv_transpose(2, kernel, stride, "CAUSAL")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 5, 3)), jnp.float32)
    params, _ = layer.init(jax.random.key(0), x)
    jac = jax.jacobian(lambda x: layer.apply(params, (), x)[0])(x)  # (1, 5s, 2, 1, 5, 3)
    jac = np.abs(np.asarray(jac[0, :, :, 0])).sum(axis=(1, 3))  # (5s, 5)
    assert jac.shape == (5 * stride, 5)
    for t, t_in in itertools.product(range(5 * stride), range(5)):
        if t_in > t // stride:
            assert jac[t, t_in] == 0.0, (t, t_in)
    assert (jac[:, 0] > 0).any()


def test_int_kernel_is_1d_and_options_accept_ints():
    layer = fl.conv(4, 3, strides=2, dilation=1, padding=1)
    x = jnp.ones((2, 9, 5))
    params, _ = layer.init(jax.random.key(0), x)
    assert params["w"].shape == (3, 5, 4)
    assert layer.apply(params, (), x)[0].shape == (2, 5, 4)  # floor((9 + 2 - 3) / 2) + 1


def test_depthwise_conv_params_and_independence():
    layer = fl.conv(6, (3, 3), groups=3)
    x = jnp.ones((1, 5, 5, 3))
    params, _ = layer.init(jax.random.key(0), x)
    assert params["w"].shape == (3, 3, 1, 6)
    # output channels 0, 1 read only input channel 0
    jac = jax.jacobian(lambda x: layer.apply(params, (), x)[0][0, 2, 2, :2])(x)
    assert np.asarray(jnp.abs(jac[..., 1:])).max() == 0.0


def test_conv_dtype_and_param_dtype():
    layer = fl.conv(2, (3,), dtype=jnp.bfloat16, param_dtype=jnp.float32)
    x = jnp.ones((1, 5, 1), jnp.float32)
    params, _ = layer.init(jax.random.key(0), x)
    assert params["w"].dtype == jnp.float32
    assert layer.apply(params, (), x)[0].dtype == jnp.bfloat16


def test_conv_in_serial_with_summary_shapes():
    model = fl.serial(fl.conv(4, (3, 3)), jax.nn.relu, fl.conv_transpose(1, (2, 2), 2))
    x = jnp.zeros((2, 6, 6, 1))
    params, state = model.init(jax.random.key(0), x)
    assert model.apply(params, state, x)[0].shape == (2, 12, 12, 1)


# Errors: the message names the layer, says expected vs actual and how to fix it.


def test_error_rank_does_not_match_kernel():
    layer = fl.conv(8, (3, 3))
    with pytest.raises(ValueError) as err:
        layer.init(jax.random.key(0), jnp.zeros((28, 28, 1)))
    assert str(err.value) == (
        "conv(8, (3, 3)): input has shape (28, 28, 1) (rank 3), expected rank 4: (batch, "
        "height, width, features) for a 2-D kernel. Add a batch axis (x[None]) or, for "
        "one-channel images, a channel axis (x[..., None]). Or, for an input with 1 spatial "
        "axis (length), give kernel_size an int (that size on every spatial axis) or a tuple "
        "of 1."
    )
    with pytest.raises(ValueError, match=r"conv\(8, \(3,\)\): input has shape \(2, 5, 5, 1\)"):
        fl.conv(8, (3,)).init(jax.random.key(0), jnp.zeros((2, 5, 5, 1)))


def test_error_rank_has_the_path_in_serial():
    model = fl.serial(fl.conv(4, (3, 3)), fl.conv(4, (3, 3, 3)))
    with pytest.raises(ValueError, match=r"^serial\[1\] conv\(4, \(3, 3, 3\)\): input has shape"):
        model.init(jax.random.key(0), jnp.zeros((1, 5, 5, 1)))


def test_error_channels_not_divisible_by_groups():
    layer = fl.conv(6, (3, 3), groups=3)
    with pytest.raises(ValueError) as err:
        layer.init(jax.random.key(0), jnp.zeros((1, 5, 5, 4)))
    assert str(err.value) == (
        "conv(6, (3, 3), groups=3): the input has 4 features (channels), not divisible by "
        "groups=3. Each group convolves channels / groups of them: use a groups value that "
        "divides 4 (groups=4 is depthwise)."
    )
    with pytest.raises(ValueError, match=r"features=4 is not divisible by groups=3"):
        fl.conv(4, (3, 3), groups=3)


@pytest.mark.parametrize("make", [fl.conv, fl.conv_transpose])
def test_error_zero_stride_kernel_dilation(make):
    kind = make.__name__
    with pytest.raises(ValueError, match=rf"^{kind}\(8, \(3, 3\), strides=\(1, 0\)\): every "
                       r"strides entry must be at least 1, got \(1, 0\)"):  # fmt: skip
        make(8, (3, 3), strides=(1, 0))
    with pytest.raises(ValueError, match=r"every kernel_size entry must be at least 1, got \(0,"):
        make(8, (0, 3))
    with pytest.raises(ValueError, match=r"every dilation entry must be at least 1"):
        make(8, (3, 3), dilation=0)
    with pytest.raises(TypeError, match=r"strides must be an int or a tuple of 2 ints"):
        make(8, (3, 3), strides=(1, 1, 1))


def test_error_kernel_larger_than_valid_input():
    layer = fl.conv(8, (5, 5), padding="VALID")
    with pytest.raises(ValueError) as err:
        layer.init(jax.random.key(0), jnp.zeros((1, 4, 8, 1)))
    assert str(err.value) == (
        "conv(8, (5, 5), padding='VALID'): the kernel 5 spans 5 along spatial axis 0, but the "
        "input is only 4 long there (padding 'VALID' adds 0). Use padding 'SAME', a smaller "
        "kernel, or a larger input."
    )
    dilated = fl.conv(8, 3, padding="VALID", dilation=3)
    with pytest.raises(ValueError, match=r"the kernel 3 with dilation 3 spans 7 along spatial"):
        dilated.init(jax.random.key(0), jnp.zeros((1, 6, 1)))


def test_error_padding():
    with pytest.raises(ValueError, match=r"padding 'CAUSAL' is for 1-D inputs"):
        fl.conv(8, (3, 3), padding="causal")
    with pytest.raises(ValueError, match=r"padding must be 'SAME', 'VALID', 'CAUSAL'"):
        fl.conv(8, 3, padding="FULL")
    with pytest.raises(ValueError, match=r"explicit padding needs 2 \(low, high\) pairs"):
        fl.conv(8, (3, 3), padding=((1, 1),))


def test_error_params_do_not_match_input():
    layer = fl.conv(8, (3, 3))
    params, _ = layer.init(jax.random.key(0), jnp.zeros((1, 5, 5, 3)))
    with pytest.raises(ValueError, match=r"w has shape \(3, 3, 3, 8\) \(3\). Feed inputs with 3"):
        layer.apply(params, (), jnp.zeros((1, 5, 5, 2)))


def test_error_integer_input():
    with pytest.raises(TypeError, match=r"^conv\(8, 3\): input dtype is int32, expected a float"):
        fl.conv(8, 3).init(jax.random.key(0), jnp.zeros((1, 5, 1), jnp.int32))


def test_error_transpose_over_cropped():
    layer = fl.conv_transpose(2, 3, padding=((2, 2),))
    with pytest.raises(
        ValueError, match=r"crops 4 from spatial axis 0, whose full output is only 3"
    ):
        layer.init(jax.random.key(0), jnp.zeros((1, 1, 1)))
