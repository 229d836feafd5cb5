"""Pre-norm transformer blocks (encoder and causal decoder), built from the combinators.

A block is two residual branches, each normalising its input first (pre-norm, as GPT-2 and
most models since; Xiong et al. 2020)::

    x = x + dropout(attention(norm(x), mask))
    x = x + dropout(dense_2(gelu(dense_1(norm(x)))))

Both are ``fl.serial(attn=..., mlp=fl.residual(fl.serial(...)))``, so params read
``params["attn"]["attn"]["query"]["w"]`` and ``params["mlp"]["up"]["w"]``. The ``norm``
layer a block is given (and its ``fl.dropout``) serves both branches, each with its own
params and key. Stack blocks with :func:`fundl.repeat` (params stacked, one compile for any
depth). For other parts (another dropout, a different MLP), build the block from
:func:`attention_residual` and :func:`fundl.residual` as :func:`encoder_block` does.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from fundl.attention import multi_head_attention
from fundl.combinators import residual, serial
from fundl.core import Layer, call_at, layer_info, layer_name, named, renamed
from fundl.dense import dense
from fundl.dropout import dropout
from fundl.norm import layer_norm
from fundl.remat import remat as remat_layer

__all__ = ["attention_residual", "encoder_block", "decoder_block"]

default_norm: Layer = layer_norm()
"""``fl.layer_norm()``, the blocks' default ``norm``."""


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
            params[n], state[n] = call_at(segments[n], child.init, keys[n], *ins)
            h, _ = call_at(segments[n], jax.eval_shape,
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
            h, new_state[n] = call_at(segments[n], child.apply, params[n], state[n], *ins,
                                    key=keys[n], train=train)  # fmt: skip
        if jnp.shape(h) != jnp.shape(x):
            raise ValueError(
                f"{label}: the branch maps shape {jnp.shape(x)} to {jnp.shape(h)}; a residual "
                f"needs equal shapes. Give the attention out_features={jnp.shape(x)[-1]}."
            )
        return x + h.astype(x.dtype), new_state

    pairs = tuple((segments[n], c) for n, c in children.items())
    rebuild = lambda c: attention_residual(c[1], c[0], *c[2:])  # noqa: E731 (children in order)
    return named(Layer(init, apply), label, pairs, side_inputs=("mask",), rebuild=rebuild)


_RENAMED = {
    "width": "features",
    "hidden": "mlp_features",
    "dropout": "dropout_rate",
    "attention_dropout": "attention_dropout_rate",
    "dropout_layer": (
        "blocks use fl.dropout(dropout_rate); for another dropout layer, build the block "
        "from fl.attention_residual and fl.residual"
    ),
}


def _block(
    kind: str,
    features: int,
    num_heads: int,
    *,
    mlp_features: int | None,
    num_kv_heads: int | None,
    dropout_rate: float,
    attention_dropout_rate: float,
    is_causal: bool,
    rope_base: float | None,
    decode: bool,
    norm: Layer,
    dtype: jnp.dtype | None,
    param_dtype: jnp.dtype | None,
    implementation: str | None,
    remat: bool | Callable[..., bool] | None,
) -> Layer:
    if not isinstance(features, int) or features < 1:
        raise ValueError(
            f"{kind}(features, num_heads): features must be a positive int, got {features!r}."
        )
    name = f"{kind}({features}, {num_heads})"
    if not isinstance(num_heads, int) or num_heads < 1 or features % num_heads:
        raise ValueError(
            f"{name}: features={features} is not divisible by num_heads={num_heads!r}. Pick "
            f"num_heads dividing {features}."
        )
    for arg, rate in (("dropout_rate", dropout_rate),
                      ("attention_dropout_rate", attention_dropout_rate)):  # fmt: skip
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{name}: {arg} must be in [0, 1), got {rate!r}.")
    if not isinstance(norm, Layer):
        raise TypeError(
            f"{name}: norm must be a Layer value, got {norm!r}. Pass a layer, not its "
            f"constructor: e.g. norm=fl.rms_norm()."
        )
    attention = multi_head_attention(
        num_heads, num_kv_heads=num_kv_heads, dropout_rate=attention_dropout_rate,
        is_causal=is_causal, rope_base=rope_base, decode=decode, implementation=implementation,
        dtype=dtype, param_dtype=param_dtype,
    )  # fmt: skip
    drop = dropout(dropout_rate) if dropout_rate > 0.0 else None
    mlp = {
        "norm": norm,
        "up": dense(mlp_features or 4 * features, dtype=dtype, param_dtype=param_dtype),
        "act": jax.nn.gelu,
        "down": dense(features, dtype=dtype, param_dtype=param_dtype),
    }
    if drop is not None:
        mlp["drop"] = drop
    block = serial(attn=attention_residual(attention, norm, drop), mlp=residual(serial(**mlp)))
    meta = layer_info(block).meta  # side inputs, how to rebuild it over new children
    if remat is None or remat is False:
        return named(block, name, block.children, **meta)
    if remat is not True and not callable(remat):
        raise TypeError(
            f"{name}: remat must be None, True or a policy from jax.checkpoint_policies "
            f"(e.g. jax.checkpoint_policies.dots_saveable), got {type(remat).__name__}."
        )
    policy = None if remat is True else remat

    def rebuild(children):
        return remat_layer(meta["rebuild"](children), policy=policy)

    return named(remat_layer(block, policy=policy), name, block.children,
                 **{**meta, "rebuild": rebuild})  # fmt: skip


@renamed(**_RENAMED)
def encoder_block(
    features: int,
    num_heads: int,
    *,
    mlp_features: int | None = None,
    num_kv_heads: int | None = None,
    dropout_rate: float = 0.0,
    attention_dropout_rate: float = 0.0,
    rope_base: float | None = None,
    norm: Layer = default_norm,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype | None = None,
    implementation: str | None = None,
    remat: bool | Callable[..., bool] | None = None,
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
        features: the model width (input and output features).
        num_heads: attention heads; must divide ``features``.
        mlp_features: the MLP's hidden size (default ``4 * features``).
        num_kv_heads: key/value heads for grouped-query attention (default ``num_heads``).
        dropout_rate: the dropout rate on each branch's output (0 adds no dropout layer).
        attention_dropout_rate: the dropout rate on the attention weights.
        rope_base: rotary position embeddings in attention with this base, if set.
        norm: the normalisation layer, used (with its own params) in each branch: default
            ``fl.layer_norm()``; e.g. ``fl.rms_norm()``.
        dtype: the compute dtype of attention and MLP (e.g. ``jnp.bfloat16``).
        param_dtype: the storage dtype of their params.
        implementation: the attention kernel (see :func:`fundl.dot_product_attention`);
            ``None`` picks per backend and dtype.
        remat: recompute the block's activations in the backward pass (see
            :func:`fundl.remat`): ``None`` (the default) keeps them; ``True`` keeps only the
            block's input; a policy from ``jax.checkpoint_policies`` (e.g.
            ``dots_saveable``) keeps what it names. The same params, outputs and
            gradients; less activation memory for up to one more forward pass.

    Returns:
        A :class:`~fundl.Layer` mapping ``(batch, time, features)`` to the same shape.
    """
    return _block(
        "encoder_block", features, num_heads, mlp_features=mlp_features,
        num_kv_heads=num_kv_heads, dropout_rate=dropout_rate,
        attention_dropout_rate=attention_dropout_rate, is_causal=False, rope_base=rope_base,
        decode=False, norm=norm, dtype=dtype, param_dtype=param_dtype,
        implementation=implementation, remat=remat,
    )  # fmt: skip


@renamed(**_RENAMED)
def decoder_block(
    features: int,
    num_heads: int,
    *,
    mlp_features: int | None = None,
    num_kv_heads: int | None = None,
    dropout_rate: float = 0.0,
    attention_dropout_rate: float = 0.0,
    rope_base: float | None = None,
    decode: bool = False,
    norm: Layer = default_norm,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype | None = None,
    implementation: str | None = None,
    remat: bool | Callable[..., bool] | None = None,
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
        features: the model width (input and output features).
        num_heads: attention heads; must divide ``features``.
        mlp_features: the MLP's hidden size (default ``4 * features``).
        num_kv_heads: key/value heads for grouped-query attention (default ``num_heads``).
        dropout_rate: the dropout rate on each branch's output (0 adds no dropout layer).
        attention_dropout_rate: the dropout rate on the attention weights.
        rope_base: rotary position embeddings in attention with this base, if set.
        decode: keep a KV cache in the attention's state, for incremental decoding.
        norm: the normalisation layer, used (with its own params) in each branch: default
            ``fl.layer_norm()``; e.g. ``fl.rms_norm()``.
        dtype: the compute dtype of attention and MLP (e.g. ``jnp.bfloat16``).
        param_dtype: the storage dtype of their params.
        implementation: the attention kernel (see :func:`fundl.dot_product_attention`);
            ``None`` picks per backend and dtype.
        remat: recompute the block's activations in the backward pass (see
            :func:`fundl.remat`): ``None`` (the default) keeps them; ``True`` keeps only the
            block's input; a policy from ``jax.checkpoint_policies`` (e.g.
            ``dots_saveable``) keeps what it names. The same params, outputs and
            gradients; less activation memory for up to one more forward pass.

    Returns:
        A :class:`~fundl.Layer` mapping ``(batch, time, features)`` to the same shape.
    """
    return _block(
        "decoder_block", features, num_heads, mlp_features=mlp_features,
        num_kv_heads=num_kv_heads, dropout_rate=dropout_rate,
        attention_dropout_rate=attention_dropout_rate, is_causal=True, rope_base=rope_base,
        decode=decode, norm=norm, dtype=dtype, param_dtype=param_dtype,
        implementation=implementation, remat=remat,
    )  # fmt: skip
