"""Convolutions in 1-D, 2-D and 3-D, channels-last: ``conv`` and ``conv_transpose``.

Both are one call to ``jax.lax.conv_general_dilated``; the layers add shape checks that
explain themselves, the padding modes and the params.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.nn import initializers

from fundl import _windows as win
from fundl.core import Layer, check_floating, default_float_dtype, named, renamed

__all__ = ["conv", "conv_transpose"]

Initializer = Callable[..., jax.Array]

default_w_init: Initializer = initializers.glorot_uniform()
"""Glorot (Xavier) uniform over the receptive field, as Keras's ``Conv2D``."""


def _build(
    kind: str,
    features: int,
    kernel_size: int | Sequence[int],
    strides: int | Sequence[int],
    padding: win.PaddingLike,
    dilation: int | Sequence[int],
    groups: int,
) -> tuple[str, Callable[[Any], win.Window]]:
    """Checks the constructor arguments.

    Returns:
        The layer's name, and ``window_for(x)``: checks an input ``(batch, *spatial,
        channels)`` and returns the window spelled out for its spatial axes.
    """
    name = win.describe(
        f"{kind}({features!r}, {kernel_size!r}",
        strides=None if strides == 1 else strides,
        padding=None if padding == "SAME" else padding,
        dilation=None if dilation == 1 else dilation,
        groups=None if groups == 1 else groups,
    )
    if not isinstance(features, int) or features < 1:
        raise ValueError(f"{name}: features must be a positive int, got {features!r}.")
    rank = win.fixed_rank(kernel_size)  # None: read from each input
    spell = partial(win.window, name, "kernel_size", kernel_size, strides, dilation, padding)
    spell(rank)  # what can be checked before the input is known
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{name}: groups must be a positive int, got {groups!r}.")
    if features % groups:
        raise ValueError(
            f"{name}: features={features} is not divisible by groups={groups}; each "
            f"group needs the same number of output features. Use a multiple of {groups}."
        )

    def window_for(x):
        n = win.spatial_axes(
            name, x, rank, "kernel_size", strides=strides, dilation=dilation, padding=padding
        )
        check_floating(name, x)
        channels = x.shape[-1]
        if channels % groups:
            raise ValueError(
                f"{name}: the input has {channels} features (channels), not divisible by "
                f"groups={groups}. Each group convolves channels / groups of them: use a groups "
                f"value that divides {channels} (groups={channels} is depthwise)."
            )
        return spell(n)

    return name, window_for


def _init_params(key, x, kernel, groups, features, use_bias, w_init, b_init, param_dtype):
    pdtype = param_dtype or default_float_dtype()
    wkey, bkey = jax.random.split(key)
    params = {"w": w_init(wkey, (*kernel, x.shape[-1] // groups, features), pdtype)}
    if use_bias:
        params["b"] = b_init(bkey, (features,), pdtype)
    return params


def _check_params(name: str, params, x, groups: int) -> None:
    expected = x.shape[-1] // groups
    got = params["w"].shape[-2]
    if got != expected:
        raise ValueError(
            f"{name}: the input has {x.shape[-1]} features, so w needs {expected} input "
            f"features per group, but w has shape {params['w'].shape} ({got}). Feed inputs "
            f"with {got * groups} features or re-init the params on this input."
        )


def _crops(w: win.Window, spans: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """The (lo, hi) padding of the conv a ``conv_transpose`` transposes, per axis."""
    if w.padding == "VALID":
        return ((0, 0),) * len(spans)
    if isinstance(w.padding, tuple):
        return w.padding
    pads = []
    for k, s in zip(spans, w.strides, strict=True):
        total = k - s  # output n * s; negative when the kernel is shorter than the stride
        lo = 0 if w.padding == "CAUSAL" else max(total, 0) // 2
        pads.append((lo, total - lo))
    return tuple(pads)


@renamed(out_features="features")
def conv(
    features: int,
    kernel_size: int | Sequence[int],
    strides: int | Sequence[int] = 1,
    padding: win.PaddingLike = "SAME",
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    use_bias: bool = True,
    w_init: Initializer = default_w_init,
    b_init: Initializer = initializers.zeros,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype | None = None,
) -> Layer:
    r"""A convolution over 1, 2 or 3 spatial axes, channels-last.

    Like every deep-learning library, it computes a cross-correlation (no kernel flip). The
    number of spatial axes is read from the input ``(batch, *spatial, in_features)`` when
    ``kernel_size`` is an int, which is then the size on every spatial axis (``conv(8, 3)``
    on images is 3x3, as Keras's ``Conv2D(8, 3)``); a tuple ``kernel_size`` fixes it to
    ``len(kernel_size)`` and inputs of another rank are an error. For a 2-D kernel and input
    ``x`` of shape ``(batch, height, width, in_features)``:

    .. math::

        y[b, i, j, o] = \sum_{u, v, c} x_{pad}[b,\ i s_0 + u d_0,\ j s_1 + v d_1,\ c]\,
        w[u, v, c, o] + b[o]

    with strides :math:`s`, dilation :math:`d`, and ``c`` running over the ``in_features /
    groups`` channels of the group of output ``o``.

    Params: ``{"w": (*kernel, in_features // groups, features), "b": (features,)}``, with
    ``kernel`` the size per spatial axis (no ``"b"`` when ``use_bias=False``).

    Output size along a spatial axis of size ``n`` (``k`` the dilated kernel
    ``d * (size - 1) + 1``, ``s`` the stride): "SAME" ``ceil(n / s)`` (zeros added, the
    extra one on the high side); "VALID" ``floor((n - k) / s) + 1`` (no padding; the input
    must be at least ``k`` long); "CAUSAL" (1-D only) ``ceil(n / s)``, padding ``k - 1``
    zeros before the sequence only, so output ``t`` sees no input after ``t``; explicit
    pairs ``((lo, hi), ...)`` or an int ``p`` (``(p, p)`` everywhere)
    ``floor((n + lo + hi - k) / s) + 1``.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> layer = fl.conv(8, 3, strides=2)  # 3x3 on images
        >>> params, state = layer.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
        >>> jax.tree_util.tree_map(jnp.shape, params)
        {'b': (8,), 'w': (3, 3, 1, 8)}
        >>> layer.apply(params, state, jnp.ones((4, 28, 28, 1)))[0].shape
        (4, 14, 14, 8)

    Args:
        features: the number of output channels; a multiple of ``groups``.
        kernel_size: the window: an int for that size on every spatial axis of the input, or
            one int per spatial axis (which fixes the number of spatial axes).
        strides: the step of the window, an int for every axis or one per axis.
        padding: "SAME", "VALID", "CAUSAL" (1-D), an int, or one ``(lo, hi)`` pair per
            spatial axis.
        dilation: the kernel dilation (atrous convolution), an int or one per axis.
        groups: split the input channels into ``groups`` groups convolved separately
            (``groups == in_features`` is a depthwise convolution); must divide
            ``in_features`` and ``features``.
        use_bias: add the bias ``b``.
        w_init: initializer for ``w`` (default glorot uniform, as Keras; the fan-in is
            ``prod(kernel) * in_features / groups``).
        b_init: initializer for ``b`` (default zeros).
        dtype: the compute dtype; inputs and params are cast to it. ``None`` computes in the
            input's dtype.
        param_dtype: the storage dtype of the params; ``None`` means float32, or float64
            when ``jax_enable_x64`` is on.

    Returns:
        A :class:`~fundl.Layer` mapping ``(batch, *spatial, in_features)`` to ``(batch,
        *out_spatial, features)``.
    """
    name, window_for = _build("conv", features, kernel_size, strides, padding, dilation, groups)

    def window_and_pads(x):
        w = window_for(x)
        sizes = tuple(x.shape[1:-1])
        pads = win.forward_pads(w.padding, sizes, win.dilated(w.shape, w.dilation), w.strides)
        win.check_fits(name, sizes, w.shape, w.dilation, pads, padding)
        return w, pads

    def init(key, x):
        w, _ = window_and_pads(x)
        params = _init_params(
            key, x, w.shape, groups, features, use_bias, w_init, b_init, param_dtype
        )
        return params, ()

    def apply(params, state, x, key=None, train=False):
        del key, train
        w, pads = window_and_pads(x)
        _check_params(name, params, x, groups)
        cdtype = dtype or x.dtype
        n = len(w.shape)
        y = lax.conv_general_dilated(
            x.astype(cdtype),
            params["w"].astype(cdtype),
            window_strides=w.strides,
            padding=pads,
            rhs_dilation=w.dilation,
            dimension_numbers=win.dimension_numbers(n),
            feature_group_count=groups,
        )
        if use_bias:
            y = y + params["b"].astype(cdtype).reshape((1,) * (n + 1) + (features,))
        return y, state

    return named(Layer(init, apply), name)


@renamed(out_features="features")
def conv_transpose(
    features: int,
    kernel_size: int | Sequence[int],
    strides: int | Sequence[int] = 1,
    padding: win.PaddingLike = "SAME",
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    use_bias: bool = True,
    w_init: Initializer = default_w_init,
    b_init: Initializer = initializers.zeros,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype | None = None,
) -> Layer:
    r"""A transposed convolution ("deconvolution"): upsamples by ``strides``, for decoders.

    Each input position scatters a copy of the kernel, scaled by its value, into the output
    (the definition of PyTorch's ``ConvTranspose`` and TensorFlow's ``conv2d_transpose``):
    in 1-D, with stride ``s``, dilation ``d`` and low padding ``p``,

    .. math::

        y[b, i s + u d - p, o] \mathrel{+}= \sum_c x[b, i, c]\, w[u, c, o], \qquad
        y \mathrel{+}= b[o]

    so it is the transpose (the gradient with respect to its input) of :func:`conv` with
    the same strides, dilation and padding, and maps that conv's output shape back to its
    input shape. Implemented as a stride-1 ``lax.conv_general_dilated`` of the input
    dilated by ``strides`` with the spatially flipped kernel.

    Params: ``{"w": (*kernel, in_features // groups, features), "b": (features,)}``, with
    ``kernel`` the size per spatial axis.

    Output size along a spatial axis of size ``n`` (``k = d * (size - 1) + 1``): "SAME" and
    "CAUSAL" (1-D; output ``t`` sees no input after position ``t // s``) ``n * s``; "VALID"
    ``(n - 1) * s + k``; explicit pairs ``(lo, hi)`` (the padding of the conv it
    transposes: that much is cropped from each end) ``(n - 1) * s + k - lo - hi``.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> layer = fl.conv_transpose(3, 4, strides=2)  # 4x4 on images
        >>> params, state = layer.init(jax.random.key(0), jnp.zeros((1, 7, 7, 16)))
        >>> layer.apply(params, state, jnp.ones((2, 7, 7, 16)))[0].shape
        (2, 14, 14, 3)

    Args:
        features: the number of output channels; a multiple of ``groups``.
        kernel_size: the window: an int for that size on every spatial axis of the input, or
            one int per spatial axis (which fixes the number of spatial axes).
        strides: the upsampling factor, an int for every axis or one per axis.
        padding: "SAME", "VALID", "CAUSAL" (1-D), an int, or one ``(lo, hi)`` pair per axis.
        dilation: the kernel dilation, an int or one per axis.
        groups: as in :func:`conv`; must divide ``in_features`` and ``features``.
        use_bias: add the bias ``b``.
        w_init: initializer for ``w`` (default glorot uniform).
        b_init: initializer for ``b`` (default zeros).
        dtype: the compute dtype (``None``: the input's).
        param_dtype: the storage dtype of the params (``None``: float32, or float64 under
            ``jax_enable_x64``).

    Returns:
        A :class:`~fundl.Layer` mapping ``(batch, *spatial, in_features)`` to ``(batch,
        *out_spatial, features)``.
    """
    name, window_for = _build(
        "conv_transpose", features, kernel_size, strides, padding, dilation, groups
    )

    def window_and_pads(x):
        w = window_for(x)
        spans = win.dilated(w.shape, w.dilation)
        cropped = _crops(w, spans)
        for axis, (size, k, s, (lo, hi)) in enumerate(
            zip(x.shape[1:-1], spans, w.strides, cropped, strict=True)
        ):
            if (size - 1) * s + k - lo - hi < 1:
                raise ValueError(
                    f"{name}: padding {padding!r} crops {lo + hi} from spatial axis {axis}, "
                    f"whose full output is only {(size - 1) * s + k} long. Use less padding."
                )
        pads = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(spans, cropped, strict=True))
        return w, pads

    def init(key, x):
        w, _ = window_and_pads(x)
        params = _init_params(
            key, x, w.shape, groups, features, use_bias, w_init, b_init, param_dtype
        )
        return params, ()

    def apply(params, state, x, key=None, train=False):
        del key, train
        w, pads = window_and_pads(x)
        _check_params(name, params, x, groups)
        cdtype = dtype or x.dtype
        n = len(w.shape)
        kernel = jnp.flip(params["w"].astype(cdtype), axis=tuple(range(n)))
        y = lax.conv_general_dilated(
            x.astype(cdtype),
            kernel,
            window_strides=(1,) * n,
            padding=pads,
            lhs_dilation=w.strides,
            rhs_dilation=w.dilation,
            dimension_numbers=win.dimension_numbers(n),
            feature_group_count=groups,
        )
        if use_bias:
            y = y + params["b"].astype(cdtype).reshape((1,) * (n + 1) + (features,))
        return y, state

    return named(Layer(init, apply), name)
