"""PyTorch weight converters: round trips, NumPy written in PyTorch's conventions, and torch.

PyTorch's documented formulas (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) are re-written here in
NumPy on its own layout (``W_ih`` of shape ``(G*H, in)``, two biases) and compared with the
fundl layers on converted weights. When torch is installed, the real modules are checked
too (skipped otherwise; torch is not a dependency).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fundl as fl
from fundl import interop
from fundl.testing import assert_trees_close


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def torch_state_dict(kind, n_in, hidden, seed=0, layer=0, reverse=False):
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[kind]
    rng = np.random.default_rng(seed)
    sfx = f"_l{layer}" + ("_reverse" if reverse else "")
    return {
        f"weight_ih{sfx}": rng.uniform(-0.5, 0.5, (gates * hidden, n_in)),
        f"weight_hh{sfx}": rng.uniform(-0.5, 0.5, (gates * hidden, hidden)),
        f"bias_ih{sfx}": rng.uniform(-0.5, 0.5, gates * hidden),
        f"bias_hh{sfx}": rng.uniform(-0.5, 0.5, gates * hidden),
    }


def torch_formula(kind, sd, x):
    """PyTorch's recurrences in NumPy, on its own weight layout; x: (batch, time, in)."""
    w_ih, w_hh = sd["weight_ih_l0"], sd["weight_hh_l0"]
    b_ih, b_hh = sd["bias_ih_l0"], sd["bias_hh_l0"]
    hidden = w_hh.shape[1]
    h = np.zeros((x.shape[0], hidden))
    c = np.zeros_like(h)
    outs = []
    for t in range(x.shape[1]):
        gi = x[:, t] @ w_ih.T + b_ih
        gh = h @ w_hh.T + b_hh
        if kind == "lstm":
            i, f, g, o = np.split(gi + gh, 4, axis=-1)
            c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
            h = sigmoid(o) * np.tanh(c)
        elif kind == "gru":
            i_r, i_z, i_n = np.split(gi, 3, axis=-1)
            h_r, h_z, h_n = np.split(gh, 3, axis=-1)
            r, z = sigmoid(i_r + h_r), sigmoid(i_z + h_z)
            n = np.tanh(i_n + r * h_n)
            h = (1 - z) * n + z * h
        else:
            h = np.tanh(gi + gh)
        outs.append(h)
    return np.stack(outs, 1)


CASES = {
    "lstm": (fl.lstm_cell, interop.lstm_from_torch, interop.lstm_to_torch),
    "gru": (fl.gru_cell, interop.gru_from_torch, interop.gru_to_torch),
    "rnn": (fl.simple_rnn_cell, interop.simple_rnn_from_torch, interop.simple_rnn_to_torch),
}


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_converted_weights_reproduce_torch_formulas(kind):
    make, from_torch, to_torch = CASES[kind]
    n_in, hidden = 3, 5
    sd = torch_state_dict(kind, n_in, hidden)
    x = np.random.default_rng(1).standard_normal((2, 4, n_in))
    with jax.enable_x64(True):
        params = from_torch(sd)
        ys, _ = fl.rnn(make(hidden)).apply(jax.tree_util.tree_map(jnp.asarray, params), (), x)
        assert_trees_close(ys, torch_formula(kind, sd, x), atol=1e-12, rtol=1e-10, what=kind)
        # Back to torch's layout: the same function (LSTM/RNN biases are only used summed).
        again = to_torch(params)
        assert_trees_close(
            torch_formula(kind, again, x), torch_formula(kind, sd, x), atol=1e-12, rtol=1e-10,
            what=f"{kind} round trip",
        )  # fmt: skip
        assert_trees_close(from_torch(again), params, atol=1e-12, rtol=0, what="params")


def test_layer_and_direction_names():
    sd = torch_state_dict("gru", 2, 3, layer=1, reverse=True)
    params = interop.gru_from_torch(sd, layer=1, reverse=True)
    assert params["wi"].shape == (2, 9)
    back = interop.gru_to_torch(params, layer=1, reverse=True)
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])
    with pytest.raises(ValueError, match=re.escape(
        "gru_from_torch: the state dict has no ['weight_ih_l0', 'weight_hh_l0']"
    )):  # fmt: skip
        interop.gru_from_torch(sd)
    with pytest.raises(ValueError, match=re.escape(
        "lstm_from_torch: expected weight_ih_l1_reverse of shape (4*H, in) and "
        "weight_hh_l1_reverse of shape (4*H, H); got (9, 2) and (9, 3)."
    )):  # fmt: skip
        interop.lstm_from_torch(sd, layer=1, reverse=True)


def test_missing_biases_are_zero():
    sd = torch_state_dict("lstm", 2, 3)
    del sd["bias_ih_l0"], sd["bias_hh_l0"]
    np.testing.assert_array_equal(interop.lstm_from_torch(sd)["b"], 0.0)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_against_torch_modules(kind):
    torch = pytest.importorskip("torch")
    make, from_torch, to_torch = CASES[kind]
    n_in, hidden = 3, 4
    torch.manual_seed(0)
    module = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[kind](
        n_in, hidden, batch_first=True, dtype=torch.float64
    )
    sd = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    x = np.random.default_rng(0).standard_normal((2, 5, n_in))
    with torch.no_grad():
        expected = module(torch.from_numpy(x))[0].numpy()
    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(jnp.asarray, from_torch(sd))
        ys, _ = fl.rnn(make(hidden)).apply(params, (), x)
    np.testing.assert_allclose(np.asarray(ys), expected, atol=1e-12, rtol=1e-10)
    # And back: fundl-initialised weights loaded into torch give fundl's outputs.
    with jax.enable_x64(True):
        layer = fl.rnn(make(hidden))
        params, _ = layer.init(jax.random.key(3), x)
        ours = np.asarray(layer.apply(params, (), x)[0])
    module.load_state_dict({k: torch.from_numpy(v) for k, v in to_torch(params).items()})
    with torch.no_grad():
        theirs = module(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-12, rtol=1e-10)
