r"""Multi-head attention with masks, grouped-query heads, RoPE and a KV cache for decoding.

Each of :math:`H` heads compares queries with keys and mixes values:

.. math::
    \mathrm{head}_h = \mathrm{softmax}\!\left(\frac{Q_h K_{g(h)}^\top}{\sqrt{D}} + M\right)
    V_{g(h)}, \qquad
    y = \mathrm{concat}(\mathrm{head}_1, \ldots, \mathrm{head}_H)\, W_O + b_O

with :math:`Q = x_q W_Q + b_Q`, :math:`K = x_{kv} W_K + b_K`, :math:`V = x_{kv} W_V + b_V`,
:math:`M` :math:`0` where attending is allowed and :math:`-\infty` elsewhere, and
:math:`g(h) = \lfloor h / (H / H_{kv}) \rfloor` the key/value head that query head
:math:`h` shares (grouped-query attention; :math:`H_{kv} = 1` is multi-query attention).

Which kernel runs (``implementation=None`` picks per backend and dtype):

- ``"cudnn"``: cuDNN flash attention via ``jax.nn.dot_product_attention`` — chosen on GPU for
  bfloat16/float16 with ``head_dim`` a multiple of 8 up to 128, no mask array (causal is
  fine) and no decoding cache.
- ``"xla"``: ``jax.nn.dot_product_attention``'s XLA path — every other GPU/TPU case.
- ``"explicit"``: an einsum-softmax-einsum written here — chosen on CPU, where it measured
  faster than the XLA path of ``jax.nn.dot_product_attention`` (``benchmarks/attention_step.py``),
  and always when attention-weight dropout is active (``dropout > 0`` and ``train=True``),
  which the fused call does not support.

Whatever the kernel, a query row whose keys are all masked out gives zeros (not the mean
of the values, not NaN), in the outputs and in the gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.nn import initializers

from fundl.core import Layer, check_floating, named
from fundl.dense import default_w_init, dense
from fundl.embedding import _at_least_f32, _check_room, rotary

__all__ = ["KVCache", "multi_head_attention", "init_cache", "IMPLEMENTATIONS"]

Initializer = Callable[..., jax.Array]

IMPLEMENTATIONS = ("explicit", "xla", "cudnn")
"""The values of ``multi_head_attention(implementation=...)`` (``None`` chooses)."""


class KVCache(NamedTuple):
    """The state of a ``decode=True`` attention layer: the keys and values seen so far.

    Attributes:
        key: ``(batch, max_len, num_kv_heads, head_dim)``, rotated by RoPE if used.
        value: ``(batch, max_len, num_kv_heads, head_dim)``.
        index: ``()`` int32, the number of positions filled (the next position to write).
    """

    key: jax.Array
    value: jax.Array
    index: jax.Array


def init_cache(
    layer: Layer,
    batch: int,
    max_len: int,
    *,
    features: int | None = None,
    dtype: Any = None,
) -> Any:
    """The empty decoding state of a model built with ``decode=True`` layers.

    Runs ``layer.init`` on an input of shape ``(batch, max_len)`` (integer token ids, for a
    language model that starts with :func:`fundl.embedding`) or ``(batch, max_len,
    features)`` (float vectors, for an attention layer or block), under ``jit`` so that the
    params ``init`` would build are never computed. Every :class:`KVCache` in the state
    starts empty (``index`` 0); feed the prompt, then one token per call, threading the
    returned state.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> attn = fl.multi_head_attention(2, is_causal=True, decode=True)
        >>> params, _ = attn.init(jax.random.key(0), jnp.zeros((1, 4, 8)))
        >>> cache = fl.init_cache(attn, batch=1, max_len=4, features=8)
        >>> cache.key.shape, int(cache.index)
        ((1, 4, 2, 4), 0)
        >>> y, cache = attn.apply(params, cache, jnp.ones((1, 1, 8)))  # one position
        >>> int(cache.index)
        1

    Args:
        layer: the decoding model (its attention layers built with ``decode=True``).
        batch: the number of sequences decoded together.
        max_len: the most positions the cache holds (prompt plus generated tokens).
        features: ``None`` for integer-id inputs ``(batch, max_len)``; else the feature size
            of float inputs ``(batch, max_len, features)``.
        dtype: the input dtype (default int32 for ids, float32 for features).

    Returns:
        The state pytree, ready for ``layer.apply``.
    """
    if features is None:
        spec = jax.ShapeDtypeStruct((batch, max_len), dtype or jnp.int32)
    else:
        spec = jax.ShapeDtypeStruct((batch, max_len, features), dtype or jnp.float32)
    return jax.jit(lambda key: layer.init(key, spec)[1])(jax.random.key(0))


def _choose(implementation, dtype, head_dim, has_mask_array, decode, dropout_active):
    if dropout_active:
        return "explicit"
    if implementation is not None:
        return implementation
    backend = jax.default_backend()
    if backend == "cpu":
        return "explicit"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    cudnn_ok = head_dim % 8 == 0 and head_dim <= 128 and not has_mask_array and not decode
    return "cudnn" if backend in ("gpu", "cuda") and half and cudnn_ok else "xla"


def _explicit_attention(q, k, v, mask, is_causal, scale, drop_rate, drop_key):
    """softmax(q k^T * scale, masked) v with grouped heads and an f32 (or wider) softmax.

    q: (B, T, H, D); k, v: (B, S, K, D); mask: None or bool (b, h, T, S), b in {1, B},
    h in {1, H}; is_causal only without a mask. Returns (B, T, H, D).
    """
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = h // kv
    ltype = _at_least_f32(q.dtype)
    q = q * jnp.asarray(scale, q.dtype)  # scale (T, D) queries, not (T, S) logits: cheaper
    if g == 1:  # plain multi-head: 4-d einsums (measured faster on CPU than the 5-d form)
        logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=ltype)
        causal_shape, grouped_shape = (1, 1, t, s), (1, h, t, s)
    else:  # grouped-query: [B, T, K, G, D] against [B, S, K, D], no repeated keys
        qg = q.reshape(b, t, kv, g, d)
        logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=ltype)
        causal_shape, grouped_shape = (1, 1, 1, t, s), (1, kv, g, t, s)
    if is_causal:
        mask = jnp.tril(jnp.ones((t, s), bool)).reshape(causal_shape)
    elif mask is not None:  # (b, h, T, S), h in {1, H} -> the logits' layout
        heads = grouped_shape[1:-2] if mask.shape[1] == h else (1,) * (len(grouped_shape) - 3)
        mask = mask.reshape(mask.shape[0], *heads, t, s)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.asarray(jnp.finfo(ltype).min, ltype))
    probs = jax.nn.softmax(logits, axis=-1)
    if drop_rate > 0.0:
        keep = jax.random.bernoulli(drop_key, 1.0 - drop_rate, probs.shape)
        probs = jnp.where(keep, probs / jnp.asarray(1.0 - drop_rate, ltype), 0.0)
    probs = probs.astype(v.dtype)
    if g == 1:
        return jnp.einsum("bhts,bshd->bthd", probs, v)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)


def multi_head_attention(
    num_heads: int,
    head_dim: int | None = None,
    num_kv_heads: int | None = None,
    out_features: int | None = None,
    *,
    use_bias: bool = True,
    dropout: float = 0.0,
    is_causal: bool = False,
    rope_base: float | None = None,
    decode: bool = False,
    implementation: str | None = None,
    w_init: Initializer = default_w_init,
    b_init: Initializer = initializers.zeros,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype | None = None,
) -> Layer:
    r"""Multi-head (self- or cross-) attention, with grouped-query heads and a KV cache.

    ``apply(params, state, q_in, kv_in=None, mask=None, *, is_causal=None, key=None,
    train=False)``: self-attention when ``kv_in`` is ``None``, cross-attention otherwise.
    ``mask`` and ``is_causal`` are the layer's extra inputs beyond the contract's
    ``(params, state, *inputs, key, train)``; :func:`fundl.serial` passes the first layer
    all its inputs, so ``serial(attention, ...).apply(p, s, x, None, mask)`` works.

    Params (``H`` heads, ``K`` key/value heads, ``D`` head_dim), one :func:`fundl.dense`
    each, so they map one to one to PyTorch's ``nn.MultiheadAttention`` projections
    (``fundl.interop``)::

        {"query": {"w": (d_q, H*D), "b": (H*D,)},
         "key":   {"w": (d_kv, K*D), "b": (K*D,)},
         "value": {"w": (d_kv, K*D), "b": (K*D,)},
         "out":   {"w": (H*D, d_out), "b": (d_out,)}}

    State: ``()``, or a :class:`KVCache` when ``decode=True``.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> attn = fl.multi_head_attention(4, is_causal=True)
        >>> x = jnp.ones((2, 5, 16))  # (batch, time, features)
        >>> params, state = attn.init(jax.random.key(0), x)
        >>> y, state = attn.apply(params, state, x)
        >>> y.shape
        (2, 5, 16)

    Args:
        num_heads: :math:`H`, the number of query heads.
        head_dim: :math:`D`; default ``d_q // num_heads`` (``d_q`` must then be divisible).
        num_kv_heads: :math:`H_{kv}`, the number of key/value heads (default ``num_heads``;
            1 is multi-query attention); must divide ``num_heads``.
        out_features: the output size (default ``d_q``, the query input's width).
        use_bias: biases on the four projections.
        dropout: the rate of dropout on the attention weights in training (needs a key).
        is_causal: position ``i`` attends only to keys ``j <= i`` (top-left aligned when
            ``q_len != kv_len``; offset by the cache index when decoding). ``apply``'s
            ``is_causal`` overrides it per call.
        rope_base: if set, rotary position embeddings with this base (e.g. 10000.0) are
            applied to queries and keys (:func:`fundl.rotary`); self-attention only.
        decode: keep a :class:`KVCache` in the state for incremental decoding. ``init``'s
            input ``(batch, max_len, d)`` sets the cache size; see :func:`init_cache`. Each
            call appends its keys and values at the cache index, attends over the filled
            part, and advances the index. Overflowing ``max_len`` raises a ``ValueError``
            when the index is concrete (eager calls, or more new positions than
            ``max_len``); under ``jit`` the index is traced and an overflowing call returns
            NaN outputs instead.
        implementation: ``"explicit"``, ``"xla"`` or ``"cudnn"``; ``None`` picks per backend
            and dtype (see the module docstring).
        w_init: initializer of the projection weights (default glorot uniform).
        b_init: initializer of the biases (default zeros).
        dtype: the compute dtype (e.g. ``jnp.bfloat16``); ``None`` computes in the input's.
            Softmax runs in float32 (or wider) whatever it is.
        param_dtype: the storage dtype of the params (default float32, float64 with x64).

    Returns:
        A :class:`~fundl.Layer` mapping ``q_in (batch, q_len, d_q)``, ``kv_in (batch, kv_len,
        d_kv)`` and a boolean ``mask`` broadcastable to ``(batch, q_len, kv_len)`` (``True``
        = may attend; a 4-d ``(batch, heads, q_len, kv_len)`` mask is also accepted) to
        ``(batch, q_len, out_features)``.
    """
    ctor = "multi_head_attention(num_heads, head_dim, num_kv_heads, out_features)"
    for arg, value in (("num_heads", num_heads), ("head_dim", head_dim),
                       ("num_kv_heads", num_kv_heads), ("out_features", out_features)):  # fmt: skip
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{ctor}: {arg} must be a positive int, got {value!r}.")
    kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    name = f"multi_head_attention({num_heads})"
    if num_heads % kv_heads:
        raise ValueError(
            f"{name}: num_heads={num_heads} is not divisible by num_kv_heads={kv_heads}; each "
            f"key/value head serves num_heads / num_kv_heads query heads. Pick num_kv_heads "
            f"dividing {num_heads}, e.g. 1 (multi-query) or {num_heads} (standard)."
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout!r}.")
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"{name}: implementation must be one of {IMPLEMENTATIONS} or None, got "
            f"{implementation!r}."
        )
    default_causal = is_causal

    def dims(q_in):
        d_q = q_in.shape[-1]
        if head_dim is None and d_q % num_heads:
            raise ValueError(
                f"{name}: the query width {d_q} is not divisible by num_heads={num_heads}. "
                f"Pick num_heads dividing {d_q}, or pass head_dim explicitly."
            )
        hd = head_dim or d_q // num_heads
        if rope_base is not None and hd % 2:
            raise ValueError(f"{name}: rope_base needs an even head_dim, got {hd}.")
        return hd, out_features or d_q

    def projections(q_in):
        hd, d_out = dims(q_in)
        kw = {"use_bias": use_bias, "w_init": w_init, "b_init": b_init, "dtype": dtype,
              "param_dtype": param_dtype}  # fmt: skip
        return hd, {
            "query": dense(num_heads * hd, **kw),
            "key": dense(kv_heads * hd, **kw),
            "value": dense(kv_heads * hd, **kw),
            "out": dense(d_out, **kw),
        }

    def check_inputs(q_in, kv_in):
        for what, x in (("q_in", q_in), ("kv_in", kv_in)):
            if x is None:
                continue
            if jnp.ndim(x) != 3:
                raise ValueError(
                    f"{name}: {what} has shape {jnp.shape(x)}, expected (batch, time, "
                    f"features). Add a batch axis, e.g. x[None]."
                )
            check_floating(name, x)
        if kv_in is not None:
            if kv_in.shape[0] != q_in.shape[0]:
                raise ValueError(
                    f"{name}: q_in has batch {q_in.shape[0]} but kv_in has {kv_in.shape[0]}."
                )
            if rope_base is not None:
                raise ValueError(f"{name}: rope_base applies to self-attention; got kv_in.")
            if decode:
                raise ValueError(
                    f"{name}: decode=True caches self-attention keys and values; for "
                    f"cross-attention pass kv_in to a layer built with decode=False."
                )

    def init(key, q_in, kv_in=None, mask=None):
        del mask
        check_inputs(q_in, kv_in)
        hd, layers = projections(q_in)
        keys = jax.random.split(key, 4)
        kv_spec = q_in if kv_in is None else kv_in
        hidden = jax.ShapeDtypeStruct((*q_in.shape[:-1], num_heads * hd), q_in.dtype)
        ins = {"query": q_in, "key": kv_spec, "value": kv_spec, "out": hidden}
        params = {
            n: lay.init(k, ins[n])[0] for (n, lay), k in zip(layers.items(), keys, strict=True)
        }
        if not decode:
            return params, ()
        batch, max_len = q_in.shape[:2]
        cdtype = dtype or q_in.dtype
        empty = jnp.zeros((batch, max_len, kv_heads, hd), cdtype)
        return params, KVCache(empty, empty, jnp.zeros((), jnp.int32))

    def prepare_mask(mask, b, t, s):
        """bool (…) broadcastable to (b, t, s) or (b, H, t, s) -> 4-d (b', h', t, s)."""
        if mask is None:
            return None
        if not jnp.issubdtype(jnp.dtype(mask.dtype), jnp.bool_):
            raise TypeError(
                f"{name}: mask has dtype {jnp.dtype(mask.dtype)}, expected bool (True = may "
                f"attend). Convert it, e.g. mask.astype(bool) or lengths[:, None] > positions."
            )
        shape = tuple(mask.shape)
        target = (b, t, s) if len(shape) <= 3 else (b, num_heads, t, s)
        try:
            ok = len(shape) <= 4 and np.broadcast_shapes(shape, target) == target
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"{name}: mask shape {shape} does not broadcast to (batch, q_len, kv_len) = "
                f"{(b, t, s)}. Pass a boolean mask of shape (batch, q_len, kv_len), "
                f"(batch, 1, kv_len) for key padding, or (q_len, kv_len)."
            )
        if len(shape) <= 3:
            shape3 = (1,) * (3 - len(shape)) + shape
            mask = mask.reshape(shape3[0], 1, shape3[1], shape3[2])
        mb, mh = mask.shape[:2]
        return jnp.broadcast_to(mask, (mb, mh, t, s))

    def apply(params, state, q_in, kv_in=None, mask=None, *, is_causal=None, key=None,
              train=False):  # fmt: skip
        check_inputs(q_in, kv_in)
        causal = default_causal if is_causal is None else is_causal
        hd, layers = projections(q_in)
        x_kv = q_in if kv_in is None else kv_in
        b, t = q_in.shape[:2]
        del layers  # the projections are computed here, head-shaped (below)
        cdtype = dtype or q_in.dtype

        def project(which, x, heads):
            """x (B, T, d) @ w (d, heads * D), as (d, heads, D), -> (B, T, heads, D).

            Contracting straight into the head layout (as Flax's DenseGeneral) measured ~9%
            faster per train step on CPU than a matmul followed by a reshape.
            """
            p = params[which]
            if x.shape[-1] != p["w"].shape[0]:
                raise ValueError(
                    f"{name}: the {which} input has last dimension {x.shape[-1]}, params "
                    f"expect {p['w'].shape[0]}. Feed inputs of that width or re-init the params."
                )
            w = p["w"].astype(cdtype).reshape(x.shape[-1], heads, hd)
            y = jnp.einsum("bte,ehd->bthd", x.astype(cdtype), w)
            if use_bias:
                y = y + p["b"].astype(cdtype).reshape(1, 1, heads, hd)
            return y

        q = project("query", q_in, num_heads)  # [B, T, H, D]
        k = project("key", x_kv, kv_heads)  # [B, S, K, D]
        v = project("value", x_kv, kv_heads)
        mask = prepare_mask(mask, b, t, state.key.shape[1] if decode else x_kv.shape[1])
        overflow = None
        if decode:
            cache = state
            if cache.key.shape[0] != b:
                raise ValueError(
                    f"{name}: the cache holds batch {cache.key.shape[0]}, the input has {b}. "
                    f"Create the cache with fl.init_cache(model, batch={b}, max_len=...)."
                )
            max_len, index = cache.key.shape[1], cache.index
            _check_room(name, index, t, max_len)
            positions = index + jnp.arange(t, dtype=index.dtype)
            if rope_base is not None:
                q, k = rotary(q, positions, rope_base), rotary(k, positions, rope_base)
            start = (jnp.zeros((), index.dtype), index, jnp.zeros((), index.dtype),
                     jnp.zeros((), index.dtype))  # fmt: skip
            k = jax.lax.dynamic_update_slice(cache.key, k.astype(cache.key.dtype), start)
            v = jax.lax.dynamic_update_slice(cache.value, v.astype(cache.value.dtype), start)
            state = KVCache(k, v, index + t)
            kpos = jnp.arange(max_len, dtype=index.dtype)[None, :]  # (1, S)
            allowed = kpos <= positions[:, None] if causal else kpos < index + t
            allowed = jnp.broadcast_to(allowed, (t, max_len)).reshape(1, 1, t, max_len)
            mask = allowed if mask is None else mask & allowed
            causal = False  # folded into the mask
            overflow = index + t > max_len
        else:
            if rope_base is not None:
                positions = jnp.arange(t)
                q, k = rotary(q, positions, rope_base), rotary(k, positions, rope_base)
            if causal and mask is not None:  # one mask, so fully masked rows are found below
                s = k.shape[1]
                mask = mask & jnp.tril(jnp.ones((t, s), bool)).reshape(1, 1, t, s)
                causal = False

        drop_active = train and dropout > 0.0
        if drop_active and key is None:
            raise ValueError(
                f"{name}: dropout={dropout} in training needs a key: "
                f"apply(..., key=jax.random.key(0), train=True)."
            )
        how = _choose(implementation, q.dtype, hd, mask is not None, decode, drop_active)
        scale = 1.0 / math.sqrt(hd)
        if how == "explicit":
            out = _explicit_attention(q, k, v, mask, causal, scale,
                                      dropout if drop_active else 0.0, key)  # fmt: skip
        else:
            # jax.nn.dot_product_attention promotes its logits dtype with promote_types
            # (bf16 or f64 against f32), which strict promotion rejects; its result dtype
            # is q's either way, so we run it under the standard rules.
            with jax.numpy_dtype_promotion("standard"):
                out = jax.nn.dot_product_attention(
                    q, k, v, mask=mask, is_causal=causal, scale=scale, implementation=how
                )
        if mask is not None:  # rows with no key to attend to give zeros, not mean(v)
            any_key = mask.any(axis=-1)  # (b', h', T)
            any_key = jnp.transpose(any_key, (0, 2, 1))[..., None]  # (b', T, h', 1)
            out = jnp.where(any_key, out, jnp.zeros((), out.dtype))
        if overflow is not None:  # traced cache overflow under jit: make it loud
            out = jnp.where(overflow, jnp.asarray(jnp.nan, out.dtype), out)
        w_out = params["out"]["w"].astype(cdtype)
        y = jnp.einsum("bthd,hdf->btf", out, w_out.reshape(num_heads, hd, w_out.shape[1]))
        if use_bias:
            y = y + params["out"]["b"].astype(cdtype).reshape(1, 1, w_out.shape[1])
        return y, state

    return named(Layer(init, apply), name)
