"""Pre-norm transformer blocks (encoder and causal decoder), built from the combinators.

A block is two residual branches, each normalising its input first (pre-norm, as GPT-2 and
most models since; Xiong et al. 2020)::

    x = x + dropout(attention(norm(x), mask))
    x = x + dropout(dense_2(gelu(dense_1(norm(x)))))

Both are ``fl.serial(attn=..., mlp=fl.residual(fl.serial(...)))``, so params read
``params["attn"]["attn"]["query"]["w"]`` and ``params["mlp"]["up"]["w"]``. Stack blocks
with :func:`fundl.repeat` (params stacked, one compile for any depth).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from fundl.attention import multi_head_attention
from fundl.combinators import _call, residual, serial
from fundl.core import Layer, layer_name, named
from fundl.dense import dense

__all__ = ["attention_residual", "encoder_block", "decoder_block"]

LayerMaker = Callable[[], Layer]


def _default_norm() -> Layer:
    from fundl.norm import layer_norm

    return layer_norm()


def _default_dropout(rate: float) -> Layer:
    from fundl.dropout import dropout

    return dropout(rate)


def attention_residual(attention: Layer, norm: Layer, dropout: Layer | None = None) -> Layer:
    """The attention branch of a pre-norm block: ``x + dropout(attention(norm(x), mask))``.

    Unlike :func:`fundl.residual`, it passes an optional ``mask`` to the attention layer:
    ``apply(params, state, x, mask=None, *, key=None, train=False)``.

    Params and state: ``{"norm": ..., "attn": ..., "drop": ...}`` (no ``"drop"`` without
    a dropout layer).

    Args:
        attention: a self-attention layer (:func:`fundl.multi_head_attention`) that keeps the
            width, ``(batch, time, width) -> (batch, time, width)``.
        norm: the normalisation layer, e.g. ``fl.layer_norm()`` or ``fl.rms_norm()``.
        dropout: a dropout layer on the branch's output, or ``None``.

    Returns:
        A :class:`~fundl.Layer` mapping ``(batch, time, width)`` to the same shape.
    """
    children = {"norm": norm, "attn": attention}
    if dropout is not None:
        children["drop"] = dropout
    label = f"attention_residual({layer_name(attention)})"
    segments = {n: f"attention_residual[{n}]" for n in children}

    def init(key, x, mask=None):
        keys = dict(zip(children, jax.random.split(key, len(children)), strict=True))
        params, state = {}, {}
        h = x
        for n, child in children.items():
            ins = (h, None, mask) if n == "attn" else (h,)
            params[n], state[n] = _call(segments[n], child.init, keys[n], *ins)
            h, _ = _call(segments[n], jax.eval_shape,
                         lambda p, s, *a, c=child, k=keys[n]: c.apply(p, s, *a, key=k),
                         params[n], state[n], *ins)  # fmt: skip
        return params, state

    def apply(params, state, x, mask=None, *, key=None, train=False):
        keys = (
            dict(zip(children, jax.random.split(key, len(children)), strict=True))
            if key is not None
            else dict.fromkeys(children)
        )
        new_state = {}
        h = x
        for n, child in children.items():
            ins = (h, None, mask) if n == "attn" else (h,)
            h, new_state[n] = _call(segments[n], child.apply, params[n], state[n], *ins,
                                    key=keys[n], train=train)  # fmt: skip
        if jnp.shape(h) != jnp.shape(x):
            raise ValueError(
                f"{label}: the branch maps shape {jnp.shape(x)} to {jnp.shape(h)}; a residual "
                f"needs equal shapes. Give the attention out_features={jnp.shape(x)[-1]}."
            )
        return x + h.astype(x.dtype), new_state

    return named(Layer(init, apply), label, tuple((segments[n], c) for n, c in children.items()))


def _block(
    kind: str,
    width: int,
    num_heads: int,
    hidden: int | None,
    num_kv_heads: int | None,
    dropout: float,
    attention_dropout: float,
    causal: bool,
    rope_base: float | None,
    decode: bool,
    norm: LayerMaker | None,
    dropout_layer: Callable[[float], Layer] | None,
    dtype: jnp.dtype | None,
    param_dtype: jnp.dtype | None,
    implementation: str | None,
) -> Layer:
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"{kind}(width, num_heads): width must be a positive int, got {width!r}.")
    if not isinstance(num_heads, int) or num_heads < 1 or width % num_heads:
        raise ValueError(
            f"{kind}({width}, {num_heads}): the width {width} is not divisible by "
            f"num_heads={num_heads!r}. Pick num_heads dividing {width}."
        )
    make_norm = norm or _default_norm
    make_drop = dropout_layer or _default_dropout
    attn = multi_head_attention(
        num_heads, num_kv_heads=num_kv_heads, dropout=attention_dropout, is_causal=causal,
        rope_base=rope_base, decode=decode, implementation=implementation, dtype=dtype,
        param_dtype=param_dtype,
    )  # fmt: skip
    drop = (lambda: make_drop(dropout)) if dropout > 0.0 else None
    mlp = {
        "norm": make_norm(),
        "up": dense(hidden or 4 * width, dtype=dtype, param_dtype=param_dtype),
        "act": jax.nn.gelu,
        "down": dense(width, dtype=dtype, param_dtype=param_dtype),
    }
    if drop is not None:
        mlp["drop"] = drop()
    block = serial(
        attn=attention_residual(attn, make_norm(), drop() if drop is not None else None),
        mlp=residual(serial(**mlp)),
    )
    return named(block, f"{kind}({width}, {num_heads})", block.children)


def encoder_block(
    width: int,
    num_heads: int,
    *,
    hidden: int | None = None,
    num_kv_heads: int | None = None,
    dropout: float = 0.0,
    attention_dropout: float = 0.0,
    rope_base: float | None = None,
    norm: LayerMaker | None = None,
    dropout_layer: Callable[[float], Layer] | None = None,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype | None = None,
    implementation: str | None = None,
) -> Layer:
    """A pre-norm transformer encoder block (BERT/ViT-style, bidirectional attention).

    ``apply(params, state, x, mask=None, *, key=None, train=False)``; ``mask`` is a boolean
    ``(batch, time, time)`` or broadcastable (e.g. ``(batch, 1, time)`` for key padding).
    See the module docstring for the computation.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> block = fl.encoder_block(16, 4)
        >>> x = jnp.ones((2, 5, 16))
        >>> params, state = block.init(jax.random.key(0), x)
        >>> block.apply(params, state, x)[0].shape
        (2, 5, 16)

    Args:
        width: the model width (input and output features).
        num_heads: attention heads; must divide ``width``.
        hidden: the MLP's hidden size (default ``4 * width``).
        num_kv_heads: key/value heads for grouped-query attention (default ``num_heads``).
        dropout: dropout rate on each branch's output (0 adds no dropout layer).
        attention_dropout: dropout rate on the attention weights.
        rope_base: rotary position embeddings in attention with this base, if set.
        norm: a constructor of the normalisation layer, called once per branch (default
            ``fl.layer_norm``; e.g. ``fl.rms_norm``).
        dropout_layer: a constructor ``rate -> Layer`` (default ``fl.dropout``).
        dtype: the compute dtype of attention and MLP (e.g. ``jnp.bfloat16``).
        param_dtype: the storage dtype of their params.
        implementation: the attention kernel (see :func:`fundl.multi_head_attention`);
            ``None`` picks per backend and dtype.

    Returns:
        A :class:`~fundl.Layer` mapping ``(batch, time, width)`` to the same shape.
    """
    return _block("encoder_block", width, num_heads, hidden, num_kv_heads, dropout,
                  attention_dropout, False, rope_base, False, norm, dropout_layer, dtype,
                  param_dtype, implementation)  # fmt: skip


def decoder_block(
    width: int,
    num_heads: int,
    *,
    hidden: int | None = None,
    num_kv_heads: int | None = None,
    dropout: float = 0.0,
    attention_dropout: float = 0.0,
    rope_base: float | None = None,
    decode: bool = False,
    norm: LayerMaker | None = None,
    dropout_layer: Callable[[float], Layer] | None = None,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype | None = None,
    implementation: str | None = None,
) -> Layer:
    """A pre-norm causal decoder block (GPT-style): position ``t`` sees positions ``<= t``.

    ``apply(params, state, x, mask=None, *, key=None, train=False)``; an optional ``mask``
    (e.g. key padding) is combined with the causal mask. With ``decode=True`` the attention
    keeps a KV cache in the state (see :func:`fundl.init_cache`): feed a prompt, then one
    position per call.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> block = fl.decoder_block(16, 4)
        >>> x = jnp.ones((2, 5, 16))
        >>> params, state = block.init(jax.random.key(0), x)
        >>> block.apply(params, state, x)[0].shape
        (2, 5, 16)

    Args:
        width: the model width (input and output features).
        num_heads: attention heads; must divide ``width``.
        hidden: the MLP's hidden size (default ``4 * width``).
        num_kv_heads: key/value heads for grouped-query attention (default ``num_heads``).
        dropout: dropout rate on each branch's output (0 adds no dropout layer).
        attention_dropout: dropout rate on the attention weights.
        rope_base: rotary position embeddings in attention with this base, if set.
        decode: keep a KV cache in the attention's state, for incremental decoding.
        norm: a constructor of the normalisation layer, called once per branch (default
            ``fl.layer_norm``; e.g. ``fl.rms_norm``).
        dropout_layer: a constructor ``rate -> Layer`` (default ``fl.dropout``).
        dtype: the compute dtype of attention and MLP (e.g. ``jnp.bfloat16``).
        param_dtype: the storage dtype of their params.
        implementation: the attention kernel (see :func:`fundl.multi_head_attention`);
            ``None`` picks per backend and dtype.

    Returns:
        A :class:`~fundl.Layer` mapping ``(batch, time, width)`` to the same shape.
    """
    return _block("decoder_block", width, num_heads, hidden, num_kv_heads, dropout,
                  attention_dropout, True, rope_base, decode, norm, dropout_layer, dtype,
                  param_dtype, implementation)  # fmt: skip
