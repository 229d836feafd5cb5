"""repeat (scanned stacks) and the pre-norm encoder/decoder blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fundl as fl
from fundl.core import Layer, layer_info, named

pytestmark = pytest.mark.numerics  # .ci/run reruns these under a second XLA CPU configuration

KEY = jax.random.key(0)


def noise() -> Layer:
    """Adds standard normal noise drawn from its key; counts its calls in its state."""

    def init(key, x):
        return (), jnp.zeros((), jnp.int32)

    def apply(params, state, x, key=None, train=False):
        return x + jax.random.normal(key, x.shape), state + 1

    return named(Layer(init, apply), "noise")


def rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def block_i(params, i):
    return jax.tree.map(lambda p: p[i], params)


@pytest.mark.parametrize("with_mask", [False, True])
def test_repeat_equals_blocks_one_after_another(with_mask):
    block = fl.decoder_block(8, 2, mlp_features=12)
    stack = fl.repeat(block, 3)
    x = rand((2, 5, 8))
    mask = (np.arange(5)[None, :] < np.array([5, 3])[:, None])[:, None, :]
    inputs = (x, mask) if with_mask else (x,)
    params, state = stack.init(KEY, *inputs)
    assert params["attn"]["attn"]["query"]["w"].shape == (3, 8, 8)
    y, _ = stack.apply(params, state, *inputs)
    h = x
    for i in range(3):
        h, _ = block.apply(block_i(params, i), block_i(state, i), h, *inputs[1:])
    # float32, outputs of size ~4 after three blocks: scan and the eager loop round apart
    # by a few ulps (~2e-6 seen), so atol is 1e-5.
    np.testing.assert_allclose(y, h, rtol=1e-5, atol=1e-5)


def test_repeat_params_are_addressable_per_block():
    stack = fl.repeat(fl.dense(4), 3)
    params, state = stack.init(KEY, jnp.zeros((1, 4)))
    assert jax.tree.map(jnp.shape, block_i(params, 1)) == {"w": (4, 4), "b": (4,)}
    assert not np.allclose(params["w"][0], params["w"][1])  # one key per block at init
    identity = {"w": jnp.eye(4), "b": jnp.zeros(4)}
    params = jax.tree.map(lambda p, q: p.at[1].set(q), params, identity)
    x = rand((2, 4))
    y, _ = stack.apply(params, state, x)
    h = x @ np.asarray(params["w"][0]) + np.asarray(params["b"][0])
    h = h @ np.asarray(params["w"][2]) + np.asarray(params["b"][2])
    np.testing.assert_allclose(y, h, rtol=1e-5, atol=1e-5)


def test_repeat_splits_keys_and_stacks_state():
    stack = fl.repeat(noise(), 3)
    x = jnp.zeros((2,))
    params, state = stack.init(KEY, x)
    assert state.shape == (3,)
    key = jax.random.key(7)
    y, new_state = stack.apply(params, state, x, key=key)
    expected = sum(jax.random.normal(k, (2,)) for k in jax.random.split(key, 3))
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    np.testing.assert_array_equal(new_state, [1, 1, 1])


def test_repeat_compiles_one_block_whatever_the_depth():
    """The traced program of repeat(block, n) has the same size for any n (one scan body)."""
    block = fl.decoder_block(8, 2)
    x = rand((1, 4, 8))
    sizes = {}
    for n in (1, 8):
        stack = fl.repeat(block, n)
        params, state = stack.init(KEY, x)
        jaxpr = jax.make_jaxpr(lambda p, s: stack.apply(p, s, x))(params, state)  # noqa: B023
        sizes[n] = len(str(jaxpr))
    assert sizes[8] <= 1.02 * sizes[1]  # only the stacked shapes' digits differ


def test_repeat_errors():
    with pytest.raises(ValueError, match=r"^repeat\(layer, times\): times must be a positive int"):
        fl.repeat(fl.dense(3), 0)
    with pytest.raises(ValueError) as err:
        fl.repeat(fl.dense(3), 2).init(KEY, jnp.zeros((1, 4)))
    assert str(err.value) == (
        "repeat(dense(3), 2): the layer maps shape (1, 4) float32 to shape (1, 3) float32; "
        "repeat feeds each copy's output to the next, so they must match. Make the layer "
        "keep its input's shape and dtype."
    )
    stack = fl.repeat(fl.dense(4), 2)
    params, state = fl.dense(4).init(KEY, jnp.zeros((1, 4)))
    with pytest.raises(ValueError, match=r"^repeat\(dense\(4\), 2\): params and state need a "
                                         r"leading axis of size 2"):  # fmt: skip
        stack.apply(params, state, jnp.zeros((1, 4)))


def test_block_param_structure_and_dropout():
    block = fl.encoder_block(8, 2, mlp_features=16, dropout_rate=0.5)
    x = rand((2, 3, 8))
    params, state = block.init(KEY, x)
    assert set(params) == {"attn", "mlp"}
    assert set(params["attn"]) == {"norm", "attn", "drop"}
    assert params["mlp"]["up"]["w"].shape == (8, 16)
    assert params["mlp"]["down"]["w"].shape == (16, 8)
    y1, _ = block.apply(params, state, x)
    y2, _ = block.apply(params, state, x, key=jax.random.key(1), train=True)
    assert not np.allclose(y1, y2)


def test_encoder_block_ignores_padded_positions():
    block = fl.encoder_block(8, 2)
    x = rand((2, 6, 8))
    lengths = np.array([6, 4])
    mask = (np.arange(6)[None, :] < lengths[:, None])[:, None, :]
    params, state = block.init(KEY, x, mask)
    y, _ = block.apply(params, state, x, mask)
    changed = x.copy()
    changed[1, 4:] = 100.0 * rand((2, 8), 3)
    y2, _ = block.apply(params, state, changed, mask)
    np.testing.assert_allclose(y2[1, :4], y[1, :4], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y2[0], y[0], rtol=1e-6)


def test_decoder_block_is_causal():
    block = fl.decoder_block(8, 2, rope_base=10000.0)
    x = rand((1, 6, 8))
    params, state = block.init(KEY, x)
    y, _ = block.apply(params, state, x)
    changed = x.copy()
    changed[:, 3:] = rand((1, 3, 8), 5)
    y2, _ = block.apply(params, state, changed)
    np.testing.assert_allclose(y2[:, :3], y[:, :3], rtol=1e-5, atol=1e-6)
    assert not np.allclose(y2[:, 3:], y[:, 3:])


def language_model(decode: bool) -> Layer:
    return fl.serial(
        embed=fl.embedding(11, 8),
        pos=fl.learned_positions(10, decode=decode),
        blocks=fl.repeat(fl.decoder_block(8, 2, num_kv_heads=1, decode=decode), 2),
    )


def test_language_model_cached_decoding_equals_full_pass():
    ids = np.random.default_rng(0).integers(0, 11, (2, 7)).astype(np.int32)
    full, dec = language_model(False), language_model(True)
    params, state = full.init(KEY, ids)
    y, _ = full.apply(params, state, ids)
    cache = fl.init_cache(dec, batch=2, max_len=10)
    assert cache["blocks"]["attn"]["attn"].key.shape == (2, 2, 10, 1, 4)  # (blocks, ...)
    step = jax.jit(dec.apply)
    outs = []
    for t in range(7):
        out, cache = step(params, cache, ids[:, t : t + 1])
        outs.append(out)
    # float32, a jitted cache one token at a time against one eager pass: two programs round
    # apart by a few ulps of outputs of size ~1 through two blocks; 1e-5 is ~80 ulps.
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), y, rtol=1e-5, atol=1e-5)


def test_block_width_not_divisible_by_heads():
    with pytest.raises(ValueError) as err:
        fl.decoder_block(10, 4)
    assert str(err.value) == (
        "decoder_block(10, 4): features=10 is not divisible by num_heads=4. Pick num_heads "
        "dividing 10."
    )


def test_block_defaults_layer_norm_and_dropout():
    block = fl.decoder_block(8, 2, dropout_rate=0.1, attention_dropout_rate=0.1)
    x = rand((2, 3, 8))
    params, state = block.init(KEY, x)
    assert set(params["attn"]["norm"]) == set(params["mlp"]["norm"]) == {"scale", "bias"}
    y_eval, _ = block.apply(params, state, x)
    y_train, _ = block.apply(params, state, x, key=jax.random.key(1), train=True)
    assert not np.allclose(y_eval, y_train)
    with pytest.raises(ValueError, match=r"key"):
        block.apply(params, state, x, train=True)


def test_block_is_its_documented_parts():
    # What replaces fundl 0.1's dropout_layer=: a block built from its parts, here with the
    # norm and dropout layers of one's choice; with fl.dropout it is fl.decoder_block.
    norm, drop = fl.rms_norm(), fl.dropout(0.5)
    attention = fl.multi_head_attention(2, is_causal=True, dropout_rate=0.1)
    mlp = fl.serial(norm=norm, up=fl.dense(12), act=jax.nn.gelu, down=fl.dense(8), drop=drop)
    by_hand = fl.serial(attn=fl.attention_residual(attention, norm, drop), mlp=fl.residual(mlp))
    block = fl.decoder_block(8, 2, mlp_features=12, dropout_rate=0.5, attention_dropout_rate=0.1,
                             norm=fl.rms_norm())  # fmt: skip
    x = rand((2, 5, 8))
    params, state = block.init(KEY, x)
    assert jax.tree.structure(by_hand.init(KEY, x)) == jax.tree.structure((params, state))
    assert set(params["attn"]["norm"]) == {"scale"}  # rms_norm in both branches
    assert not np.allclose(params["attn"]["norm"]["scale"], 0.0)
    key = jax.random.key(3)
    y_block, _ = block.apply(params, state, x, key=key, train=True)
    y_hand, _ = by_hand.apply(params, state, x, key=key, train=True)
    # the same operations, run eagerly both times: equal up to float32 rounding
    np.testing.assert_allclose(y_hand, y_block, rtol=1e-6, atol=1e-6)


def test_block_renamed_keywords_and_norm_constructors():
    with pytest.raises(TypeError) as err:
        fl.encoder_block(8, 2, hidden=16)
    assert str(err.value) == (
        "encoder_block() got the keyword hidden=, renamed to mlp_features= in fundl 0.2."
    )
    for old, new in [("dropout", "dropout_rate"), ("attention_dropout", "attention_dropout_rate"),
                     ("width", "features")]:  # fmt: skip
        with pytest.raises(TypeError, match=rf"^decoder_block\(\) got the keyword {old}=, "
                                            rf"renamed to {new}= in fundl 0\.2\.$"):  # fmt: skip
            fl.decoder_block(8, 2, **{old: 0.1})
    with pytest.raises(TypeError) as err:
        fl.decoder_block(8, 2, dropout_layer=fl.dropout)
    assert str(err.value) == (
        "decoder_block() got the keyword dropout_layer=, removed in fundl 0.2: blocks use "
        "fl.dropout(dropout_rate); for another dropout layer, build the block from "
        "fl.attention_residual and fl.residual."
    )
    with pytest.raises(TypeError, match=r"^decoder_block\(8, 2\): norm must be a Layer value, "
                                        r"got <function rms_norm"):  # fmt: skip
        fl.decoder_block(8, 2, norm=fl.rms_norm)
    with pytest.raises(ValueError, match=r"^encoder_block\(8, 2\): attention_dropout_rate must "
                                         r"be in \[0, 1\), got 1.5\.$"):  # fmt: skip
        fl.encoder_block(8, 2, attention_dropout_rate=1.5)


def _value_and_grad(block, state):
    def loss(p, x):
        return jnp.sum(block.apply(p, state, x, key=jax.random.key(1), train=True)[0] ** 2)

    return jax.jit(jax.value_and_grad(loss))


def test_block_remat_option_is_off_by_default_and_keeps_the_params():
    x = jax.ShapeDtypeStruct((2, 5, 8), jnp.float32)  # shapes only: lowering compiles nothing
    for make in (fl.encoder_block, fl.decoder_block):
        plain = make(8, 2, mlp_features=12, dropout_rate=0.1)
        params, state = jax.eval_shape(plain.init, KEY, x)
        text = _value_and_grad(plain, state).lower(params, x).as_text()
        assert "optimization_barrier" not in text
        for off in (None, False):  # remat off: the very same program
            block = make(8, 2, mlp_features=12, dropout_rate=0.1, remat=off)
            assert _value_and_grad(block, state).lower(params, x).as_text() == text
        for remat in (True, jax.checkpoint_policies.dots_saveable):
            block = make(8, 2, mlp_features=12, dropout_rate=0.1, remat=remat)
            assert layer_info(block).name == layer_info(plain).name
            assert jax.eval_shape(block.init, KEY, x) == (params, state)
            lowered = _value_and_grad(block, state).lower(params, x).as_text()
            assert "optimization_barrier" in lowered  # the backward pass recomputes
    with pytest.raises(TypeError, match=r"^decoder_block\(8, 2\): remat must be None, True or "
                                        r"a policy from jax.checkpoint_policies"):  # fmt: skip
        fl.decoder_block(8, 2, remat="dots")


@pytest.mark.slow  # three compiles of a block's init and gradient: ~5 s of one core
def test_block_remat_gives_the_same_values_and_gradients():
    x = rand((2, 5, 8))
    plain = fl.decoder_block(8, 2, mlp_features=12, dropout_rate=0.1)
    params, state = jax.jit(plain.init)(KEY, x)
    block = fl.decoder_block(8, 2, mlp_features=12, dropout_rate=0.1,
                             remat=jax.checkpoint_policies.dots_saveable)  # fmt: skip
    value, grads = _value_and_grad(plain, state)(params, x)
    value_r, grads_r = _value_and_grad(block, state)(params, x)
    # The recomputed forward pass is the same float32 arithmetic, but XLA fuses the remat
    # program differently, so sums may round apart by a few ulps: 1e-5 (float32 eps ~1.2e-7
    # times the tens of terms summed into each gradient entry).
    np.testing.assert_allclose(value_r, value, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
