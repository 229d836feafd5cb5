"""fl.from_torch and fl.to_torch_state_dict against PyTorch itself (skipped without torch).

Each model is built twice, in PyTorch and in fundl; the fundl params come from the PyTorch
``state_dict`` through the inferred mapping, the outputs agree, and the export back loads
into the PyTorch module with ``strict=True``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fundl as fl

torch = pytest.importorskip("torch", reason='PyTorch is not installed (pip install "fundl[torch]")')
nn = torch.nn
torch.set_num_threads(1)

# float32 on both sides; the two libraries sum in different orders, so outputs differ by a
# few ulps of their size (at most 2e-6 measured here).
ATOL = 1e-5


def _state_dict(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _randomized(module):
    """Moves every param and buffer off its init value (batch norm's statistics too)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, value in module.state_dict().items():
            if value.dtype.is_floating_point:
                noise = torch.randn(value.shape, generator=gen) * 0.3
                value.copy_(value.abs() + 0.5 if "running_var" in name else value + noise)
    return module.eval()


def _check(module, model, x_torch, x_fundl):
    sd = _state_dict(module)
    params, state = fl.from_torch(model, sd, x_fundl)
    got = np.asarray(model.apply(params, state, x_fundl)[0])
    with torch.no_grad():
        want = module(x_torch).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    mapping = fl.interop.torch_mapping(model, sd, x_fundl)
    back = fl.to_torch_state_dict(params, state, mapping)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    with torch.no_grad():
        again = module(x_torch).numpy()
    np.testing.assert_allclose(again, want, rtol=0, atol=ATOL)
    return mapping


@pytest.mark.numerics
def test_sequential_mlp():
    module = _randomized(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)))
    model = fl.serial(fl.dense(16), jax.nn.relu, fl.dense(3))
    x = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    mapping = _check(module, model, torch.from_numpy(x), jnp.asarray(x))
    assert str(mapping).splitlines()[0] == "params[0].w <- 0.weight  [transpose]"


def _lenet():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 10),
        nn.ReLU(),
        nn.Linear(10, 3),
    )


def _lenet_fundl():
    return fl.serial(
        fl.conv(4, 3, padding="VALID"),
        fl.batch_norm(),
        jax.nn.relu,
        fl.max_pool(2),
        fl.conv(6, 3, padding="SAME"),
        jax.nn.relu,
        fl.max_pool(2),
        fl.flatten(),
        fl.dense(10),
        jax.nn.relu,
        fl.dense(3),
    )


@pytest.mark.slow
@pytest.mark.numerics
def test_lenet_cnn_with_batch_norm_and_the_flatten_order():
    module = _randomized(_lenet())
    x = np.random.default_rng(0).normal(size=(3, 1, 10, 10)).astype(np.float32)
    x_nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
    mapping = _check(module, _lenet_fundl(), torch.from_numpy(x), x_nhwc)
    text = str(mapping)
    assert "params[0].w <- 0.weight  [OIHW -> HWIO]" in text
    assert "state[1].mean <- 1.running_mean  [copy]" in text
    assert "(unused by fundl) <- 1.num_batches_tracked  [ignored]" in text
    assert "params[8].w <- 8.weight  [flatten order (C=6, 2, 2) -> (2, 2, C), transpose]" in text


def _post_norm_block(features, num_heads, mlp_features):
    """nn.TransformerEncoderLayer(norm_first=False): x = norm(x + f(x)) for both branches."""
    mlp = fl.serial(up=fl.dense(mlp_features), act=jax.nn.relu, down=fl.dense(features))
    return fl.serial(
        attn=fl.residual(fl.multi_head_attention(num_heads)),
        norm1=fl.layer_norm(),
        mlp=fl.residual(mlp),
        norm2=fl.layer_norm(),
    )


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.parametrize("norm_first", [True, False])
def test_transformer_encoder_layer(norm_first):
    def gelu(x):
        return torch.nn.functional.gelu(x, approximate="tanh")  # jax.nn.gelu's default

    module = nn.TransformerEncoderLayer(
        16,
        4,
        dim_feedforward=32,
        batch_first=True,
        norm_first=norm_first,
        activation=gelu if norm_first else "relu",
    )
    module = _randomized(module)
    model = fl.encoder_block(16, 4, mlp_features=32) if norm_first else _post_norm_block(16, 4, 32)
    x = np.random.default_rng(0).normal(size=(2, 5, 16)).astype(np.float32)
    mapping = _check(module, model, torch.from_numpy(x), jnp.asarray(x))
    assert "split in 3 (query, key, value), transpose" in str(mapping)


@pytest.mark.slow
@pytest.mark.numerics
def test_lstm_classifier():
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(5, 8, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.lstm(x)[0][:, -1])

    module = _randomized(Classifier())
    model = fl.serial(fl.rnn(fl.lstm_cell(8), return_sequences=False), fl.dense(3))
    x = np.random.default_rng(0).normal(size=(2, 6, 5)).astype(np.float32)
    mapping = _check(module, model, torch.from_numpy(x), jnp.asarray(x))
    assert "params[0].b <- lstm.bias_ih_l0, lstm.bias_hh_l0  [bias_ih + bias_hh]" in str(mapping)


def test_every_mismatch_is_reported_at_once():
    module = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    sd = _state_dict(module)
    model = fl.serial(fl.dense(16), jax.nn.relu, fl.dense(4))  # 4 outputs, not 3
    x = jnp.ones((1, 6))
    mapping = fl.interop.torch_mapping(model, sd, x)
    del sd["0.bias"]
    sd["extra.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError) as info:
        fl.from_torch(model, sd, x, mapping)
    message = str(info.value)
    assert "from_torch: the PyTorch state dict does not fit the fundl model (4 problems)" in message
    assert "missing in the state dict: 0.bias" in message
    assert "unexpected in the state dict: extra.weight (2, 2)" in message
    assert "shape mismatch: params[2].w is (16, 4), 2.weight (3, 16) gives (16, 3)" in message
    assert "shape mismatch: params[2].b is (4,), 2.bias (3,) gives (3,)" in message


def test_a_module_left_over_is_reported():
    module = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    model = fl.serial(fl.dense(16), fl.layer_norm())
    with pytest.raises(ValueError) as info:
        fl.interop.torch_mapping(model, _state_dict(module), jnp.ones((1, 6)))
    message = str(info.value)
    assert "[1] (layer_norm()): no PyTorch norm module left" in message
    assert "PyTorch linear module ['2.bias', '2.weight']: no fundl layer left to take it" in message


@pytest.mark.slow
@pytest.mark.numerics
def test_stacked_bidirectional_lstm():
    module = _randomized(nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True))

    def both_ways():
        return fl.bidirectional(fl.rnn(fl.lstm_cell(4)), fl.rnn(fl.lstm_cell(4), reverse=True))

    model = fl.serial(both_ways(), both_ways())
    x = np.random.default_rng(0).normal(size=(2, 5, 3)).astype(np.float32)
    sd = _state_dict(module)
    params, state = fl.from_torch(model, sd, x)
    with torch.no_grad():
        want = module(torch.from_numpy(x))[0].numpy()
    got = np.asarray(model.apply(params, state, jnp.asarray(x))[0])
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    mapping = fl.interop.torch_mapping(model, sd, x)
    assert "params[1].backward.wi <- weight_ih_l1_reverse  [transpose]" in str(mapping)


@pytest.mark.slow
@pytest.mark.numerics
def test_cross_attention_with_other_key_width():
    module = _randomized(nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=True))
    model = fl.multi_head_attention(2)
    q = np.random.default_rng(0).normal(size=(2, 4, 8)).astype(np.float32)
    kv = np.random.default_rng(1).normal(size=(2, 5, 6)).astype(np.float32)
    params, state = fl.from_torch(model, _state_dict(module), (q, kv))
    with torch.no_grad():
        tq, tkv = torch.from_numpy(q), torch.from_numpy(kv)
        want = module(tq, tkv, tkv, need_weights=False)[0].numpy()
    got = np.asarray(model.apply(params, state, jnp.asarray(q), jnp.asarray(kv))[0])
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
