"""fl.to_onnx: four models run in onnxruntime at batch 1 and 37 against fundl's outputs.

jax2onnx imports several hundred converter plugins on first use (10 to 40 s of one core),
so the conversions are marked slow; they skip with a note where the ``fundl[onnx]`` extra
(jax2onnx, onnx, onnxruntime) is not installed.
"""

import builtins

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fundl as fl

# The four models of issue 15: the seed MLP (examples/mnist_mlp.py), the digits CNN
# (examples/cnn_digits.py, smaller), an LSTM classifier, a transformer encoder.
MODELS = {
    "mlp": (
        lambda: fl.serial(
            fl.flatten(), fl.dense(128), jax.nn.relu, fl.dense(64), jax.nn.relu, fl.dense(10)
        ),
        (8, 8),
    ),
    "cnn": (
        lambda: fl.serial(
            fl.conv(8, 3),
            fl.batch_norm(),
            jax.nn.relu,
            fl.conv(16, 3, padding="SAME"),
            fl.batch_norm(),
            jax.nn.relu,
            fl.max_pool(2),
            fl.dropout(0.25),
            fl.flatten(),
            fl.dense(32),
            jax.nn.relu,
            fl.dense(10),
        ),
        (8, 8, 1),
    ),
    "lstm": (
        lambda: fl.serial(fl.rnn(fl.lstm_cell(16), return_sequences=False), fl.dense(10)),
        (8, 8),
    ),
    "encoder": (
        lambda: fl.serial(
            fl.dense(16),
            fl.encoder_block(16, 4, mlp_features=32),
            fl.function(lambda h: h.mean(axis=1), name="mean_over_time"),
            fl.dense(10),
        ),
        (6, 8),
    ),
}


def _trained_like(params):
    """Params moved off their init values, so batch norm's statistics are not 0 and 1."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [
        x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree_util.tree_unflatten(tree, noisy)


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.parametrize("name", sorted(MODELS))
def test_onnxruntime_matches_fundl(name, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="needs the fundl[onnx] extra")
    pytest.importorskip("jax2onnx", reason="needs the fundl[onnx] extra")
    build, features = MODELS[name]
    model = build()
    x = jax.random.normal(jax.random.key(0), (4, *features))
    params, state = model.init(jax.random.key(0), x)
    params, state = _trained_like(params), _trained_like(state)
    if name == "cnn":  # running variances must stay positive
        state = jax.tree_util.tree_map(jnp.abs, state)
    path = tmp_path / f"{name}.onnx"
    fl.to_onnx(model, params, state, x, path)
    session = ort.InferenceSession(str(path))
    assert session.get_inputs()[0].shape[0] == "batch"
    for batch in (1, 37):
        xb = np.asarray(jax.random.normal(jax.random.key(batch), (batch, *features)))
        (got,) = session.run(None, {"in_0": xb})
        want = np.asarray(model.apply(params, state, jnp.asarray(xb))[0])
        assert got.shape == want.shape == (batch, 10)
        # Two float32 compilers (XLA, onnxruntime) sum in different orders: a few ulps of
        # the outputs' size (at most 7.2e-7 measured on these models).
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_layer_onnx_cannot_express_is_named_by_its_path():
    pytest.importorskip("jax2onnx", reason="needs the fundl[onnx] extra")

    def min_pool(x):  # reduce_window_min has no jax2onnx converter
        return lax.reduce_window(x, jnp.inf, lax.min, (1, 2), (1, 2), "VALID")

    model = fl.serial(head=fl.dense(4), pool=fl.function(min_pool, name="min_pool"))
    x = jnp.ones((3, 5))
    params, state = model.init(jax.random.key(0), x)
    with pytest.raises(
        ValueError,
        match=r"layer at serial\[pool\] \(min_pool\) uses the JAX "
        r"primitive 'reduce_window_min'",
    ):
        fl.to_onnx(model, params, state, x)


@pytest.mark.slow
def test_a_converter_refusal_is_named_by_its_path():
    pytest.importorskip("jax2onnx", reason="needs the fundl[onnx] extra")

    def dilated_pool(x):  # jax2onnx's reduce_window_max refuses base_dilation
        return lax.reduce_window(
            x, -jnp.inf, lax.max, (1, 2), (1, 1), "VALID", base_dilation=(1, 2)
        )

    model = fl.serial(fl.dense(4), fl.function(dilated_pool, name="dilated_pool"))
    x = jnp.ones((2, 3))
    params, state = model.init(jax.random.key(0), x)
    with pytest.raises(
        ValueError,
        match=r"could not convert the layer at serial\[1\] "
        r"\(dilated_pool\): NotImplementedError",
    ):
        fl.to_onnx(model, params, state, x)


@pytest.mark.slow
@pytest.mark.numerics
def test_max_pool_rewrite_matches_reduce_window():
    pytest.importorskip("jax2onnx", reason="needs the fundl[onnx] extra")
    from fundl.onnx import _window_max

    x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3))
    for window, strides, pads in [
        ((1, 2, 2, 1), (1, 2, 2, 1), ((0, 0),) * 4),
        ((1, 3, 3, 1), (1, 2, 1, 1), ((0, 0), (1, 1), (0, 2), (0, 0))),
    ]:
        want = lax.reduce_window(x, -jnp.inf, lax.max, window, strides, pads)
        got = _window_max(x, window, strides, pads, (1,) * 4, (1,) * 4)
        np.testing.assert_array_equal(got, want)  # a maximum is exact


def test_missing_converter_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_jax2onnx(name, *args, **kwargs):
        if name.startswith("jax2onnx"):
            raise ImportError("No module named 'jax2onnx'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_jax2onnx)
    model = fl.dense(2)
    with pytest.raises(ImportError, match=r'pip install "fundl\[onnx\]"'):
        fl.to_onnx(model, {}, (), jnp.ones((1, 3)))


def test_a_scalar_input_is_refused():
    model = fl.function(jnp.sin)
    with pytest.raises(ValueError, match="example input 0 is a scalar; every input needs a batch"):
        fl.to_onnx(model, (), (), jnp.float32(1.0))
