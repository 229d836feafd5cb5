"""multi_head_attention: numbers against NumPy for every mask kind and GQA, properties, KV cache,
errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fundl as fl

pytestmark = pytest.mark.numerics  # .ci/run reruns these under a second XLA CPU configuration

KEY = jax.random.key(0)
IMPLS = ["explicit", "xla"]
EPS = float(np.finfo(np.float32).eps)
# float32 layers against the float64 NumPy loop: projections and softmax sums of up to 8
# terms of size ~1 round at a few float32 ulps; 1e-4 relative leaves room for cancellation.
REF_TOL = {"rtol": 1e-4, "atol": 1e-5}
# float32 outputs of size ~1 from two differently compiled programs (another shape, jit
# against eager, a KV cache against one pass): rounding apart by a few ulps; 64 ulps leaves
# room for another machine's vector width and FMA contraction.
F32_TOL = {"rtol": 64 * EPS, "atol": 64 * EPS}


def numpy_attention(params, q_in, kv_in, mask, heads, kv_heads, causal):
    """Softmax attention with loops over batch, heads and query positions (NumPy, float64).

    ``mask`` is None or a boolean array broadcastable to (batch, heads, q_len, kv_len)
    (a 3-d mask gets a head axis). Rows without any allowed key give zeros.
    """
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    q_in, kv_in = np.asarray(q_in, np.float64), np.asarray(kv_in, np.float64)
    b, t, _ = q_in.shape
    s = kv_in.shape[1]

    def proj(name, x):
        y = x @ p[name]["w"]
        return y + p[name]["b"] if "b" in p[name] else y

    d = p["query"]["w"].shape[1] // heads
    q = proj("query", q_in).reshape(b, t, heads, d)
    k = proj("key", kv_in).reshape(b, s, kv_heads, d)
    v = proj("value", kv_in).reshape(b, s, kv_heads, d)
    if mask is None:
        allowed = np.ones((b, heads, t, s), bool)
    else:
        m = np.asarray(mask)
        m = m[:, None] if m.ndim == 3 else m.reshape((1,) * (4 - m.ndim) + m.shape)
        allowed = np.broadcast_to(m, (b, heads, t, s))
    out = np.zeros((b, t, heads, d))
    for bi in range(b):
        for h in range(heads):
            g = h // (heads // kv_heads)  # the key/value head this query head shares
            for i in range(t):
                js = [j for j in range(s) if allowed[bi, h, i, j] and (not causal or j <= i)]
                if not js:
                    continue
                logits = np.array([q[bi, i, h] @ k[bi, j, g] / np.sqrt(d) for j in js])
                w = np.exp(logits - logits.max())
                w /= w.sum()
                out[bi, i, h] = sum(wj * v[bi, j, g] for wj, j in zip(w, js, strict=True))
    return proj("out", out.reshape(b, t, heads * d))


def rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def masks(b, h, t, s):
    rng = np.random.default_rng(1)
    padding = np.ones((b, 1, s), bool)
    padding[0, 0, s // 2 :] = False
    full = rng.random((b, t, s)) < 0.6
    full[0, 1] = False  # a fully masked row
    return {
        "none": None,
        "padding": padding,
        "full": full,
        "shared": rng.random((t, s)) < 0.6,
        "per_head": rng.random((b, h, t, s)) < 0.6,
    }


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("mask_kind", ["none", "padding", "full", "shared", "per_head"])
@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_matches_numpy(impl, heads, kv_heads, mask_kind, causal):
    b, t, width = 2, 5, 8
    layer = fl.multi_head_attention(
        heads, num_kv_heads=kv_heads, is_causal=causal, implementation=impl,
        b_init=jax.nn.initializers.normal(0.5),
    )  # fmt: skip
    x = rand((b, t, width))
    mask = masks(b, heads, t, t)[mask_kind]
    params, state = layer.init(KEY, x)
    y, _ = layer.apply(params, state, x, None, mask)
    expected = numpy_attention(params, x, x, mask, heads, kv_heads, causal)
    np.testing.assert_allclose(y, expected, **REF_TOL)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask_kind", ["none", "padding", "full", "per_head"])
def test_cross_attention_matches_numpy(impl, mask_kind):
    b, t, s, heads = 2, 3, 6, 2
    layer = fl.multi_head_attention(heads, head_features=3, num_kv_heads=1, out_features=5,
                                    implementation=impl)  # fmt: skip
    q, kv = rand((b, t, 4), 1), rand((b, s, 7), 2)
    mask = masks(b, heads, t, s)[mask_kind]
    params, state = layer.init(KEY, q, kv)
    assert params["query"]["w"].shape == (4, 6)
    assert params["key"]["w"].shape == params["value"]["w"].shape == (7, 3)
    assert params["out"]["w"].shape == (6, 5)
    y, _ = layer.apply(params, state, q, kv, mask)
    assert y.shape == (b, t, 5)
    np.testing.assert_allclose(y, numpy_attention(params, q, kv, mask, heads, 1, False), **REF_TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_masked_rows_give_zeros_and_finite_grads(impl):
    layer = fl.multi_head_attention(2, implementation=impl, use_bias=False)
    x = rand((2, 4, 4))
    mask = np.ones((2, 4, 4), bool)
    mask[1, 2] = False  # row 2 of example 1 sees no key
    mask[0] = False  # example 0 sees nothing at all
    params, state = layer.init(KEY, x)
    y, _ = layer.apply(params, state, x, None, mask)
    np.testing.assert_array_equal(y[0], 0.0)
    np.testing.assert_array_equal(y[1, 2], 0.0)
    assert np.abs(np.asarray(y[1, 1])).sum() > 0

    def loss(p, x):
        return jnp.sum(layer.apply(p, state, x, None, mask)[0] ** 2)

    gp, gx = jax.grad(loss, argnums=(0, 1))(params, x)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(gp))
    assert np.isfinite(gx).all()
    np.testing.assert_array_equal(gx[0], 0.0)  # no path from fully masked outputs


@pytest.mark.parametrize("impl", IMPLS)
def test_permutation_equivariance(impl):
    layer = fl.multi_head_attention(2, num_kv_heads=1, implementation=impl)
    x = rand((2, 6, 8))
    perm = np.random.default_rng(3).permutation(6)
    params, state = layer.init(KEY, x)
    y, _ = layer.apply(params, state, x)
    y_perm, _ = layer.apply(params, state, x[:, perm])
    np.testing.assert_allclose(y_perm, y[:, perm], **F32_TOL)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rope", [None, 10000.0])
def test_causal_outputs_ignore_the_future(impl, rope):
    layer = fl.multi_head_attention(2, is_causal=True, rope_base=rope, implementation=impl)
    x = rand((1, 7, 8))
    params, state = layer.init(KEY, x)
    y, _ = layer.apply(params, state, x)
    for t in range(7):
        changed = x.copy()
        changed[:, t + 1 :] = rand(changed[:, t + 1 :].shape, seed=t + 10)
        y2, _ = layer.apply(params, state, changed)
        np.testing.assert_allclose(y2[:, : t + 1], y[:, : t + 1], **F32_TOL)
        if t < 6:
            assert not np.allclose(y2[:, t + 1 :], y[:, t + 1 :])


@pytest.mark.parametrize("impl", IMPLS)
def test_padded_keys_have_no_influence(impl):
    layer = fl.multi_head_attention(2, implementation=impl)
    q, kv = rand((2, 3, 8)), rand((2, 5, 8), 1)
    lengths = np.array([3, 5])
    mask = (np.arange(5)[None, :] < lengths[:, None])[:, None, :]  # (batch, 1, kv_len)
    params, state = layer.init(KEY, q, kv)
    y, _ = layer.apply(params, state, q, kv, mask)
    garbage = kv.copy()
    garbage[0, 3:] = 1e3 * rand((2, 8), 7)
    y2, _ = layer.apply(params, state, q, garbage, mask)
    np.testing.assert_allclose(y2, y, rtol=1e-6, atol=1e-6)


def test_causal_and_full_layers_share_params():
    x = rand((1, 4, 4))
    causal = fl.multi_head_attention(2, is_causal=True)
    params, state = causal.init(KEY, x)
    y_causal, _ = causal.apply(params, state, x)
    y_full, _ = fl.multi_head_attention(2).apply(params, state, x)
    np.testing.assert_allclose(y_causal, numpy_attention(params, x, x, None, 2, 2, True), **REF_TOL)
    np.testing.assert_allclose(y_full, numpy_attention(params, x, x, None, 2, 2, False), **REF_TOL)


def test_rotary_scores_depend_only_on_relative_position():
    q, k = rand((1, 1, 1, 8)), rand((1, 1, 1, 8), 1)

    def score(p, r):
        qr = fl.rotary(jnp.asarray(q), jnp.array([p]))
        kr = fl.rotary(jnp.asarray(k), jnp.array([r]))
        return float(jnp.sum(qr * kr))

    assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)
    assert score(0, 0) == pytest.approx(float(np.sum(q * k)), rel=1e-6)


@pytest.mark.parametrize("rope", [None, 10000.0])
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_cached_decoding_equals_full_causal_pass(rope, kv_heads):
    full = fl.multi_head_attention(2, num_kv_heads=kv_heads, is_causal=True, rope_base=rope)
    dec = fl.multi_head_attention(2, num_kv_heads=kv_heads, is_causal=True, rope_base=rope,
                                  decode=True)  # fmt: skip
    x = rand((2, 7, 8))
    params, state = full.init(KEY, x)
    y, _ = full.apply(params, state, x)
    cache = fl.init_cache(dec, batch=2, max_len=9, features=8)
    assert isinstance(cache, fl.KVCache)
    assert cache.key.shape == (2, 9, kv_heads, 4)
    step = jax.jit(dec.apply)
    out, cache = step(params, cache, x[:, :3])  # a prompt of 3 positions
    outs = [out]
    for t in range(3, 7):  # then one position per call
        out, cache = step(params, cache, x[:, t : t + 1])
        outs.append(out)
    assert int(cache.index) == 7
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), y, **F32_TOL)


def test_cache_overflow_raises_eagerly_and_statically():
    dec = fl.multi_head_attention(2, is_causal=True, decode=True)
    x = rand((1, 3, 4))
    params, _ = dec.init(KEY, x)
    cache = fl.init_cache(dec, batch=1, max_len=3, features=4)
    _, cache = dec.apply(params, cache, x[:, :2])
    with pytest.raises(ValueError) as err:
        dec.apply(params, cache, x[:, :2])
    assert str(err.value) == (
        "multi_head_attention(2): the cache overflows: 2 positions are filled and 2 more do "
        "not fit in max_len=3. Make the cache longer (fl.init_cache(..., max_len=...)) or "
        "start a new one."
    )
    with pytest.raises(ValueError, match=r"^multi_head_attention\(2\): 4 new positions overflow "
                                         r"the maximum length 3\."):  # fmt: skip
        jax.jit(dec.apply)(params, cache, rand((1, 4, 4)))


def test_cache_overflow_under_jit_gives_nan():
    dec = fl.multi_head_attention(2, is_causal=True, decode=True)
    x = rand((1, 2, 4))
    params, _ = dec.init(KEY, x)
    cache = fl.init_cache(dec, batch=1, max_len=2, features=4)
    step = jax.jit(dec.apply)
    y, cache = step(params, cache, x)
    assert np.isfinite(y).all()
    y, cache = step(params, cache, x[:, :1])  # the traced index cannot raise
    assert np.isnan(y).all()


def test_cache_batch_mismatch():
    dec = fl.multi_head_attention(2, decode=True)
    params, _ = dec.init(KEY, rand((1, 2, 4)))
    cache = fl.init_cache(dec, batch=3, max_len=2, features=4)
    with pytest.raises(ValueError, match=r"the cache holds batch 3, the input has 1"):
        dec.apply(params, cache, rand((1, 1, 4)))


def test_attention_dropout_train_and_eval():
    layer = fl.multi_head_attention(2, dropout_rate=0.5)
    x = rand((1, 6, 4))
    params, state = layer.init(KEY, x)
    y_eval, _ = layer.apply(params, state, x)
    y_eval2, _ = layer.apply(params, state, x, key=jax.random.key(1))
    np.testing.assert_array_equal(y_eval, y_eval2)
    y_a, _ = layer.apply(params, state, x, key=jax.random.key(1), train=True)
    y_b, _ = layer.apply(params, state, x, key=jax.random.key(2), train=True)
    assert not np.allclose(y_a, y_eval) and not np.allclose(y_a, y_b)
    with pytest.raises(ValueError) as err:
        layer.apply(params, state, x, train=True)
    assert str(err.value) == (
        "multi_head_attention(2): dropout_rate=0.5 in training needs a key: "
        "apply(..., key=jax.random.key(0), train=True)."
    )


def test_bf16_compute_over_f32_params():
    layer = fl.multi_head_attention(2, dtype=jnp.bfloat16, is_causal=True)
    x = rand((2, 5, 8))
    params, state = layer.init(KEY, x)
    assert params["query"]["w"].dtype == jnp.float32
    y, _ = layer.apply(params, state, x)
    assert y.dtype == jnp.bfloat16
    y32, _ = fl.multi_head_attention(2, is_causal=True).apply(params, state, x)
    np.testing.assert_allclose(y.astype(np.float32), y32, rtol=5e-2, atol=5e-2)  # bf16: 8 bits


# --- errors -----------------------------------------------------------------------------------


def test_width_not_divisible_by_heads():
    with pytest.raises(ValueError) as err:
        fl.multi_head_attention(3).init(KEY, rand((1, 2, 8)))
    assert str(err.value) == (
        "multi_head_attention(3): the query width 8 is not divisible by num_heads=3. "
        "Pick num_heads dividing 8, or pass head_features explicitly."
    )
    params, _ = fl.multi_head_attention(3, head_features=2).init(KEY, rand((1, 2, 8)))
    assert params["query"]["w"].shape == (8, 6)


def test_heads_not_divisible_by_kv_heads():
    with pytest.raises(ValueError) as err:
        fl.multi_head_attention(4, num_kv_heads=3)
    assert str(err.value) == (
        "multi_head_attention(4): num_heads=4 is not divisible by num_kv_heads=3; each "
        "key/value head serves num_heads / num_kv_heads query heads. Pick num_kv_heads "
        "dividing 4, e.g. 1 (multi-query) or 4 (standard)."
    )


@pytest.mark.parametrize("shape", [(2, 3, 4), (5, 3), (2, 3, 3, 5), (1, 1, 1, 3, 5)])
def test_mask_that_does_not_broadcast(shape):
    layer = fl.multi_head_attention(2)
    q, kv = rand((2, 3, 4)), rand((2, 5, 4))
    params, state = layer.init(KEY, q, kv)
    with pytest.raises(ValueError) as err:
        layer.apply(params, state, q, kv, np.ones(shape, bool))
    assert str(err.value) == (
        f"multi_head_attention(2) dot_product_attention: mask shape {shape} does not "
        f"broadcast to (batch, q_len, "
        f"kv_len) = (2, 3, 5). Pass a boolean mask of shape (batch, q_len, kv_len), "
        f"(batch, 1, kv_len) for key padding, or (q_len, kv_len)."
    )


def test_float_mask_is_a_type_error():
    layer = fl.multi_head_attention(2)
    x = rand((1, 3, 4))
    params, state = layer.init(KEY, x)
    with pytest.raises(TypeError, match=r"mask has dtype float32, expected bool"):
        layer.apply(params, state, x, None, np.ones((1, 3, 3), np.float32))


def test_input_rank_error_names_the_path():
    model = fl.serial(fl.multi_head_attention(2))
    with pytest.raises(ValueError) as err:
        model.init(KEY, rand((3, 4)))
    assert str(err.value) == (
        "serial[0] multi_head_attention(2): q_in has shape (3, 4), expected (batch, time, "
        "features). Add a batch axis, e.g. x[None]."
    )


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"num_heads must be a positive int, got 0"):
        fl.multi_head_attention(0)
    with pytest.raises(ValueError, match=r"implementation must be one of"):
        fl.multi_head_attention(2, implementation="flash")
    with pytest.raises(ValueError, match=r"rope_base needs an even head_features, got 3"):
        fl.multi_head_attention(2, rope_base=1e4).init(KEY, rand((1, 2, 6)))


def test_input_width_differs_from_params():
    layer = fl.multi_head_attention(2)
    params, state = layer.init(KEY, rand((1, 3, 4)))
    with pytest.raises(ValueError) as err:
        layer.apply(params, state, rand((1, 3, 6)), rand((1, 3, 4)))
    assert str(err.value) == (
        "multi_head_attention(2)[query] dense(4): input has last dimension 6, params "
        "expect 4. Feed inputs of shape (..., 4) or re-init the params on this input."
    )


def test_renamed_keywords_name_the_new_ones():
    with pytest.raises(TypeError) as err:
        fl.multi_head_attention(2, head_dim=4)
    assert str(err.value) == (
        "multi_head_attention() got the keyword head_dim=, renamed to head_features= in fundl 0.2."
    )
    with pytest.raises(TypeError, match=r"dropout=, renamed to dropout_rate= in fundl 0\.2\.$"):
        fl.multi_head_attention(2, dropout=0.1)
    with pytest.raises(TypeError, match=r"^multi_head_attention\(\) got an unexpected keyword "
                                        r"argument 'num_head'$"):  # fmt: skip
        fl.multi_head_attention(2, num_head=4)
