r"""Scaled dot-product attention as a pure function of arrays: :func:`dot_product_attention`.

Each of :math:`H` query heads compares its queries with the keys of the key/value head it
shares and mixes that head's values:

.. math::
    \mathrm{out}_h = \mathrm{softmax}\!\left(s\, Q_h K_{g(h)}^\top + M\right) V_{g(h)},
    \qquad g(h) = \lfloor h / (H / H_{kv}) \rfloor

with :math:`s = 1 / \sqrt{D}` by default and :math:`M` :math:`0` where attending is allowed,
:math:`-\infty` elsewhere (:math:`H_{kv} = H` is standard attention, :math:`H_{kv} = 1`
multi-query attention). What is allowed (the boolean mask, causality and the valid key
lengths) is combined in one place (``_allowed``); a query row with no allowed key gives
zeros (not the mean of the values, not NaN), in the outputs and in the gradients.

Which kernel runs is chosen in one place too (``_choose``, for ``implementation=None``):

- ``"cudnn"``: cuDNN flash attention through ``jax.nn.dot_product_attention``, on GPU for
  bfloat16/float16 with ``head_features`` a multiple of 8 up to 128 and no mask array
  (plain causality is fine).
- ``"xla"``: ``jax.nn.dot_product_attention``'s XLA path, every other GPU/TPU case.
- ``"explicit"``: an einsum-softmax-einsum written here, on CPU (where it runs faster than
  the XLA path; see ``benchmarks/attention_step.py``) and whenever dropout is active, which
  the fused kernels do not support.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fundl.embedding import _at_least_f32

__all__ = ["dot_product_attention", "IMPLEMENTATIONS"]

IMPLEMENTATIONS = ("explicit", "xla", "cudnn")
"""The values of ``implementation=`` (``None`` chooses per backend and dtype)."""

WHO = "dot_product_attention"


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    query_offset: int | jax.Array = 0,
    kv_lengths: int | jax.Array | None = None,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    key: jax.Array | None = None,
    implementation: str | None = None,
) -> jax.Array:
    r"""Multi-head scaled dot-product attention of head-shaped arrays (see the module docs).

    A pure function: no params, as ``jax.nn.dot_product_attention`` (whose kernels it runs
    off CPU), plus fundl's rules: grouped-query heads, a float32 (or wider) softmax, zeros
    for query rows with no allowed key, and dropout on the attention weights.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> q = jnp.ones((2, 5, 4, 8))  # (batch, q_len, heads, head_features)
        >>> kv = jnp.ones((2, 5, 2, 8))  # (batch, kv_len, kv_heads, head_features)
        >>> fl.dot_product_attention(q, kv, kv, is_causal=True).shape
        (2, 5, 4, 8)

    Args:
        q: queries, ``(batch, q_len, heads, head_features)``.
        k: keys, ``(batch, kv_len, kv_heads, head_features)``; ``kv_heads`` divides
            ``heads``, query head ``h`` uses key/value head ``h // (heads // kv_heads)``.
        v: values, the shape of ``k``.
        mask: ``True`` where query ``i`` may attend to key ``j``: a boolean array
            broadcastable to ``(batch, q_len, kv_len)`` (e.g. ``(batch, 1, kv_len)`` for key
            padding, ``(q_len, kv_len)`` shared), or 4-d, broadcastable to ``(batch, heads,
            q_len, kv_len)``. (A 3-d mask is per example here, not per head as in
            ``jax.nn.dot_product_attention``.)
        is_causal: query ``i`` attends only to keys ``j <= i + query_offset``.
        query_offset: the position of the first query among the keys (an int, or an int
            scalar array under ``jit``), for causality when the keys hold earlier positions
            too, as a KV cache does; ``>= 0``.
        kv_lengths: only keys ``j < kv_lengths`` are attended: an int scalar, or one length
            per example, ``(batch,)`` (padding given as lengths).
        scale: :math:`s`, the logits' scale; default :math:`1 / \sqrt{D}`.
        dropout_rate: the probability of dropping each attention weight (the others are
            scaled by ``1 / (1 - rate)``); ``0.0`` in inference. Needs ``key``; runs the
            explicit kernel.
        key: a PRNG key for dropout.
        implementation: ``"explicit"``, ``"xla"`` or ``"cudnn"``; ``None`` picks per
            backend and dtype (see the module docs).

    Returns:
        ``(batch, q_len, heads, head_features)``, in ``v``'s dtype.
    """
    b, t, h, d = _check_heads(q, k, v)
    s = k.shape[1]
    _check_options(dropout_rate, key, implementation)
    mask = _as_4d(mask, b, h, t, s)
    allowed = _allowed(mask, is_causal, query_offset, kv_lengths, t, s)
    # causality alone (from position 0) leaves every query a key, and the fused kernels
    # take it as a flag rather than as a (q_len, kv_len) array
    plain_causal = is_causal and mask is None and kv_lengths is None and _is_zero(query_offset)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    how = _choose(implementation, q.dtype, d, has_mask=allowed is not None and not plain_causal,
                  dropout=dropout_rate > 0.0)  # fmt: skip
    if how == "explicit":
        out = _explicit(q, k, v, allowed, scale, dropout_rate, key)
    else:
        out = _fused(q, k, v, None if plain_causal else allowed, plain_causal, scale, how)
    if allowed is None or plain_causal:
        return out
    return _zero_rows_without_keys(out, allowed)


def _check_heads(q: Any, k: Any, v: Any) -> tuple[int, int, int, int]:
    """``(batch, q_len, heads, head_features)``, after checking that q, k and v agree."""
    shapes = tuple(tuple(jnp.shape(a)) for a in (q, k, v))
    ok = all(len(shape) == 4 for shape in shapes) and shapes[1] == shapes[2]
    if not ok or shapes[0][0] != shapes[1][0] or shapes[0][3] != shapes[1][3]:
        raise ValueError(
            f"{WHO}: q, k, v have shapes {shapes[0]}, {shapes[1]}, {shapes[2]}; expected q "
            f"(batch, q_len, heads, head_features) and k, v both (batch, kv_len, kv_heads, "
            f"head_features), with the same batch and head_features."
        )
    heads, kv_heads = shapes[0][2], shapes[1][2]
    if heads % kv_heads:
        raise ValueError(
            f"{WHO}: q has {heads} heads, k and v {kv_heads}; kv_heads must divide heads "
            f"(each key/value head serves heads / kv_heads query heads)."
        )
    return shapes[0]


def _check_options(dropout_rate: float, key: Any, implementation: str | None) -> None:
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"{WHO}: dropout_rate must be in [0, 1), got {dropout_rate!r}.")
    if dropout_rate > 0.0 and key is None:
        raise ValueError(
            f"{WHO}: dropout_rate={dropout_rate} needs a key: {WHO}(..., key="
            f"jax.random.key(0)); pass dropout_rate=0.0 in inference."
        )
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"{WHO}: implementation must be one of {IMPLEMENTATIONS} or None, got "
            f"{implementation!r}."
        )


def _as_4d(mask: Any, b: int, h: int, t: int, s: int) -> jax.Array | None:
    """A boolean mask, checked, as ``(b', h', t, s)`` with ``b'`` in ``{1, b}``, ``h'`` in
    ``{1, h}``: a mask of at most 3 axes broadcasts to ``(b, t, s)``, a 4-d one to
    ``(b, h, t, s)``."""
    if mask is None:
        return None
    if not jnp.issubdtype(jnp.dtype(mask.dtype), jnp.bool_):
        raise TypeError(
            f"{WHO}: mask has dtype {jnp.dtype(mask.dtype)}, expected bool (True = may "
            f"attend). Convert it, e.g. mask.astype(bool) or lengths[:, None] > positions."
        )
    shape = tuple(mask.shape)
    target = (b, t, s) if len(shape) <= 3 else (b, h, t, s)
    try:
        ok = len(shape) <= 4 and np.broadcast_shapes(shape, target) == target
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{WHO}: mask shape {shape} does not broadcast to (batch, q_len, kv_len) = "
            f"{(b, t, s)}. Pass a boolean mask of shape (batch, q_len, kv_len), "
            f"(batch, 1, kv_len) for key padding, or (q_len, kv_len)."
        )
    if len(shape) <= 3:
        shape3 = (1,) * (3 - len(shape)) + shape
        mask = mask.reshape(shape3[0], 1, shape3[1], shape3[2])
    return jnp.broadcast_to(mask, (*mask.shape[:2], t, s))


def _allowed(
    mask: jax.Array | None,
    is_causal: bool,
    query_offset: int | jax.Array,
    kv_lengths: int | jax.Array | None,
    t: int,
    s: int,
) -> jax.Array | None:
    """The one boolean ``(b', h', t, s)`` array of what may be attended (``None``: all).

    It is the mask, the causal triangle and the key lengths, and-ed together.
    """
    parts = [] if mask is None else [mask]
    if is_causal:
        parts.append(_causal(t, s, query_offset).reshape(1, 1, t, s))
    if kv_lengths is not None:
        lengths = jnp.asarray(kv_lengths)
        if lengths.ndim > 1 or not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(
                f"{WHO}: kv_lengths has shape {lengths.shape} and dtype {lengths.dtype}; "
                f"expected integers of shape () or (batch,)."
            )
        positions = jnp.arange(s, dtype=lengths.dtype).reshape(1, 1, 1, s)
        parts.append(positions < lengths.reshape(-1, 1, 1, 1))  # [b', 1, 1, S]
    if not parts:
        return None
    allowed = functools.reduce(jnp.logical_and, parts)
    return jnp.broadcast_to(allowed, (*allowed.shape[:2], t, s))


def _causal(t: int, s: int, offset: int | jax.Array) -> jax.Array:
    """``(t, s)``: query ``i``, at position ``offset + i``, sees keys ``j <= offset + i``."""
    if isinstance(offset, int):
        return jnp.tril(jnp.ones((t, s), bool), offset)
    offset = jnp.asarray(offset)
    query_positions = offset + jnp.arange(t, dtype=offset.dtype)
    return jnp.arange(s, dtype=offset.dtype)[None, :] <= query_positions[:, None]


def _is_zero(offset: int | jax.Array) -> bool:
    return isinstance(offset, int) and offset == 0


def _choose(
    implementation: str | None, dtype: Any, head_features: int, *, has_mask: bool, dropout: bool
) -> str:
    """The kernel to run: the one place that decides (see the module docs)."""
    if dropout:
        return "explicit"
    if implementation is not None:
        return implementation
    backend = jax.default_backend()
    if backend == "cpu":
        return "explicit"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    cudnn_ok = head_features % 8 == 0 and head_features <= 128 and not has_mask
    return "cudnn" if backend in ("gpu", "cuda") and half and cudnn_ok else "xla"


def _explicit(q, k, v, allowed, scale, dropout_rate, key):
    """softmax(scale q k^T, where allowed) v, grouped heads, a float32 (or wider) softmax.

    q: (B, T, H, D); k, v: (B, S, K, D); allowed: None or bool (b', h', T, S), b' in {1, B},
    h' in {1, H}. Returns (B, T, H, D).
    """
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = h // kv
    ltype = _at_least_f32(q.dtype)
    q = q * jnp.asarray(scale, q.dtype)  # scale (T, D) queries, not (T, S) logits: cheaper
    if g == 1:  # plain multi-head: 4-d einsums (faster on CPU than the 5-d form)
        logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=ltype)
    else:  # grouped-query: [B, T, K, G, D] against [B, S, K, D], no repeated keys
        qg = q.reshape(b, t, kv, g, d)
        logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=ltype)
    if allowed is not None:
        if g > 1:  # (b', h', T, S) -> the logits' [b', K, G, T, S] layout
            heads = (kv, g) if allowed.shape[1] == h else (1, 1)
            allowed = allowed.reshape(allowed.shape[0], *heads, t, s)
        logits = jnp.where(allowed, logits, jnp.asarray(jnp.finfo(ltype).min, ltype))
    probs = jax.nn.softmax(logits, axis=-1)
    if dropout_rate > 0.0:
        keep = jax.random.bernoulli(key, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / jnp.asarray(1.0 - dropout_rate, ltype), 0.0)
    probs = probs.astype(v.dtype)
    if g == 1:
        return jnp.einsum("bhts,bshd->bthd", probs, v)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)


def _fused(q, k, v, mask, is_causal, scale, implementation):
    """``jax.nn.dot_product_attention`` with ``implementation`` ("xla" or "cudnn")."""
    # jax.nn.dot_product_attention promotes its logits dtype with promote_types (bf16 or
    # f64 against f32), which strict promotion rejects; its result dtype is q's either way,
    # so it runs under the standard rules.
    with jax.numpy_dtype_promotion("standard"):
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=is_causal, scale=scale, implementation=implementation
        )


def _zero_rows_without_keys(out: jax.Array, allowed: jax.Array) -> jax.Array:
    """Zeros for the query rows with no allowed key (not the mean of the values)."""
    any_key = allowed.any(axis=-1)  # [b', h', T]
    any_key = jnp.transpose(any_key, (0, 2, 1))[..., None]  # [b', T, h', 1]
    return jnp.where(any_key, out, jnp.zeros((), out.dtype))
