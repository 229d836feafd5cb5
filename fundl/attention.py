r"""Multi-head attention: projections, grouped-query heads, RoPE and a KV cache for decoding.

The layer projects its inputs with four :func:`fundl.dense` layers and attends with
:func:`fundl.dot_product_attention` (the kernels, masks and causality live there):

.. math::
    Q = x_q W_Q + b_Q, \quad K = x_{kv} W_K + b_K, \quad V = x_{kv} W_V + b_V, \qquad
    y = \mathrm{concat}(\mathrm{head}_1, \ldots, \mathrm{head}_H)\, W_O + b_O

with :math:`\mathrm{head}_h = \mathrm{softmax}(Q_h K_{g(h)}^\top / \sqrt{D} + M)
V_{g(h)}` and :math:`g(h)` the key/value head that query head :math:`h` shares
(grouped-query attention; :math:`H_{kv} = 1` is multi-query attention).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.nn import initializers

from fundl.attention_kernels import IMPLEMENTATIONS, dot_product_attention
from fundl.core import Layer, call_at, named, renamed
from fundl.dense import default_w_init, dense
from fundl.embedding import _check_room, rotary

__all__ = ["KVCache", "multi_head_attention", "init_cache"]

Initializer = Callable[..., jax.Array]


class KVCache(NamedTuple):
    """The state of a ``decode=True`` attention layer: the keys and values seen so far.

    Attributes:
        key: ``(batch, max_len, num_kv_heads, head_features)``, rotated by RoPE if used.
        value: ``(batch, max_len, num_kv_heads, head_features)``.
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


@renamed(head_dim="head_features", dropout="dropout_rate")
def multi_head_attention(
    num_heads: int,
    head_features: int | None = None,
    num_kv_heads: int | None = None,
    out_features: int | None = None,
    *,
    use_bias: bool = True,
    dropout_rate: float = 0.0,
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

    ``apply(params, state, q_in, kv_in=None, mask=None, *, key=None, train=False)``:
    self-attention when ``kv_in`` is ``None``, cross-attention otherwise. :func:`fundl.serial`
    passes the first layer all its inputs, so ``serial(attention, ...).apply(p, s, x, None,
    mask)`` works. Layers that differ only in ``is_causal`` (or ``implementation``) share
    one param tree: build both to attend both ways with the same params.

    Params (``H`` heads, ``K`` key/value heads, ``D`` head_features), one :func:`fundl.dense`
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
        head_features: :math:`D`, the size of each head; default ``d_q // num_heads``
            (``d_q`` must then be divisible).
        num_kv_heads: :math:`H_{kv}`, the number of key/value heads (default ``num_heads``;
            1 is multi-query attention); must divide ``num_heads``.
        out_features: the output size (default ``d_q``, the query input's width).
        use_bias: biases on the four projections.
        dropout_rate: the probability of dropping each attention weight in training (needs
            a key).
        is_causal: position ``i`` attends only to keys ``j <= i`` (top-left aligned when
            ``q_len != kv_len``; offset by the cache index when decoding).
        rope_base: if set, rotary position embeddings with this base (e.g. 10000.0) are
            applied to queries and keys (:func:`fundl.rotary`); self-attention only.
        decode: keep a :class:`KVCache` in the state for incremental decoding. ``init``'s
            input ``(batch, max_len, d)`` sets the cache size; see :func:`init_cache`. Each
            call appends its keys and values at the cache index, attends over the filled
            part, and advances the index. Overflowing ``max_len`` raises a ``ValueError``
            when the index is concrete (eager calls, or more new positions than
            ``max_len``); under ``jit`` the index is traced and an overflowing call returns
            NaN outputs instead.
        implementation: the kernel, ``"explicit"``, ``"xla"`` or ``"cudnn"``; ``None`` picks
            per backend and dtype (see :func:`fundl.dot_product_attention`).
        w_init: initializer of the projection weights (default glorot uniform).
        b_init: initializer of the biases (default zeros).
        dtype: the compute dtype (e.g. ``jnp.bfloat16``); ``None`` computes in the query
            input's. Softmax runs in float32 (or wider) whatever it is.
        param_dtype: the storage dtype of the params (default float32, float64 with x64).

    Returns:
        A :class:`~fundl.Layer` mapping ``q_in (batch, q_len, d_q)``, ``kv_in (batch, kv_len,
        d_kv)`` and a boolean ``mask`` broadcastable to ``(batch, q_len, kv_len)`` (``True``
        = may attend; a 4-d ``(batch, heads, q_len, kv_len)`` mask is also accepted) to
        ``(batch, q_len, out_features)``.
    """
    cfg = _Config(
        f"multi_head_attention({num_heads})", num_heads,
        _checked_kv_heads(num_heads, head_features, num_kv_heads, out_features),
        head_features, out_features, rope_base, decode, dtype,
        {"use_bias": use_bias, "w_init": w_init, "b_init": b_init, "param_dtype": param_dtype},
    )  # fmt: skip
    name, kv_heads = cfg.name, cfg.kv_heads
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"{name}: dropout_rate must be in [0, 1), got {dropout_rate!r}.")
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"{name}: implementation must be one of {IMPLEMENTATIONS} or None, got "
            f"{implementation!r}."
        )

    def init(key, q_in, kv_in=None, mask=None):
        del mask
        _check_inputs(cfg, q_in, kv_in)
        hd, d_out = _sizes(cfg, q_in)
        layers = _projections(cfg, hd, d_out, q_in.dtype)
        kv = q_in if kv_in is None else kv_in
        heads = jax.ShapeDtypeStruct((*q_in.shape[:-1], num_heads * hd), q_in.dtype)
        inputs = {"query": q_in, "key": kv, "value": kv, "out": heads}
        keys = dict(zip(layers, jax.random.split(key, len(layers)), strict=True))
        params = {part: call_at(f"{name}[{part}]", layer.init, keys[part], inputs[part])[0]
                  for part, layer in layers.items()}  # fmt: skip
        if not decode:
            return params, ()
        empty = jnp.zeros((*q_in.shape[:2], kv_heads, hd), dtype or q_in.dtype)
        return params, KVCache(empty, empty, jnp.zeros((), jnp.int32))

    def apply(params, state, q_in, kv_in=None, mask=None, *, key=None, train=False):
        _check_inputs(cfg, q_in, kv_in)
        hd = params["query"]["w"].shape[1] // num_heads  # sizes from the params, as dense
        layers = _projections(cfg, hd, params["out"]["w"].shape[1], q_in.dtype)

        def project(part, x):
            return call_at(f"{name}[{part}]", layers[part].apply, params[part], (), x)[0]

        kv = q_in if kv_in is None else kv_in
        q = project("query", q_in).reshape(*q_in.shape[:2], num_heads, hd)  # [B, T, H, D]
        k = project("key", kv).reshape(*kv.shape[:2], kv_heads, hd)  # [B, S, K, D]
        v = project("value", kv).reshape(*kv.shape[:2], kv_heads, hd)
        offset = state.index if decode else 0  # the position of the first query
        if rope_base is not None:
            positions = offset + jnp.arange(q.shape[1], dtype=jnp.int32)
            q, k = rotary(q, positions, rope_base), rotary(k, positions, rope_base)
        if decode:
            state = _append(name, state, k, v)
            k, v = state.key, state.value
        rate = dropout_rate if train else 0.0
        if rate > 0.0 and key is None:
            raise ValueError(
                f"{name}: dropout_rate={rate} in training needs a key: "
                f"apply(..., key=jax.random.key(0), train=True)."
            )
        out = call_at(name, dot_product_attention, q, k, v, mask=mask, is_causal=is_causal,
                    query_offset=offset, kv_lengths=state.index if decode else None,
                    dropout_rate=rate, key=key, implementation=implementation)  # fmt: skip
        y = project("out", out.reshape(*out.shape[:2], -1))  # [B, T, H * D] -> [B, T, d_out]
        if decode:  # a cache overflow under jit (a traced index cannot raise): make it loud
            y = jnp.where(state.index > state.key.shape[1], jnp.asarray(jnp.nan, y.dtype), y)
        return y, state

    return named(Layer(init, apply), name, side_inputs=("mask",))


class _Config(NamedTuple):
    """What ``multi_head_attention``'s ``init`` and ``apply`` read of its arguments."""

    name: str
    num_heads: int
    kv_heads: int
    head_features: int | None
    out_features: int | None
    rope_base: float | None
    decode: bool
    dtype: jnp.dtype | None
    dense_options: dict[str, Any]  # use_bias, w_init, b_init, param_dtype


def _checked_kv_heads(
    num_heads: int, head_features: int | None, num_kv_heads: int | None, out_features: int | None
) -> int:
    """Checks the sizes given to ``multi_head_attention``; returns the key/value heads."""
    ctor = "multi_head_attention(num_heads, head_features, num_kv_heads, out_features)"
    for arg, value in (("num_heads", num_heads), ("head_features", head_features),
                       ("num_kv_heads", num_kv_heads), ("out_features", out_features)):  # fmt: skip
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{ctor}: {arg} must be a positive int, got {value!r}.")
    kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads % kv_heads:
        raise ValueError(
            f"multi_head_attention({num_heads}): num_heads={num_heads} is not divisible by "
            f"num_kv_heads={kv_heads}; each key/value head serves num_heads / num_kv_heads "
            f"query heads. Pick num_kv_heads dividing {num_heads}, e.g. 1 (multi-query) or "
            f"{num_heads} (standard)."
        )
    return kv_heads


def _sizes(cfg: _Config, q_in: Any) -> tuple[int, int]:
    """``(D, d_out)`` for a query input ``(..., d_q)``: the head and output sizes."""
    d_q = q_in.shape[-1]
    if cfg.head_features is None and d_q % cfg.num_heads:
        raise ValueError(
            f"{cfg.name}: the query width {d_q} is not divisible by num_heads={cfg.num_heads}. "
            f"Pick num_heads dividing {d_q}, or pass head_features explicitly."
        )
    hd = cfg.head_features or d_q // cfg.num_heads
    if cfg.rope_base is not None and hd % 2:
        raise ValueError(f"{cfg.name}: rope_base needs an even head_features, got {hd}.")
    return hd, cfg.out_features or d_q


def _projections(cfg: _Config, hd: int, d_out: int, q_dtype: Any) -> dict[str, Layer]:
    """The four dense layers; they compute in ``cfg.dtype``, else the query input's dtype."""
    widths = {"query": cfg.num_heads * hd, "key": cfg.kv_heads * hd,
              "value": cfg.kv_heads * hd, "out": d_out}  # fmt: skip
    dtype = cfg.dtype or q_dtype
    return {part: dense(width, dtype=dtype, **cfg.dense_options) for part, width in widths.items()}


def _check_inputs(cfg: _Config, q_in: Any, kv_in: Any) -> None:
    """Raises for inputs that are not ``(batch, time, features)`` or do not fit the layer."""
    name = cfg.name
    for what, x in (("q_in", q_in), ("kv_in", kv_in)):
        if x is not None and jnp.ndim(x) != 3:
            raise ValueError(
                f"{name}: {what} has shape {jnp.shape(x)}, expected (batch, time, "
                f"features). Add a batch axis, e.g. x[None]."
            )
    if kv_in is None:
        return
    if kv_in.shape[0] != q_in.shape[0]:
        raise ValueError(f"{name}: q_in has batch {q_in.shape[0]} but kv_in has {kv_in.shape[0]}.")
    if cfg.rope_base is not None:
        raise ValueError(f"{name}: rope_base applies to self-attention; got kv_in.")
    if cfg.decode:
        raise ValueError(
            f"{name}: decode=True caches self-attention keys and values; for "
            f"cross-attention pass kv_in to a layer built with decode=False."
        )


def _append(name: str, cache: KVCache, k: jax.Array, v: jax.Array) -> KVCache:
    """The cache with this call's keys and values ``(batch, time, kv_heads, D)`` written at
    its index, and the index advanced (raises if they overflow a concrete index)."""
    batch, time = k.shape[:2]
    if cache.key.shape[0] != batch:
        raise ValueError(
            f"{name}: the cache holds batch {cache.key.shape[0]}, the input has {batch}. "
            f"Create the cache with fl.init_cache(model, batch={batch}, max_len=...)."
        )
    _check_room(name, cache.index, time, cache.key.shape[1])
    zero = jnp.zeros((), cache.index.dtype)
    start = (zero, cache.index, zero, zero)
    return KVCache(
        jax.lax.dynamic_update_slice(cache.key, k.astype(cache.key.dtype), start),
        jax.lax.dynamic_update_slice(cache.value, v.astype(cache.value.dtype), start),
        cache.index + time,
    )
