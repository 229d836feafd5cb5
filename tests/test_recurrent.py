"""Recurrent layers: cells against NumPy written from the formulas, scan properties, errors.

The contract checks (float64 gradients through the scan, jit, vmap, determinism) run from
``tests/registry.py``; this file checks the numbers and the behaviour the docs promise.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fundl as fl
from fundl.testing import assert_trees_close
from fundl.testing import strategies as fst

pytestmark = pytest.mark.numerics  # .ci/run reruns these under a second XLA CPU configuration

# -- NumPy references, written from the formulas in the docstrings --------------------------


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def np_simple_step(p, h, x, act):
    return act(x @ p["wi"] + h @ p["wh"] + p["b"])


def np_lstm_step(p, carry, x):
    h, c = carry
    hidden = h.shape[-1]
    z = x @ p["wi"] + h @ p["wh"] + p["b"]
    i, f, g, o = (z[..., k * hidden : (k + 1) * hidden] for k in range(4))
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    h = sigmoid(o) * np.tanh(c)
    return h, c


def np_gru_step(p, h, x):
    hidden = h.shape[-1]
    a = x @ p["wi"] + p["bi"]
    u = h @ p["wh"] + p["bh"]
    a_r, a_z, a_n = (a[..., k * hidden : (k + 1) * hidden] for k in range(3))
    u_r, u_z, u_n = (u[..., k * hidden : (k + 1) * hidden] for k in range(3))
    r = sigmoid(a_r + u_r)
    z = sigmoid(a_z + u_z)
    n = np.tanh(a_n + r * u_n)
    return (1 - z) * n + z * h


def np_step(kind, p, carry, x, act=np.tanh):
    """One step in NumPy: returns (new_carry, y)."""
    if kind == "lstm":
        h, c = np_lstm_step(p, carry, x)
        return (h, c), h
    h = np_gru_step(p, carry, x) if kind == "gru" else np_simple_step(p, carry, x, act)
    return h, h


def np_rnn(kind, p, x, lengths, reverse, act=np.tanh):
    """Runs each sequence alone over its own length, in NumPy: (ys, final carries)."""
    batch, time, _ = x.shape
    hidden = p["wh"].shape[0]
    ys = np.zeros((batch, time, hidden))
    finals = []
    for b in range(batch):
        carry = (np.zeros(hidden), np.zeros(hidden)) if kind == "lstm" else np.zeros(hidden)
        steps = range(lengths[b])
        for t in reversed(steps) if reverse else steps:
            carry, ys[b, t] = np_step(kind, p, carry, x[b, t], act)
        finals.append(carry)
    if kind == "lstm":
        return ys, (np.stack([c[0] for c in finals]), np.stack([c[1] for c in finals]))
    return ys, np.stack(finals)


def make_cell(kind, hidden, **kw):
    return {"lstm": fl.lstm_cell, "gru": fl.gru_cell, "simple": fl.simple_rnn_cell}[kind](
        hidden, **kw
    )


def random_params(kind, n_in, hidden, seed):
    """Params with nonzero biases so that every term of the formulas is exercised."""
    rng = np.random.default_rng(seed)
    gates = {"lstm": 4, "gru": 3, "simple": 1}[kind]
    p = {
        "wi": rng.standard_normal((n_in, gates * hidden)) * 0.5,
        "wh": rng.standard_normal((hidden, gates * hidden)) * 0.5,
    }
    if kind == "gru":
        p["bi"] = rng.standard_normal(gates * hidden)
        p["bh"] = rng.standard_normal(gates * hidden)
    else:
        p["b"] = rng.standard_normal(gates * hidden)
    return p


def to_jnp(tree):
    return jax.tree_util.tree_map(jnp.asarray, tree)


kinds = st.sampled_from(["lstm", "gru", "simple"])


# -- cells vs NumPy ----------------------------------------------------------------------------


@given(kind=kinds, batch=st.integers(1, 3), n_in=st.integers(1, 4), hidden=st.integers(1, 5),
       seed=st.integers(0, 2**16), relu=st.booleans())  # fmt: skip
def test_cell_matches_numpy_formulas(kind, batch, n_in, hidden, seed, relu):
    with jax.enable_x64(True):
        act = (lambda v: np.maximum(v, 0)) if relu else np.tanh
        kw = {"activation": jax.nn.relu if relu else jax.nn.tanh} if kind == "simple" else {}
        cell = make_cell(kind, hidden, **kw)
        rng = np.random.default_rng(seed + 1)
        p = random_params(kind, n_in, hidden, seed)
        x = rng.standard_normal((batch, n_in))
        if kind == "lstm":
            carry = (rng.standard_normal((batch, hidden)), rng.standard_normal((batch, hidden)))
        else:
            carry = rng.standard_normal((batch, hidden))
        (new_carry, y), state = cell.apply(to_jnp(p), (), to_jnp(carry), jnp.asarray(x))
        ref_carry, ref_y = np_step(kind, p, carry, x, act)
        assert state == ()
        assert_trees_close(new_carry, ref_carry, atol=1e-12, rtol=1e-12, what="carry")
        assert_trees_close(y, ref_y, atol=1e-12, rtol=1e-12, what="output")


@given(kind=kinds, batch=st.integers(1, 3), time=st.integers(1, 5), hidden=st.integers(1, 4),
       reverse=st.booleans(), hoist=st.booleans(), unroll=st.sampled_from([1, 3]),
       data=st.data())  # fmt: skip
def test_rnn_matches_numpy_loop_with_lengths(kind, batch, time, hidden, reverse, hoist, unroll,
                                             data):  # fmt: skip
    with jax.enable_x64(True):
        n_in = 3
        lengths = np.asarray(data.draw(st.lists(st.integers(0, time), min_size=batch,
                                                max_size=batch)), np.int32)  # fmt: skip
        x = data.draw(fst.normal_arrays((batch, time, n_in), np.float64))
        p = random_params(kind, n_in, hidden, data.draw(st.integers(0, 2**16)))
        layer = fl.rnn(make_cell(kind, hidden), return_carry=True, reverse=reverse,
                       hoist=hoist, unroll=unroll)  # fmt: skip
        (ys, carry), _ = layer.apply(to_jnp(p), (), jnp.asarray(x), jnp.asarray(lengths))
        ref_ys, ref_carry = np_rnn(kind, p, x, lengths, reverse)
        # Padded steps output exactly zero.
        assert_trees_close(ys, ref_ys, atol=1e-12, rtol=1e-10, what="outputs")
        assert_trees_close(carry, ref_carry, atol=1e-12, rtol=1e-10, what="final carry")
        # return_sequences=False gives the output of the last step processed.
        last, _ = fl.rnn(make_cell(kind, hidden), return_sequences=False, reverse=reverse).apply(
            to_jnp(p), (), jnp.asarray(x), jnp.asarray(lengths)
        )
        h = ref_carry[0] if kind == "lstm" else ref_carry
        assert_trees_close(last, h, atol=1e-12, rtol=1e-10, what="last output")


# -- properties ----------------------------------------------------------------------------------


@given(kind=kinds, reverse=st.booleans(), data=st.data())
def test_padded_batch_equals_each_sequence_alone(kind, reverse, data):
    batch, time, n_in, hidden = 3, 5, 2, 3
    cell = make_cell(kind, hidden)
    layer = fl.rnn(cell, return_carry=True, reverse=reverse)
    x = data.draw(fst.normal_arrays((batch, time, n_in)))
    lengths = np.asarray(data.draw(st.lists(st.integers(0, time), min_size=batch,
                                            max_size=batch)), np.int32)  # fmt: skip
    x[np.arange(time)[None, :] >= lengths[:, None]] = 7.0  # padding must not leak
    params, state = layer.init(jax.random.key(0), x)
    (ys, carry), _ = layer.apply(params, state, x, lengths)
    use_mask = data.draw(st.booleans())
    if use_mask:  # a boolean mask is the same as lengths
        mask = np.arange(time)[None, :] < lengths[:, None]
        (ys_m, carry_m), _ = layer.apply(params, state, x, mask)
        # two programs (a mask and lengths build the step mask differently): a few float32
        # ulps per step over the 5 steps
        tol = 64 * float(jnp.finfo(jnp.float32).eps)
        assert_trees_close((ys_m, carry_m), (ys, carry), atol=tol, rtol=tol, what="mask vs lengths")
    for b in range(batch):
        n = int(lengths[b])
        np.testing.assert_array_equal(np.asarray(ys[b, n:]), 0.0)
        alone_carry = fl.initial_carry(cell, (1,), jnp.float32)
        if n > 0:
            (alone, alone_carry), _ = layer.apply(params, state, x[b : b + 1, :n])
            assert_trees_close(ys[b, :n], alone[0], atol=1e-6, rtol=1e-5, what=f"outputs {b}")
        carry_b = jax.tree_util.tree_map(lambda c, b=b: c[b : b + 1], carry)
        assert_trees_close(carry_b, alone_carry, atol=1e-6, rtol=1e-5, what=f"carry {b}")


@given(kind=kinds, data=st.data())
def test_reversed_layer_on_reversed_input_equals_forward(kind, data):
    batch, time, n_in, hidden = 2, 4, 3, 3
    cell = make_cell(kind, hidden)
    fwd = fl.rnn(cell, return_carry=True)
    bwd = fl.rnn(cell, return_carry=True, reverse=True)
    x = data.draw(fst.normal_arrays((batch, time, n_in)))
    params, state = fwd.init(jax.random.key(1), x)
    (ys_f, carry_f), _ = fwd.apply(params, state, x)
    (ys_b, carry_b), _ = bwd.apply(params, state, x[:, ::-1])
    assert_trees_close(ys_b[:, ::-1], ys_f, atol=1e-6, rtol=1e-6, what="outputs")
    assert_trees_close(carry_b, carry_f, atol=1e-6, rtol=1e-6, what="final carry")
    # With lengths, each sequence is reversed within its own length.
    lengths = np.asarray([time, time - 2], np.int32)
    rev = np.stack([np.concatenate([x[b, :n][::-1], x[b, n:]]) for b, n in enumerate(lengths)])
    (ys_f, carry_f), _ = fwd.apply(params, state, x, lengths)
    (ys_b, carry_b), _ = bwd.apply(params, state, rev, lengths)
    back = np.stack([np.concatenate([ys_b[b, :n][::-1], ys_b[b, n:]]) for b, n in
                     enumerate(lengths)])  # fmt: skip
    assert_trees_close(back, ys_f, atol=1e-6, rtol=1e-6, what="outputs with lengths")
    assert_trees_close(carry_b, carry_f, atol=1e-6, rtol=1e-6, what="carry with lengths")


@pytest.mark.parametrize("kind", ["lstm", "gru", "simple"])
@pytest.mark.parametrize("hoist", [True, False])
def test_scan_equals_python_loop_of_the_cell(kind, hoist):
    batch, time, n_in, hidden = 2, 6, 3, 4
    cell = make_cell(kind, hidden)
    layer = fl.rnn(cell, return_carry=True, hoist=hoist)
    x = np.random.default_rng(0).standard_normal((batch, time, n_in)).astype(np.float32)
    params, state = layer.init(jax.random.key(0), x)
    (ys, carry), _ = jax.jit(layer.apply)(params, state, x)
    loop_carry = fl.initial_carry(cell, (batch,))
    loop_ys = []
    for t in range(time):
        (loop_carry, y), _ = cell.apply(params, state, loop_carry, x[:, t])
        loop_ys.append(y)
    assert_trees_close(ys, jnp.stack(loop_ys, 1), atol=1e-6, rtol=1e-5, what="outputs")
    assert_trees_close(carry, loop_carry, atol=1e-6, rtol=1e-5, what="carry")


def test_initial_carry_is_used_and_custom_cells_thread_state_and_keys():
    cell = fl.gru_cell(3)
    layer = fl.rnn(cell, return_carry=True)
    x = jnp.ones((2, 4, 2))
    params, state = layer.init(jax.random.key(0), x)
    h0 = jnp.full((2, 3), 0.5)
    (ys, h), _ = layer.apply(params, state, x, None, h0)
    (y0, h1), _ = cell.apply(params, state, h0, x[:, 0])
    assert_trees_close(ys[:, 0], y0, atol=1e-6, rtol=1e-6, what="first step from h0")
    (_, h_short), _ = layer.apply(params, state, x, jnp.asarray([1, 0], jnp.int32), h0)
    assert_trees_close(h_short[0], h1[0], atol=1e-6, rtol=1e-6, what="one step from h0")
    assert_trees_close(h_short[1], h0[1], atol=0, rtol=0, what="length 0 keeps h0")
    assert h.shape == (2, 3)

    # A custom stateful, stochastic cell: state counts steps, the key adds noise.
    def init(key, h, x):
        return {"w": jnp.ones((x.shape[-1], h.shape[-1]))}, jnp.zeros((), jnp.int32)

    def apply(params, state, h, x, key=None, train=False):
        noise = jax.random.normal(key, h.shape) if train else jnp.zeros_like(h)
        h = jnp.tanh(h + x @ params["w"]) + noise
        return (h, h), state + 1

    noisy = fl.make_cell(fl.Layer(init, apply), lambda shape, dtype: jnp.zeros((*shape, 3), dtype))
    layer = fl.rnn(noisy)
    params, state = layer.init(jax.random.key(0), x)
    ys, state = layer.apply(params, state, x, key=jax.random.key(1), train=True)
    assert int(state) == 4
    assert not np.allclose(ys[:, 1], ys[:, 2])  # a different key every step
    again, _ = layer.apply(params, jnp.zeros((), jnp.int32), x, key=jax.random.key(1), train=True)
    np.testing.assert_array_equal(np.asarray(ys), np.asarray(again))


def test_lstm_init_forget_bias_and_orthogonal_recurrent_blocks():
    cell = fl.lstm_cell(4)
    params, _ = cell.init(jax.random.key(0), fl.initial_carry(cell, (1,)), jnp.zeros((1, 3)))
    b = np.asarray(params["b"])
    np.testing.assert_array_equal(b[4:8], 1.0)
    np.testing.assert_array_equal(np.concatenate([b[:4], b[8:]]), 0.0)
    assert params["wi"].shape == (3, 16)
    assert params["wh"].shape == (4, 16)
    for g in range(4):
        block = np.asarray(params["wh"][:, 4 * g : 4 * (g + 1)])
        np.testing.assert_allclose(block.T @ block, np.eye(4), atol=1e-5)
    cell = fl.lstm_cell(4, forget_bias=0.0)
    params, _ = cell.init(jax.random.key(0), fl.initial_carry(cell, (1,)), jnp.zeros((1, 3)))
    np.testing.assert_array_equal(np.asarray(params["b"]), 0.0)


def test_compute_dtype_and_carry_dtype():
    cell = fl.lstm_cell(4, dtype=jnp.bfloat16)
    layer = fl.rnn(cell, return_carry=True)
    x = jnp.ones((2, 3, 5), jnp.float32)
    params, state = layer.init(jax.random.key(0), x)
    assert params["wi"].dtype == jnp.float32
    (ys, (h, c)), _ = layer.apply(params, state, x)
    assert ys.dtype == jnp.bfloat16
    assert h.dtype == c.dtype == jnp.float32  # the carry keeps its dtype


def test_stacked_layers_with_dropout_like_layers_compose_in_serial():
    model = fl.serial(
        fl.rnn(fl.lstm_cell(8)),
        fl.function(lambda v: v * 0.5, name="scale"),  # where a dropout layer would go
        fl.bidirectional(fl.rnn(fl.gru_cell(4)), fl.rnn(fl.gru_cell(4), reverse=True)),
        fl.rnn(fl.simple_rnn_cell(6), return_sequences=False),
        fl.dense(3),
    )
    x = jnp.ones((2, 5, 7))
    params, state = model.init(jax.random.key(0), x)
    out, _ = model.apply(params, state, x)
    assert out.shape == (2, 3)

    def loss(params):
        return jnp.sum(model.apply(params, state, x)[0] ** 2)

    grads = jax.grad(loss)(params)
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree_util.tree_leaves(grads))


def test_bidirectional_outputs_and_carry():
    fwd, bwd = (
        fl.rnn(fl.lstm_cell(3), return_carry=True),
        fl.rnn(fl.gru_cell(2), return_carry=True, reverse=True),
    )
    layer = fl.bidirectional(fwd, bwd)
    x = np.random.default_rng(0).standard_normal((2, 4, 3)).astype(np.float32)
    lengths = np.asarray([4, 2], np.int32)
    params, state = layer.init(jax.random.key(0), x)
    (y, (cf, cb)), _ = layer.apply(params, state, x, lengths)
    (yf, cf_ref), _ = fwd.apply(params["forward"], state["forward"], x, lengths)
    (yb, cb_ref), _ = bwd.apply(params["backward"], state["backward"], x, lengths)
    # the same scans, traced inside bidirectional or alone: separately compiled, so a few
    # float32 ulps per step over the 4 steps
    tol = 64 * float(jnp.finfo(jnp.float32).eps)
    assert_trees_close(y, jnp.concatenate([yf, yb], -1), atol=tol, rtol=tol, what="merged")
    assert_trees_close((cf, cb), (cf_ref, cb_ref), atol=tol, rtol=tol, what="carries")
    summed = fl.bidirectional(fl.rnn(fl.gru_cell(3)), fl.rnn(fl.gru_cell(3), reverse=True), "sum")
    p, s = summed.init(jax.random.key(0), x)
    assert summed.apply(p, s, x)[0].shape == (2, 4, 3)


@pytest.mark.parametrize("kind", ["lstm", "gru", "simple"])
@pytest.mark.parametrize(("reverse", "hoist"), [(False, False), (True, True), (True, False)])
def test_fused_backward_equals_autodiff_of_the_scan(kind, reverse, hoist):
    # Same outputs and same gradients (params, input, initial carry), padding included:
    # only where the params' gradients are summed differs (after the loop, not inside it).
    with jax.enable_x64(True):
        cell = make_cell(kind, 5)
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((3, 6, 4)))
        lengths = jnp.asarray([6, 2, 0], jnp.int32)
        carry = jax.tree_util.tree_map(lambda a: a + 0.3, fl.initial_carry(cell, (3,), x.dtype))
        results = []
        for fused in (False, True):
            layer = fl.rnn(cell, reverse=reverse, hoist=hoist, return_carry=True,
                           fused_backward=fused)  # fmt: skip
            params, state = layer.init(jax.random.key(0), x)

            def loss(params, x, carry, layer=layer, state=state):
                out, _ = layer.apply(params, state, x, lengths, carry)
                return sum(jnp.sum(jnp.sin(v)) for v in jax.tree_util.tree_leaves(out))

            results.append(jax.value_and_grad(loss, argnums=(0, 1, 2))(params, x, carry))
        assert_trees_close(results[1], results[0], atol=1e-12, rtol=1e-12, what="fused vs scan")


def test_fused_backward_is_reverse_mode_only():
    layer = fl.rnn(fl.lstm_cell(3), fused_backward=True)
    plain = fl.rnn(fl.lstm_cell(3))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 3)), jnp.float32)
    params, state = layer.init(jax.random.key(0), x)

    def loss(layer):
        return lambda p: jnp.sum(layer.apply(p, state, x)[0] ** 2)

    # second order by reverse mode and by forward-over-reverse (jax.hessian) both work
    hess = jax.hessian(loss(layer))(params)["wh"]["wh"]
    assert_trees_close(hess, jax.hessian(loss(plain))(params)["wh"]["wh"], atol=1e-5,
                       rtol=1e-4, what="hessian")  # fmt: skip
    with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
        jax.jvp(loss(layer), (params,), (params,))
    assert repr(layer) == "Layer(rnn(lstm_cell(3), fused_backward=True))"


def test_fused_backward_by_default_unless_forward_mode():
    layer, plain = fl.rnn(fl.lstm_cell(3)), fl.rnn(fl.lstm_cell(3), fused_backward=False)
    fused = fl.rnn(fl.lstm_cell(3), fused_backward=True)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 3)), jnp.float32)
    params, state = layer.init(jax.random.key(0), x)

    def loss(layer):
        return lambda p: jnp.sum(layer.apply(p, state, x)[0] ** 2)

    def jvp(layer):
        return lambda p: jax.jvp(loss(layer), (p,), (p,))

    def same_program(f, g):
        return str(jax.make_jaxpr(f)(params)) == str(jax.make_jaxpr(g)(params))

    # reverse mode, also under vmap, fuses; forward mode (jvp, jacfwd) runs the plain scan
    assert same_program(jax.grad(loss(layer)), jax.grad(loss(fused)))
    assert not same_program(jax.grad(loss(layer)), jax.grad(loss(plain)))

    def per_example(layer):  # the params' gradient of each sequence, under vmap
        one = lambda p, seq: jnp.sum(layer.apply(p, state, seq[None])[0] ** 2)  # noqa: E731
        return lambda p: jax.vmap(jax.grad(one), (None, 0))(p, x)

    assert same_program(per_example(layer), per_example(fused))
    assert same_program(jvp(layer), jvp(plain))
    # same numbers either way (float32 rounding: the weights' gradient summed in another
    # order, after the loop instead of inside it)
    assert_trees_close(jax.grad(loss(layer))(params), jax.grad(loss(plain))(params),
                       atol=1e-5, rtol=1e-5, what="grad")  # fmt: skip
    assert_trees_close(jvp(layer)(params), jvp(plain)(params), atol=1e-5, rtol=1e-5, what="jvp")
    jac = jax.jacfwd(lambda x: layer.apply(params, state, x)[0])(x)
    assert jac.shape == (2, 4, 3, 2, 4, 3)
    # forward mode through a function jitted before jvp sees it cannot be detected
    with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
        jax.jvp(jax.jit(loss(layer)), (params,), (params,))
    jax.jvp(jax.jit(loss(plain)), (params,), (params,))  # the documented fix


def test_fused_backward_in_bfloat16():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8, 6)), jnp.float32)
    grads = []
    for fused in (False, True):
        layer = fl.rnn(fl.gru_cell(8, dtype=jnp.bfloat16), fused_backward=fused)
        params, state = layer.init(jax.random.key(0), x)
        grads.append(jax.grad(lambda p, m=layer, s=state: jnp.sum(m.apply(p, s, x)[0]))(params))
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads[1]))
    # bfloat16 keeps 8 bits of mantissa (0.4% rounding per op) and the two paths sum the
    # steps' terms in a different order: measured, they differ by up to 1.2% of each
    # gradient's largest entry; 3% bounds that, and a wrong gradient is off by far more.
    for name in grads[0]:
        a, b = np.asarray(grads[0][name]), np.asarray(grads[1][name])
        assert np.max(np.abs(a - b)) <= 0.03 * np.max(np.abs(a)), name


def test_compiles_once_per_shape():
    from fundl.testing import count_compiles

    layer = fl.rnn(fl.lstm_cell(4))
    x = jnp.ones((2, 6, 3))
    params, state = layer.init(jax.random.key(0), x)
    run = jax.jit(layer.apply)
    run(params, state, x, jnp.asarray([6, 3], jnp.int32))
    x2, lengths2 = x * 2, jnp.asarray([1, 5], jnp.int32)
    with count_compiles() as compiles:
        run(params, state, x2, lengths2)
    assert compiles == []


# -- cells as values --------------------------------------------------------------------------


def leaky_cell_parts():
    """A custom cell: h' = 0.5 h + tanh(x W), y = 2 h'; params {"w": (in, 3)}."""

    def init(key, h, x):
        return {"w": jax.random.normal(key, (x.shape[-1], h.shape[-1]), x.dtype)}, ()

    def apply(params, state, h, x, key=None, train=False):
        h = 0.5 * h + jnp.tanh(x @ params["w"])
        return (h, 2 * h), state

    def zeros(batch_shape, dtype):
        return jnp.zeros((*batch_shape, 3), dtype)

    return init, apply, zeros


def test_make_cell_returns_a_new_cell_and_leaves_its_layer_as_it_was():
    init, apply, zeros = leaky_cell_parts()
    layer = fl.core.named(fl.Layer(init, apply), "leaky")
    info = fl.core.layer_info(layer)
    attributes = dict(vars(layer.apply))
    cell = fl.make_cell(layer, zeros)
    assert isinstance(cell, fl.Cell) and not isinstance(cell, fl.Layer)
    assert cell == fl.Cell(layer.init, layer.apply, zeros, None)
    assert layer == fl.Layer(layer.init, layer.apply) and vars(layer.apply) == attributes
    assert fl.core.layer_info(layer) == info
    assert not hasattr(apply, "_fundl_cell")
    assert repr(cell) == "Cell(leaky)" and cell.layer == layer
    with pytest.raises(TypeError, match=re.escape("rnn: leaky is not a recurrent cell.")):
        fl.rnn(layer)  # the layer itself did not become a cell


@pytest.mark.parametrize("reverse", [False, True])
def test_custom_cell_value_runs_in_rnn_against_numpy(reverse):
    with jax.enable_x64(True):
        cell = fl.Cell(*leaky_cell_parts())
        x = np.random.default_rng(0).standard_normal((2, 4, 2))
        lengths = np.asarray([4, 2], np.int32)
        # hoist and fused_backward apply to built-in cells only: a custom cell ignores them
        layer = fl.rnn(cell, return_carry=True, reverse=reverse, hoist=True, fused_backward=True)
        params, state = layer.init(jax.random.key(0), x)
        (ys, h), _ = layer.apply(params, state, jnp.asarray(x), jnp.asarray(lengths))
        w = np.asarray(params["w"])
        ref_ys, ref_h = np.zeros((2, 4, 3)), np.zeros((2, 3))
        for b in range(2):
            steps = range(lengths[b])
            for t in reversed(steps) if reverse else steps:
                ref_h[b] = 0.5 * ref_h[b] + np.tanh(x[b, t] @ w)
                ref_ys[b, t] = 2 * ref_h[b]
        assert_trees_close((ys, h), (ref_ys, ref_h), atol=1e-12, rtol=1e-12, what="custom")
        # no custom_vjp on a custom cell: forward mode works
        jax.jvp(lambda p: layer.apply(p, state, x)[0], (params,), (params,))


def test_cell_layer_and_rnn_meta():
    cell = fl.lstm_cell(3)
    assert repr(cell) == "Cell(lstm_cell(3))" and cell.name == "lstm_cell(3)"
    carry = fl.initial_carry(cell, (2,))
    step = fl.serial(cell.layer)  # the step as a layer composes like any layer
    params, state = step.init(jax.random.key(0), carry, jnp.ones((2, 4)))
    (_, y), _ = step.apply(params, state, carry, jnp.ones((2, 4)))
    assert y.shape == (2, 3)
    layer = fl.rnn(cell, reverse=True, return_carry=True)
    assert fl.core.layer_info(layer).meta["rnn"] == {"reverse": True, "return_carry": True}
    assert layer.children == (("rnn", cell.layer),)


@pytest.mark.parametrize("make", [fl.lstm_cell, fl.gru_cell, fl.simple_rnn_cell])
def test_old_hidden_keyword_names_features(make):
    name = make.__name__
    msg = f"{name}() got the keyword hidden=, renamed to features= in fundl 0.2."
    with pytest.raises(TypeError, match=re.escape(msg)):
        make(hidden=8)
    assert make(features=8).name.startswith(f"{name}(8")


# -- errors ------------------------------------------------------------------------------------


def test_error_wrong_carry_shape():
    cell = fl.lstm_cell(4)
    layer = fl.rnn(cell)
    x = jnp.ones((2, 3, 5))
    params, state = layer.init(jax.random.key(0), x)
    bad = (jnp.zeros((2, 4)), jnp.zeros((2, 5)))
    msg = (
        "rnn(lstm_cell(4)): the initial carry has shapes ((2, 4), (2, 5)), expected "
        "((2, 4), (2, 4)) for a batch of 2. Build it with fl.initial_carry(cell, (2,))."
    )
    with pytest.raises(ValueError, match=re.escape(msg)):
        layer.apply(params, state, x, None, bad)
    with pytest.raises(ValueError, match=re.escape("the initial carry has shapes")):
        layer.init(jax.random.key(0), x, None, jnp.zeros((2, 4)))
    # The cell itself checks its carry.
    with pytest.raises(ValueError, match=re.escape(
        "lstm_cell(4): carry should be a tuple (h, c), each of shape (batch, 4), here (2, 4); "
        "got ((2, 4), (2, 5)). Build it with fl.initial_carry(cell, (2,))."
    )):  # fmt: skip
        cell.apply(params, state, bad, x[:, 0])
    with pytest.raises(ValueError, match=re.escape("gru_cell(3): carry should be an array")):
        fl.gru_cell(3).init(jax.random.key(0), jnp.zeros((2, 4)), jnp.zeros((2, 1)))


def test_error_lengths_longer_than_time_axis():
    layer = fl.rnn(fl.gru_cell(2))
    x = jnp.ones((2, 3, 1))
    params, state = layer.init(jax.random.key(0), x)
    msg = (
        "rnn(gru_cell(2)): lengths must lie in [0, 3] (the time axis of the input), got values "
        "from 1 to 4. Pad the inputs to the longest sequence or fix the lengths."
    )
    with pytest.raises(ValueError, match=re.escape(msg)):
        layer.apply(params, state, x, np.asarray([4, 1], np.int32))
    with pytest.raises(ValueError, match=re.escape("got values from -1 to 2")):
        layer.apply(params, state, x, np.asarray([2, -1], np.int32))
    with pytest.raises(ValueError, match=re.escape(
        "rnn(gru_cell(2)): lengths must be integers of shape (batch,) = (2,) or a boolean mask "
        "of shape (batch, time) = (2, 3); got float32 of shape (2,)."
    )):  # fmt: skip
        layer.apply(params, state, x, np.asarray([2.0, 1.0], np.float32))
    with pytest.raises(ValueError, match=re.escape(
        "rnn(gru_cell(2)): mask has shape (2, 4), expected (batch, time) = (2, 3)"
    )):  # fmt: skip
        layer.apply(params, state, x, np.ones((2, 4), bool))


def test_error_cell_output_does_not_match_carry():
    def init(key, h, x):
        return {"w": jnp.ones((x.shape[-1], 5))}, ()

    def apply(params, state, h, x, key=None, train=False):
        h = x @ params["w"]  # (batch, 5), but the carry is (batch, 3)
        return (h, h), state

    named = fl.core.named(fl.Layer(init, apply), "bad_cell")
    cell = fl.make_cell(named, lambda shape, dtype: jnp.zeros((*shape, 3), dtype))
    layer = fl.rnn(cell)
    x = jnp.ones((2, 4, 2))
    params, state = layer.init(jax.random.key(0), x)
    msg = (
        "rnn(bad_cell): the cell returned a carry ((2, 5), 'float32') that does not match the "
        "carry it was given ((2, 3), 'float32') (structure, shapes and dtypes must agree, as "
        "lax.scan needs)."
    )
    with pytest.raises(ValueError, match=re.escape(msg)):
        layer.apply(params, state, x)


def test_error_messages_for_misuse():
    with pytest.raises(TypeError, match=re.escape(
        "rnn: dense(3) is not a recurrent cell. Use fl.lstm_cell(H), fl.gru_cell(H), "
        "fl.simple_rnn_cell(H), or wrap a custom cell with fl.make_cell(layer, initial_carry)."
    )):  # fmt: skip
        fl.rnn(fl.dense(3))
    with pytest.raises(ValueError, match=re.escape("lstm_cell(0): features must be a positive")):
        fl.lstm_cell(0)
    layer = fl.rnn(fl.lstm_cell(2))
    with pytest.raises(ValueError, match=re.escape(
        "rnn(lstm_cell(2)): input has shape (3, 4), expected (batch, time, features). For a "
        "single sequence add a batch axis, x[None]; for one step call the cell."
    )):  # fmt: skip
        layer.init(jax.random.key(0), jnp.ones((3, 4)))
    params, state = layer.init(jax.random.key(0), jnp.ones((1, 2, 3)))
    with pytest.raises(ValueError, match=re.escape(
        "rnn lstm_cell(2): input has last dimension 4, params expect 3."
    )):  # fmt: skip
        layer.apply(params, state, jnp.ones((1, 2, 4)))
    with pytest.raises(ValueError, match=re.escape(
        "serial[0] rnn(lstm_cell(2)): input has shape (3, 4)"
    )):  # fmt: skip
        fl.serial(layer).init(jax.random.key(0), jnp.ones((3, 4)))
    msg = "the backward layer runs forward; build it with fl.rnn(cell, reverse=True)."
    with pytest.raises(ValueError, match=re.escape(msg)):
        fl.bidirectional(layer, layer)
    with pytest.raises(ValueError, match=re.escape("the forward layer runs in reverse")):
        fl.bidirectional(fl.rnn(fl.gru_cell(2), reverse=True), fl.rnn(fl.gru_cell(2), reverse=True))
    with pytest.raises(TypeError, match=re.escape("initial_carry: dense(2) is not a recurrent")):
        fl.initial_carry(fl.dense(2), (1,))


def test_numpy_int64_lengths_need_no_cast():
    # NumPy's default int64, with JAX's 64-bit types off: taken as int32 (no warning, which
    # the suite's filterwarnings would turn into an error)
    layer = fl.rnn(fl.gru_cell(3))
    x = jnp.ones((2, 4, 2))
    params, state = layer.init(jax.random.key(0), x)
    y, _ = layer.apply(params, state, x, np.array([4, 2]))
    assert bool((y[1, 2:] == 0).all()) and not bool((y[0, 2:] == 0).all())
