"""Shared plumbing of the sliding-window layers (conv, conv_transpose, pooling).

Argument normalisation, the channels-last dimension numbers and the padding arithmetic,
with the error messages the layers raise. Private: the public layers are in ``fundl.conv``
and ``fundl.pooling``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

from jax import lax

PaddingLike = str | int | Sequence[tuple[int, int]]

_SPATIAL_NAMES = {1: "length", 2: "height, width", 3: "depth, height, width"}


def spatial_names(n: int) -> str:
    """``"height, width"`` for 2 spatial axes, ``"d1, ..., d4"`` for 4."""
    return _SPATIAL_NAMES.get(n, f"d1, ..., d{n}")


def _count(n: int, one: str, many: str) -> str:
    """``"1 entry"``, ``"2 entries"``."""
    return f"{n} {one if n == 1 else many}"


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def window_shape(who: str, what: str, value: Any, n: int) -> tuple[int, ...]:
    """A kernel or window size for ``n`` spatial axes: an int is that size on every axis."""
    sizes = (value,) * n if _is_int(value) else value
    if (
        not isinstance(sizes, Sequence)
        or isinstance(sizes, str)
        or len(sizes) == 0
        or not all(_is_int(v) for v in sizes)
    ):
        raise TypeError(
            f"{who}: {what} must be an int (that size on every spatial axis) or a tuple of "
            f"ints, one per spatial axis, got {value!r}. E.g. 3 or (3, 3) for images."
        )
    if any(v < 1 for v in sizes):
        raise ValueError(
            f"{who}: every {what} entry must be at least 1, got {tuple(sizes)}. A window of 0 "
            f"covers nothing; use 1 to leave an axis unchanged."
        )
    return tuple(int(v) for v in sizes)


def _is_tuple(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str)


def fixed_rank(size: Any) -> int | None:
    """The number of spatial axes a kernel or window size fixes: its length, ``None`` for an int."""
    return len(size) if _is_tuple(size) else None


class Window(NamedTuple):
    """A sliding window's arguments spelled out for ``len(shape)`` spatial axes.

    Attributes:
        shape: the kernel or window size per axis.
        strides: the step per axis.
        dilation: the kernel dilation per axis (all 1 for pooling).
        padding: "SAME", "VALID", "CAUSAL", or one ``(lo, hi)`` pair per axis.
    """

    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: str | tuple[tuple[int, int], ...]


def window(
    who: str, what: str, size: Any, strides: Any, dilation: Any, padding: Any, n: int | None
) -> Window:
    """Checks a window layer's arguments and spells them out for ``n`` spatial axes.

    Args:
        who: the layer's name, for errors.
        what: the size argument's name, ``"kernel_size"`` or ``"window"``.
        size: the kernel or window size, an int or one int per axis.
        strides: an int or one per axis; ``None`` steps by the window.
        dilation: an int or one per axis.
        padding: a mode, an int, or ``(lo, hi)`` pairs.
        n: the number of spatial axes; ``None`` (construction time, the rank not yet known)
            takes it from the first tuple among the arguments, else 1.
    """
    if n is None:
        n = next((len(v) for v in (size, strides, dilation, padding) if _is_tuple(v)), 1)
    shape = window_shape(who, what, size, n)
    steps = shape if strides is None else per_axis(who, "strides", strides, n)
    return Window(
        shape, steps, per_axis(who, "dilation", dilation, n), check_padding(who, padding, n)
    )


def spatial_axes(who: str, x: Any, rank: int | None, what: str, **per_axis_args: Any) -> int:
    """The number of spatial axes of ``x``, ``(batch, *spatial, features)``, checked.

    Args:
        who: the layer's name, for errors.
        x: the input, an array or ``jax.ShapeDtypeStruct``.
        rank: the number of spatial axes a tuple kernel or window fixed, or ``None`` to read
            it from ``x``.
        what: the size argument's name, ``"kernel_size"`` or ``"window"``.
        **per_axis_args: the layer's other arguments that may be per-axis tuples (strides,
            dilation, padding); with ``rank=None`` a tuple must have one entry per axis.
    """
    if rank is not None:
        check_rank(who, x, rank, what)
        return rank
    if x.ndim < 3:
        raise ValueError(
            f"{who}: input has shape {tuple(x.shape)} (rank {x.ndim}), expected (batch, "
            f"*spatial, features) with at least one spatial axis (rank >= 3). Add a batch axis "
            f"(x[None]) or, for one-channel data, a channel axis (x[..., None])."
        )
    n = x.ndim - 2
    for arg, value in per_axis_args.items():
        if _is_tuple(value) and len(value) != n:
            raise ValueError(
                f"{who}: {arg}={value!r} has {_count(len(value), 'entry', 'entries')}, but the "
                f"input has shape {tuple(x.shape)}: {_count(n, 'spatial axis', 'spatial axes')} "
                f"({spatial_names(n)}). Give {arg} one entry per spatial axis, or an int for "
                f"every axis."
            )
    return n


def per_axis(who: str, what: str, value: Any, n: int) -> tuple[int, ...]:
    """A stride or dilation: an int for every spatial axis, or a tuple of ``n`` ints >= 1."""
    values = (value,) * n if _is_int(value) else value
    if (
        not isinstance(values, Sequence)
        or isinstance(values, str)
        or len(values) != n
        or not all(_is_int(v) for v in values)
    ):
        raise TypeError(
            f"{who}: {what} must be an int or a tuple of {n} ints (one per spatial axis), "
            f"got {value!r}."
        )
    if any(v < 1 for v in values):
        raise ValueError(
            f"{who}: every {what} entry must be at least 1, got {tuple(values)}. Use 1 for "
            f"no {what}."
        )
    return tuple(int(v) for v in values)


def check_padding(who: str, padding: Any, n: int) -> str | tuple[tuple[int, int], ...]:
    """Validates ``padding``: "SAME", "VALID", "CAUSAL" (1-D), an int, or ``n`` (lo, hi) pairs.

    Returns:
        The upper-cased string, or a tuple of ``n`` ``(lo, hi)`` pairs.
    """
    if isinstance(padding, str):
        mode = padding.upper()
        if mode not in ("SAME", "VALID", "CAUSAL"):
            raise ValueError(
                f"{who}: padding must be 'SAME', 'VALID', 'CAUSAL' (1-D only), an int or a "
                f"sequence of (low, high) pairs, got {padding!r}."
            )
        if mode == "CAUSAL" and n != 1:
            raise ValueError(
                f"{who}: padding 'CAUSAL' is for 1-D inputs (batch, length, features), got "
                f"{n} spatial axes. Use 'SAME', 'VALID' or explicit (low, high) pairs."
            )
        return mode
    if _is_int(padding):
        pairs = ((padding, padding),) * n
    elif isinstance(padding, Sequence) and all(
        isinstance(p, Sequence) and len(p) == 2 and all(_is_int(v) for v in p) for p in padding
    ):
        pairs = tuple((int(lo), int(hi)) for lo, hi in padding)
    else:
        raise TypeError(
            f"{who}: padding must be 'SAME', 'VALID', 'CAUSAL' (1-D only), an int or a "
            f"sequence of {n} (low, high) pairs of ints, got {padding!r}."
        )
    if len(pairs) != n or any(v < 0 for p in pairs for v in p):
        raise ValueError(
            f"{who}: explicit padding needs {n} (low, high) pairs of non-negative ints, one per "
            f"spatial axis, got {padding!r}."
        )
    return pairs


def dilated(kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, ...]:
    """The span of a dilated kernel: ``dilation * (kernel - 1) + 1`` per axis."""
    return tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True))


def forward_pads(
    padding: str | tuple[tuple[int, int], ...],
    sizes: tuple[int, ...],
    spans: tuple[int, ...],
    strides: tuple[int, ...],
) -> tuple[tuple[int, int], ...]:
    """The (lo, hi) padding of a strided window sweep over ``sizes`` (as ``lax``'s SAME).

    "SAME" gives ``ceil(size / stride)`` outputs, the extra padding going to the high side;
    "CAUSAL" pads ``span - 1`` on the low side only.
    """
    if padding == "VALID":
        return ((0, 0),) * len(sizes)
    if padding == "CAUSAL":
        return tuple((k - 1, 0) for k in spans)
    if padding == "SAME":
        pads = []
        for n, k, s in zip(sizes, spans, strides, strict=True):
            total = max((-(-n // s) - 1) * s + k - n, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    return padding  # explicit pairs


def check_fits(
    who: str,
    sizes: tuple[int, ...],
    kernel: tuple[int, ...],
    dilation: tuple[int, ...],
    pads: tuple[tuple[int, int], ...],
    padding: Any,
    what: str = "kernel",
) -> None:
    """Raises if the (dilated) window is longer than the padded input on some axis."""
    for axis, (n, k, d, (lo, hi)) in enumerate(zip(sizes, kernel, dilation, pads, strict=True)):
        span = d * (k - 1) + 1
        if n + lo + hi < span:
            spanned = f"{what} {k}" + (f" with dilation {d}" if d != 1 else "")
            raise ValueError(
                f"{who}: the {spanned} spans {span} along spatial axis {axis}, but the input "
                f"is only {n} long there (padding {padding!r} adds {lo + hi}). Use padding "
                f"'SAME', a smaller {what}, or a larger input."
            )


def check_rank(who: str, x: Any, n: int, what: str = "kernel_size") -> None:
    """Raises unless ``x`` is ``(batch, *spatial(n), features)``.

    Args:
        who: the layer's name, for errors.
        x: the input, an array or ``jax.ShapeDtypeStruct``.
        n: the number of spatial axes the tuple ``what`` fixed.
        what: the size argument's name, ``"kernel_size"`` or ``"window"``.
    """
    if x.ndim == n + 2:
        return
    kind = "kernel" if what == "kernel_size" else what
    message = (
        f"{who}: input has shape {tuple(x.shape)} (rank {x.ndim}), expected rank {n + 2}: "
        f"(batch, {spatial_names(n)}, features) for a {n}-D {kind}."
    )
    missing_axis = x.ndim == n + 1
    if missing_axis:
        message += (
            " Add a batch axis (x[None]) or, for one-channel images, a channel axis (x[..., None])."
        )
    if x.ndim >= 3:
        m = x.ndim - 2
        message += (
            f" {'Or, f' if missing_axis else 'F'}or an input with "
            f"{_count(m, 'spatial axis', 'spatial axes')} ({spatial_names(m)}), give {what} an "
            f"int (that size on every spatial axis) or a tuple of {m}."
        )
    raise ValueError(message)


def dimension_numbers(n: int) -> lax.ConvDimensionNumbers:
    """Channels-last dimension numbers for ``n`` spatial axes.

    Inputs and outputs are ``(N, *S, C)``, kernels ``(*S, I, O)``.
    """
    io = (0, n + 1, *range(1, n + 1))
    return lax.ConvDimensionNumbers(lhs_spec=io, rhs_spec=(n + 1, n, *range(n)), out_spec=io)


def describe(base: str, **options: Any) -> str:
    """``"conv(8, (3, 3), strides=2)"``: the base arguments and the non-default options."""
    extra = "".join(f", {k}={v!r}" for k, v in options.items() if v is not None)
    return f"{base}{extra})"
