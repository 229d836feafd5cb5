"""Dense (fully connected) layers and the reshaping layers that feed them."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.nn import initializers

from fundl.core import Layer, check_floating, default_float_dtype, flat_matmul, named

__all__ = ["dense", "flatten", "reshape"]

Initializer = Callable[..., jax.Array]

default_w_init: Initializer = initializers.glorot_uniform()
"""Glorot (Xavier) uniform, as Keras's ``Dense``."""


def _bias_shape(b: jax.Array, ndim: int) -> jax.Array:
    """Reshapes a ``(features,)`` bias to broadcast explicitly against ``ndim``-d outputs."""
    return b.reshape((1,) * (ndim - 1) + b.shape)


def dense(
    features: int,
    *,
    use_bias: bool = True,
    w_init: Initializer = default_w_init,
    b_init: Initializer = initializers.zeros,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype | None = None,
) -> Layer:
    r"""A fully connected layer: :math:`y = x W + b`.

    Acts on the last axis, so inputs may be ``(batch, in)`` or ``(batch, time, in)``.

    Params: ``{"w": (in, features), "b": (features,)}`` (no ``"b"`` when ``use_bias=False``).

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> layer = fl.dense(4)
        >>> params, state = layer.init(jax.random.key(0), jnp.zeros((1, 3)))
        >>> jax.tree_util.tree_map(jnp.shape, params)
        {'b': (4,), 'w': (3, 4)}

    Args:
        features: the output size.
        use_bias: add the bias ``b``.
        w_init: initializer for ``w``, from ``jax.nn.initializers`` (default glorot uniform,
            as Keras).
        b_init: initializer for ``b`` (default zeros).
        dtype: the compute dtype (e.g. ``jnp.bfloat16``); inputs and params are cast to it.
            ``None`` computes in the input's dtype.
        param_dtype: the storage dtype of the params; ``None`` means float32, or float64
            when ``jax_enable_x64`` is on.

    Returns:
        A :class:`~fundl.Layer` mapping ``(..., in)`` to ``(..., features)``.
    """
    if not isinstance(features, int) or features < 1:
        raise ValueError(f"dense(features): features must be a positive int, got {features!r}.")
    name = f"dense({features})"

    def check(x):
        if jnp.ndim(x) < 1:
            raise ValueError(
                f"{name}: input is a scalar, expected shape (..., in_features). "
                f"Add a feature axis, e.g. x[..., None]."
            )
        check_floating(name, x, "Cast it, e.g. x.astype(jnp.float32), or use fl.embedding.")

    def init(key, x):
        check(x)
        pdtype = param_dtype or default_float_dtype()
        wkey, bkey = jax.random.split(key)
        params = {"w": w_init(wkey, (x.shape[-1], features), pdtype)}
        if use_bias:
            params["b"] = b_init(bkey, (features,), pdtype)
        return params, ()

    def apply(params, state, x, key=None, train=False):
        del key, train
        check(x)
        w = params["w"]
        if x.shape[-1] != w.shape[0]:
            raise ValueError(
                f"{name}: input has last dimension {x.shape[-1]}, params expect {w.shape[0]}. "
                f"Feed inputs of shape (..., {w.shape[0]}) or re-init the params on this input."
            )
        cdtype = dtype or x.dtype
        y = flat_matmul(x.astype(cdtype), w.astype(cdtype))
        if use_bias:
            y = y + _bias_shape(params["b"].astype(cdtype), y.ndim)
        return y, state

    return named(Layer(init, apply), name)


def flatten() -> Layer:
    """Flattens every axis but the first: ``(batch, d1, d2, ...) -> (batch, d1 * d2 * ...)``."""

    def init(key, x):
        del key
        if jnp.ndim(x) < 1:
            raise ValueError("flatten: input is a scalar, expected shape (batch, ...).")
        return (), ()

    def apply(params, state, x, key=None, train=False):
        del params, key, train
        return x.reshape(x.shape[0], -1), state

    return named(Layer(init, apply), "flatten")


def reshape(shape: Sequence[int]) -> Layer:
    """Reshapes every axis but the first: ``(batch, ...) -> (batch, *shape)``.

    Args:
        shape: the new shape of one example; one entry may be ``-1``.
    """
    shape = tuple(shape)
    name = f"reshape({shape})"

    def check(x):
        size = math.prod(x.shape[1:])
        known = math.prod(d for d in shape if d != -1)
        ok = size % known == 0 if -1 in shape else size == known
        if not ok:
            raise ValueError(
                f"{name}: cannot reshape examples of shape {tuple(x.shape[1:])} ({size} values) "
                f"to {shape}."
            )

    def init(key, x):
        del key
        check(x)
        return (), ()

    def apply(params, state, x, key=None, train=False):
        del params, key, train
        check(x)
        return x.reshape((x.shape[0], *shape)), state

    return named(Layer(init, apply), name)
