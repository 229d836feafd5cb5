"""Token embeddings, the tied output head, and positional encodings (sinusoidal, learned, RoPE).

A transformer sees a sequence of integer token ids. :func:`embedding` turns ids into vectors;
:func:`attend` reuses the same table as the output projection of a language model (weight
tying). Attention is blind to order, so a positional encoding is added to the embeddings
(:func:`sinusoidal_positions`, :func:`learned_positions`) or applied to queries and keys
inside attention (:func:`rotary`, RoPE; see ``fl.multi_head_attention(rope_base=...)``).

The positional layers take ``decode=True`` for one-token-at-a-time generation: their state
then counts the positions already seen, so the next call continues where the last stopped
(the same protocol as the KV cache of :func:`fundl.multi_head_attention`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.nn import initializers

from fundl.core import Layer, check_floating, default_float_dtype, flat_matmul, named

__all__ = [
    "embedding",
    "attend",
    "sinusoidal_table",
    "sinusoidal_positions",
    "learned_positions",
    "rotary",
]

Initializer = Callable[..., jax.Array]

default_table_init: Initializer = initializers.normal(stddev=1.0)
"""Standard normal, as PyTorch's ``nn.Embedding``."""

default_position_init: Initializer = initializers.normal(stddev=0.02)
"""Normal with stddev 0.02, as GPT-2's position table."""


def embedding(
    vocab: int,
    features: int,
    *,
    table_init: Initializer = default_table_init,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype | None = None,
) -> Layer:
    """A lookup table from integer ids to vectors: ``y[..., :] = table[ids[...], :]``.

    Params: ``{"table": (vocab, features)}``.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> layer = fl.embedding(100, 8)
        >>> ids = jnp.array([[1, 2, 3]])
        >>> params, state = layer.init(jax.random.key(0), ids)
        >>> y, state = layer.apply(params, state, ids)
        >>> y.shape
        (1, 3, 8)
        >>> fl.attend(params, y).shape  # tied output head: logits over the vocabulary
        (1, 3, 100)

    Args:
        vocab: the number of distinct ids; ids must lie in ``[0, vocab)``.
        features: the size of each vector.
        table_init: initializer of the table (default standard normal, as PyTorch's
            ``nn.Embedding``).
        dtype: the output dtype (e.g. ``jnp.bfloat16`` for bf16 compute); ``None`` keeps the
            table's dtype.
        param_dtype: the storage dtype of the table; ``None`` means float32, or float64 when
            ``jax_enable_x64`` is on.

    Returns:
        A :class:`~fundl.Layer` mapping integer ids ``(...)`` to ``(..., features)``. Ids out
        of range give NaN rows (they are not clamped silently).
    """
    _positive("embedding(vocab, features)", vocab=vocab, features=features)
    name = f"embedding({vocab}, {features})"

    def check(ids):
        if not jnp.issubdtype(jnp.dtype(ids.dtype), jnp.integer):
            raise TypeError(
                f"{name}: ids have dtype {jnp.dtype(ids.dtype)}, expected an integer dtype. "
                f"Pass token ids as integers, e.g. ids.astype(jnp.int32); for float features "
                f"use fl.dense instead."
            )

    def init(key, ids):
        check(ids)
        table = table_init(key, (vocab, features), param_dtype or default_float_dtype())
        return {"table": table}, ()

    def apply(params, state, ids, key=None, train=False):
        del key, train
        check(ids)
        y = params["table"].at[ids].get(mode="fill", fill_value=jnp.nan)
        return (y if dtype is None else y.astype(dtype)), state

    return named(Layer(init, apply), name)


def attend(params: Any, x: jax.Array) -> jax.Array:
    r"""The tied output head: logits :math:`x E^\top` against an embedding's table.

    Language models often share the input embedding :math:`E` with the output projection
    (Press & Wolf, 2017): the logit of token :math:`v` is the dot product of the final
    hidden vector with :math:`E_v`.

    Args:
        params: the params of an :func:`embedding` layer, ``{"table": (vocab, features)}``.
        x: hidden vectors, shape ``(..., features)``.

    Returns:
        Logits of shape ``(..., vocab)``, in ``x``'s dtype.
    """
    table = params["table"]
    if jnp.shape(x)[-1:] != table.shape[1:]:
        raise ValueError(
            f"attend: x has last dimension {jnp.shape(x)[-1:]}, the embedding table has "
            f"{table.shape[1]} features. Project x to {table.shape[1]} features first."
        )
    return flat_matmul(x, table.astype(x.dtype).T)


def _at_least_f32(dtype: Any) -> jnp.dtype:
    """float64 for float64 inputs, else float32: the precision of softmax and rotations."""
    return jnp.dtype(jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32)


def _positive(who: str, **values: Any) -> None:
    for arg, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{who}: {arg} must be a positive int, got {value!r}.")


def _check_sequence(name: str, x: Any) -> None:
    if jnp.ndim(x) != 3:
        raise ValueError(
            f"{name}: input has shape {jnp.shape(x)}, expected (batch, time, features)."
        )
    check_floating(name, x)


def _positions(name: str, state: Any, decode: bool, time: int, max_len: int | None):
    """Positions ``(time,)`` of this call's inputs, and the new decode state."""
    if not decode:
        if max_len is not None and time > max_len:
            raise ValueError(
                f"{name}: the sequence has {time} positions, more than max_len={max_len}. "
                f"Build the layer with a larger max_len."
            )
        return jnp.arange(time), state
    index = state["index"]
    _check_room(name, index, time, max_len)
    return index + jnp.arange(time, dtype=index.dtype), {"index": index + time}


def _check_room(name: str, index: Any, time: int, max_len: int | None) -> None:
    """Raises if ``time`` more positions overflow ``max_len`` (when ``index`` is concrete)."""
    if max_len is None:
        return
    if time > max_len:
        raise ValueError(
            f"{name}: {time} new positions overflow the maximum length {max_len}. Make the "
            f"cache longer, e.g. fl.init_cache(model, batch, max_len={time})."
        )
    if not isinstance(index, jax.core.Tracer) and int(index) + time > max_len:
        raise ValueError(
            f"{name}: the cache overflows: {int(index)} positions are filled and {time} more "
            f"do not fit in max_len={max_len}. Make the cache longer (fl.init_cache(..., "
            f"max_len=...)) or start a new one."
        )


def _decode_state(decode: bool) -> Any:
    return {"index": jnp.zeros((), jnp.int32)} if decode else ()


def sinusoidal_table(positions: jax.Array, features: int, base: float = 10000.0) -> jax.Array:
    r"""The sinusoidal encodings of Vaswani et al. (2017) at integer ``positions``.

    .. math::
        P_{p, 2i} = \sin(p / b^{2i/d}), \qquad P_{p, 2i+1} = \cos(p / b^{2i/d})

    Args:
        positions: integer positions, shape ``(time,)``.
        features: :math:`d`, the encoding size.
        base: :math:`b` (10000 in the paper).

    Returns:
        A float32 array of shape ``(time, features)``.
    """
    half = (features + 1) // 2
    freqs = base ** (-2.0 * jnp.arange(half, dtype=jnp.float32) / features)  # (half,)
    angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]  # (time, half)
    table = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # (time, half, 2)
    return table.reshape(positions.shape[0], 2 * half)[:, :features]


def sinusoidal_positions(*, base: float = 10000.0, decode: bool = False) -> Layer:
    """Adds the fixed sinusoidal position encodings: ``y[b, t] = x[b, t] + P[t]``.

    See :func:`sinusoidal_table` for :math:`P`. No params.

    Args:
        base: the wavelength base (10000 in "Attention is all you need").
        decode: count positions across calls (state ``{"index": ()}``), for incremental
            decoding; init on an input of shape ``(batch, max_len, features)``.

    Returns:
        A :class:`~fundl.Layer` mapping ``(batch, time, features)`` to the same shape.
    """
    name = "sinusoidal_positions"

    def init(key, x):
        del key
        _check_sequence(name, x)
        return (), _decode_state(decode)

    def apply(params, state, x, key=None, train=False):
        del params, key, train
        _check_sequence(name, x)
        pos, state = _positions(name, state, decode, x.shape[1], None)
        table = sinusoidal_table(pos, x.shape[2], base).astype(x.dtype)
        return x + table[None], state

    return named(Layer(init, apply), name)


def learned_positions(
    max_len: int,
    *,
    table_init: Initializer = default_position_init,
    decode: bool = False,
    param_dtype: jnp.dtype | None = None,
) -> Layer:
    """Adds a trained position embedding: ``y[b, t] = x[b, t] + table[t]`` (BERT, GPT-2).

    Params: ``{"table": (max_len, features)}``.

    Args:
        max_len: the longest sequence the layer accepts.
        table_init: initializer of the table (default normal, stddev 0.02, as GPT-2).
        decode: count positions across calls (state ``{"index": ()}``), for incremental
            decoding; beyond ``max_len`` positions it raises (eagerly) or gives NaN (under
            ``jit``, where the position is traced).
        param_dtype: the storage dtype of the table (default float32, or float64 with x64).

    Returns:
        A :class:`~fundl.Layer` mapping ``(batch, time, features)`` to the same shape.
    """
    _positive("learned_positions(max_len)", max_len=max_len)
    name = f"learned_positions({max_len})"

    def init(key, x):
        _check_sequence(name, x)
        table = table_init(key, (max_len, x.shape[2]), param_dtype or default_float_dtype())
        return {"table": table}, _decode_state(decode)

    def apply(params, state, x, key=None, train=False):
        del key, train
        _check_sequence(name, x)
        pos, state = _positions(name, state, decode, x.shape[1], max_len)
        table = params["table"].at[pos].get(mode="fill", fill_value=jnp.nan)  # (time, features)
        return x + table.astype(x.dtype)[None], state

    return named(Layer(init, apply), name)


def rotary(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    r"""Rotary position embedding (RoPE, Su et al. 2021) of queries or keys.

    Splits each head vector into halves :math:`(x_1, x_2)` and rotates pair :math:`i` by the
    angle :math:`p\,\theta_i`, :math:`\theta_i = b^{-2i/D}`:

    .. math::
        y_1 = x_1 \cos(p\theta) - x_2 \sin(p\theta), \qquad
        y_2 = x_2 \cos(p\theta) + x_1 \sin(p\theta)

    so the dot product of a rotated query at position :math:`p` and a rotated key at
    :math:`q` depends only on :math:`p - q`. Used by ``fl.multi_head_attention(rope_base=b)``.

    Args:
        x: queries or keys, shape ``(batch, time, heads, head_features)``; ``head_features``
            even.
        positions: integer positions, shape ``(time,)``.
        base: :math:`b` (10000 in RoFormer and LLaMA).

    Returns:
        The rotated array, same shape and dtype as ``x``.
    """
    dim = x.shape[-1]
    if dim % 2:
        raise ValueError(f"rotary: head_features must be even to rotate pairs, got {dim}.")
    half = dim // 2
    ctype = _at_least_f32(x.dtype)  # rotate in at least float32
    theta = base ** (-2.0 * jnp.arange(half, dtype=ctype) / dim)  # (half,)
    angles = positions.astype(ctype)[:, None] * theta[None, :]  # (time, half)
    cos = jnp.cos(angles)[None, :, None, :]  # (1, time, 1, half)
    sin = jnp.sin(angles)[None, :, None, :]
    x1, x2 = x[..., :half].astype(ctype), x[..., half:].astype(ctype)
    y = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return y.astype(x.dtype)
