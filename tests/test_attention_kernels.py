"""dot_product_attention: numbers against a NumPy loop for masks, causality, offsets, lengths,
grouped-query heads and dropout; its errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fundl as fl

pytestmark = pytest.mark.numerics  # .ci/run reruns these under a second XLA CPU configuration

IMPLS = ["explicit", "xla"]
# float32 kernels against a float64 loop: softmax sums of a few terms of size ~1, so the
# outputs agree to a few float32 ulps of their size; 1e-5 leaves room for reordered sums.
TOL = {"rtol": 1e-5, "atol": 1e-5}


def numpy_attention(q, k, v, allowed, scale=None):
    """out[b, i, h] = sum_j softmax_j(scale q[b, i, h] . k[b, j, g(h)]) v[b, j, g(h)] over the
    allowed j (loops, float64); rows with no allowed key are zeros.

    ``allowed`` is a boolean (batch, heads, q_len, kv_len) array, or None for all.
    """
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, d = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    scale = 1 / np.sqrt(d) if scale is None else scale
    allowed = np.ones((b, h, t, s), bool) if allowed is None else allowed
    out = np.zeros((b, t, h, d))
    for bi in range(b):
        for hi in range(h):
            g = hi // (h // kv_heads)  # the key/value head this query head shares
            for i in range(t):
                js = [j for j in range(s) if allowed[bi, hi, i, j]]
                if not js:
                    continue
                logits = np.array([scale * q[bi, i, hi] @ k[bi, j, g] for j in js])
                w = np.exp(logits - logits.max())
                w /= w.sum()
                out[bi, i, hi] = sum(wj * v[bi, j, g] for wj, j in zip(w, js, strict=True))
    return out


def allowed_of(b, h, t, s, mask=None, causal=False, offset=0, lengths=None):
    """What may be attended, (b, h, t, s), built element by element from the documented rules."""
    allowed = np.ones((b, h, t, s), bool)
    if mask is not None:
        m = np.asarray(mask)
        m = m.reshape((1,) * (3 - m.ndim) + m.shape)[:, None] if m.ndim <= 3 else m
        allowed &= np.broadcast_to(m, (b, h, t, s))
    for bi, hi, i, j in np.ndindex(b, h, t, s):
        if causal and j > i + offset:
            allowed[bi, hi, i, j] = False
        if lengths is not None and j >= np.broadcast_to(lengths, (b,))[bi]:
            allowed[bi, hi, i, j] = False
    return allowed


def rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def qkv(b, t, s, h, kv_heads, d, seed=0):
    return (
        rand((b, t, h, d), seed),
        rand((b, s, kv_heads, d), seed + 1),
        rand((b, s, kv_heads, d), seed + 2),
    )


rng = np.random.default_rng(1)
# (name, heads, kv_heads, t, s, mask, is_causal, kv_lengths): b = 2, head_features = 4
SCENARIOS = [
    ("plain", 2, 2, 3, 5, None, False, None),
    ("causal", 4, 2, 5, 5, None, True, None),
    ("causal, q_len < kv_len", 2, 1, 3, 5, None, True, None),
    ("key padding", 4, 4, 3, 5, np.array([[[1, 1, 1, 0, 0]], [[1, 1, 1, 1, 1]]], bool),
     False, None),
    ("per example, a fully masked row", 2, 2, 3, 4,
     np.concatenate([np.zeros((1, 3, 4), bool), rng.random((1, 3, 4)) < 0.6]), False, None),
    ("per head and causal", 4, 1, 4, 4, rng.random((2, 4, 4, 4)) < 0.6, True, None),
    ("shared mask and lengths", 2, 2, 3, 5, rng.random((3, 5)) < 0.7, False,
     np.array([2, 5], np.int32)),
    ("causal and a zero length", 2, 1, 3, 3, None, True, np.array([0, 2], np.int32)),
]  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_matches_numpy(impl, scenario):
    _, h, kv_heads, t, s, mask, causal, lengths = scenario
    q, k, v = qkv(2, t, s, h, kv_heads, 4)
    out = fl.dot_product_attention(q, k, v, mask=mask, is_causal=causal, kv_lengths=lengths,
                                   implementation=impl)  # fmt: skip
    assert out.shape == q.shape and out.dtype == jnp.float32
    allowed = allowed_of(2, h, t, s, mask, causal, 0, lengths)
    np.testing.assert_allclose(out, numpy_attention(q, k, v, allowed), **TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_traced_offset_and_lengths_as_a_cache_uses_them(impl):
    # queries at positions 3, 4 of a cache of 6 keys, the first 5 of them filled
    q, k, v = qkv(2, 2, 6, 2, 1, 4, seed=3)

    @jax.jit
    def attend(offset):
        return fl.dot_product_attention(q, k, v, is_causal=True, query_offset=offset,
                                        kv_lengths=offset + 2, implementation=impl)  # fmt: skip

    out = attend(jnp.asarray(3, jnp.int32))
    allowed = allowed_of(2, 2, 2, 6, causal=True, offset=3, lengths=5)
    np.testing.assert_allclose(out, numpy_attention(q, k, v, allowed), **TOL)
    static = fl.dot_product_attention(q, k, v, is_causal=True, query_offset=3, kv_lengths=5,
                                      implementation=impl)  # fmt: skip
    np.testing.assert_allclose(static, out, **TOL)


def test_scale():
    q, k, v = qkv(1, 3, 3, 2, 2, 4)
    out = fl.dot_product_attention(q, k, v, scale=0.1)
    np.testing.assert_allclose(out, numpy_attention(q, k, v, None, scale=0.1), **TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_without_keys_are_zero_with_finite_grads(impl):
    q, k, v = qkv(2, 3, 4, 2, 2, 4)
    mask = np.ones((2, 3, 4), bool)
    mask[0] = False  # example 0 sees nothing
    mask[1, 1] = False  # row 1 of example 1 sees nothing

    def loss(q, k, v):
        out = fl.dot_product_attention(q, k, v, mask=mask, implementation=impl)
        return jnp.sum(out**2), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_array_equal(out[1, 1], 0.0)
    assert all(np.isfinite(g).all() for g in grads)
    np.testing.assert_array_equal(grads[0][0], 0.0)  # no path from the masked rows


def test_dropout_zeroes_or_rescales_each_weight():
    # With one-hot values (v[j] = e_j), the output row is the row of attention weights, so
    # each entry is 0 (dropped) or its weight / (1 - rate) (kept).
    b, t, s, rate = 2, 3, 4, 0.5
    q, k, _ = qkv(b, t, s, 1, 1, s)
    v = np.broadcast_to(np.eye(s, dtype=np.float32)[None, :, None, :], (b, s, 1, s))
    out = np.asarray(fl.dot_product_attention(q, k, v, dropout_rate=rate,
                                              key=jax.random.key(1)))  # fmt: skip
    weights = numpy_attention(q, k, v, None)
    kept = out != 0
    assert kept.any() and not kept.all()
    np.testing.assert_allclose(out[kept], weights[kept] / (1 - rate), **TOL)
    again = fl.dot_product_attention(q, k, v, dropout_rate=rate, key=jax.random.key(1))
    np.testing.assert_array_equal(again, out)  # the key decides the mask


def test_bf16_inputs_give_bf16_outputs():
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in qkv(1, 3, 3, 2, 2, 8))
    out = fl.dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == jnp.bfloat16
    allowed = allowed_of(1, 2, 3, 3, causal=True)
    # bfloat16 inputs and output: 8 bits of mantissa, a relative error of ~2**-8 per value
    np.testing.assert_allclose(out.astype(np.float32), numpy_attention(q, k, v, allowed),
                               rtol=2e-2, atol=2e-2)  # fmt: skip


# --- errors -----------------------------------------------------------------------------------


def test_shapes_that_disagree():
    q, k, v = qkv(1, 3, 3, 2, 2, 4)
    with pytest.raises(ValueError) as err:
        fl.dot_product_attention(q, k[..., :3], v[..., :3])
    assert str(err.value) == (
        "dot_product_attention: q, k, v have shapes (1, 3, 2, 4), (1, 3, 2, 3), (1, 3, 2, 3); "
        "expected q (batch, q_len, heads, head_features) and k, v both (batch, kv_len, "
        "kv_heads, head_features), with the same batch and head_features."
    )
    with pytest.raises(
        ValueError, match=r"^dot_product_attention: q, k, v have shapes \(3, 2, 4\)"
    ):
        fl.dot_product_attention(q[0], k, v)


def test_heads_not_divisible_by_kv_heads():
    q, k, v = qkv(1, 3, 3, 3, 2, 4)
    with pytest.raises(ValueError) as err:
        fl.dot_product_attention(q, k, v)
    assert str(err.value) == (
        "dot_product_attention: q has 3 heads, k and v 2; kv_heads must divide heads (each "
        "key/value head serves heads / kv_heads query heads)."
    )


def test_dropout_needs_a_key_and_a_rate_below_one():
    q, k, v = qkv(1, 3, 3, 2, 2, 4)
    with pytest.raises(ValueError) as err:
        fl.dot_product_attention(q, k, v, dropout_rate=0.1)
    assert str(err.value) == (
        "dot_product_attention: dropout_rate=0.1 needs a key: dot_product_attention(..., "
        "key=jax.random.key(0)); pass dropout_rate=0.0 in inference."
    )
    with pytest.raises(ValueError, match=r"dropout_rate must be in \[0, 1\), got 1.0"):
        fl.dot_product_attention(q, k, v, dropout_rate=1.0, key=jax.random.key(0))


def test_bad_implementation_mask_and_lengths():
    q, k, v = qkv(2, 3, 3, 2, 2, 4)
    with pytest.raises(ValueError, match=r"implementation must be one of \('explicit', 'xla', "
                                         r"'cudnn'\) or None, got 'flash'"):  # fmt: skip
        fl.dot_product_attention(q, k, v, implementation="flash")
    with pytest.raises(TypeError, match=r"^dot_product_attention: mask has dtype float32, "):
        fl.dot_product_attention(q, k, v, mask=np.ones((3, 3), np.float32))
    with pytest.raises(ValueError, match=r"^dot_product_attention: mask shape \(3, 2\) does "):
        fl.dot_product_attention(q, k, v, mask=np.ones((3, 2), bool))
    with pytest.raises(ValueError) as err:
        fl.dot_product_attention(q, k, v, kv_lengths=np.ones((2, 1), np.int32))
    assert str(err.value) == (
        "dot_product_attention: kv_lengths has shape (2, 1) and dtype int32; expected "
        "integers of shape () or (batch,)."
    )
