"""Pooling, channels-last: ``max_pool`` and ``avg_pool`` over windows, and global pooling.

The windowed pools are one ``jax.lax.reduce_window`` each; they have no params and no state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from fundl import _windows as win
from fundl.core import Layer, check_floating, named

__all__ = ["max_pool", "avg_pool", "global_avg_pool", "global_max_pool"]


def _check_pool_padding(name: str, padding: win.PaddingLike, w: win.Window) -> None:
    if isinstance(w.padding, tuple) and any(
        max(p) >= size for p, size in zip(w.padding, w.shape, strict=True)
    ):
        raise ValueError(
            f"{name}: explicit padding {padding!r} must be smaller than the window {w.shape} "
            f"on every axis, or some windows would cover only padding."
        )


def _pool(
    kind: str,
    window: int | Sequence[int],
    strides: int | Sequence[int] | None,
    padding: win.PaddingLike,
    reduce: Callable[[jax.Array, tuple[int, ...], tuple[int, ...], tuple], jax.Array],
) -> Layer:
    name = win.describe(
        f"{kind}({window!r}",
        strides=strides,
        padding=None if padding == "VALID" else padding,
    )
    rank = win.fixed_rank(window)  # None: read from each input
    spell = partial(win.window, name, "window", window, strides, 1, padding)
    _check_pool_padding(name, padding, spell(rank))  # what can be checked before the input

    def window_and_pads(x):
        n = win.spatial_axes(name, x, rank, "window", strides=strides, padding=padding)
        check_floating(name, x)
        w = spell(n)
        _check_pool_padding(name, padding, w)
        sizes = tuple(x.shape[1:-1])
        pads = win.forward_pads(w.padding, sizes, w.shape, w.strides)
        win.check_fits(name, sizes, w.shape, w.dilation, pads, padding, what="window")
        return w, pads

    def init(key, x):
        del key
        window_and_pads(x)
        return (), ()

    def apply(params, state, x, key=None, train=False):
        del params, key, train
        w, pads = window_and_pads(x)
        return reduce(x, (1, *w.shape, 1), (1, *w.strides, 1), ((0, 0), *pads, (0, 0))), state

    return named(Layer(init, apply), name)


def max_pool(
    window: int | Sequence[int],
    strides: int | Sequence[int] | None = None,
    padding: win.PaddingLike = "VALID",
) -> Layer:
    r"""Max pooling: the largest value in each window, per channel.

    For a 2-D window :math:`(h, w)` and strides :math:`(s_0, s_1)`:
    :math:`y[b, i, j, c] = \max_{u < h,\, v < w} x_{pad}[b, i s_0 + u, j s_1 + v, c]`, with
    padding by :math:`-\infty` (padding never wins).

    Example:
        >>> import jax.numpy as jnp, fundl as fl
        >>> pool = fl.max_pool((2, 2))
        >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
        >>> y, _ = pool.apply((), (), x)
        >>> y[0, :, :, 0]
        Array([[ 5.,  7.],
               [13., 15.]], dtype=float32)

    Args:
        window: the window: an int for that size on every spatial axis of the input
            (``2`` on images is 2x2), or one int per spatial axis (which fixes the number of
            spatial axes).
        strides: the step, an int or one per axis; ``None`` (default) steps by the window,
            so windows do not overlap (as Keras and PyTorch).
        padding: "VALID" (default), "SAME", "CAUSAL" (1-D) or ``(lo, hi)`` pairs; output sizes
            as in :func:`fundl.conv`.

    Returns:
        A :class:`~fundl.Layer` mapping ``(batch, *spatial, features)`` to ``(batch,
        *pooled, features)``.
    """

    def reduce(x, dims, steps, pads):
        # A Python scalar init lets lax recognise the max monoid (a jnp.array under jit
        # does not, and the generic reduce_window has no reverse-mode derivative).
        return lax.reduce_window(x, -jnp.inf, lax.max, dims, steps, pads)

    return _pool("max_pool", window, strides, padding, reduce)


def avg_pool(
    window: int | Sequence[int],
    strides: int | Sequence[int] | None = None,
    padding: win.PaddingLike = "VALID",
) -> Layer:
    r"""Average pooling: the mean of each window, per channel.

    Padded positions are left out of the mean (as Keras and TensorFlow; PyTorch's
    ``count_include_pad=False``): a window that overhangs the border averages the values it
    covers. For a 2-D window :math:`(h, w)`: :math:`y[b, i, j, c] = \frac{1}{|W_{ij}|}
    \sum_{(p, q) \in W_{ij}} x[b, p, q, c]`, where :math:`W_{ij}` is the set of in-range
    positions of window :math:`(i, j)`.

    Example:
        >>> import jax.numpy as jnp, fundl as fl
        >>> pool = fl.avg_pool(2)  # 2x2 on images
        >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
        >>> y, _ = pool.apply((), (), x)
        >>> y[0, :, :, 0]
        Array([[ 2.5,  4.5],
               [10.5, 12.5]], dtype=float32)

    Args:
        window: the window: an int for that size on every spatial axis of the input, or one
            int per spatial axis (which fixes the number of spatial axes).
        strides: the step, an int or one per axis; ``None`` (default) steps by the window.
        padding: "VALID" (default), "SAME", "CAUSAL" (1-D) or ``(lo, hi)`` pairs.

    Returns:
        A :class:`~fundl.Layer` mapping ``(batch, *spatial, features)`` to ``(batch,
        *pooled, features)``.
    """

    def reduce(x, dims, steps, pads):
        total = lax.reduce_window(x, 0.0, lax.add, dims, steps, pads)
        if all(p == (0, 0) for p in pads):
            return total / jnp.array(math.prod(dims), x.dtype)
        ones = jnp.ones((1, *x.shape[1:-1], 1), x.dtype)  # count the in-range positions
        counts = lax.reduce_window(ones, 0.0, lax.add, dims, steps, pads)
        return total / counts

    return _pool("avg_pool", window, strides, padding, reduce)


def _global(kind: str, fn: Callable[..., jax.Array], keepdims: bool) -> Layer:
    name = f"{kind}()"

    def check(x):
        if x.ndim < 3:
            raise ValueError(
                f"{name}: input has shape {tuple(x.shape)}, expected (batch, *spatial, "
                f"features) with at least one spatial axis (rank >= 3)."
            )
        check_floating(name, x)

    def init(key, x):
        del key
        check(x)
        return (), ()

    def apply(params, state, x, key=None, train=False):
        del params, key, train
        check(x)
        return fn(x, axis=tuple(range(1, x.ndim - 1)), keepdims=keepdims), state

    return named(Layer(init, apply), name)


def global_avg_pool(keepdims: bool = False) -> Layer:
    """The mean over all spatial axes: ``(batch, *spatial, features) -> (batch, features)``.

    Example:
        >>> import jax.numpy as jnp, fundl as fl
        >>> fl.global_avg_pool().apply((), (), jnp.ones((2, 5, 5, 3)))[0].shape
        (2, 3)

    Args:
        keepdims: keep the spatial axes with size 1: ``(batch, 1, ..., 1, features)``.
    """
    return _global("global_avg_pool", jnp.mean, keepdims)


def global_max_pool(keepdims: bool = False) -> Layer:
    """The maximum over all spatial axes: ``(batch, *spatial, features) -> (batch, features)``.

    Args:
        keepdims: keep the spatial axes with size 1: ``(batch, 1, ..., 1, features)``.
    """
    return _global("global_max_pool", jnp.max, keepdims)
