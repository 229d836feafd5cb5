"""Shared plumbing of the sliding-window layers (conv, conv_transpose, pooling).

Argument normalisation, the channels-last dimension numbers and the padding arithmetic,
with the error messages the layers raise. Private: the public layers are in ``fundl.conv``
and ``fundl.pooling``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

from jax import lax

PaddingLike = str | int | Sequence[tuple[int, int]]

_SPATIAL_NAMES = {1: "length", 2: "height, width", 3: "depth, height, width"}


def spatial_names(n: int) -> str:
    """``"height, width"`` for 2 spatial axes, ``"d1, ..., d4"`` for 4."""
    return _SPATIAL_NAMES.get(n, f"d1, ..., d{n}")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def window_shape(who: str, what: str, value: Any) -> tuple[int, ...]:
    """A kernel or window size: an int is 1-D, a sequence gives one size per spatial axis."""
    sizes = (value,) if _is_int(value) else value
    if (
        not isinstance(sizes, Sequence)
        or isinstance(sizes, str)
        or len(sizes) == 0
        or not all(_is_int(v) for v in sizes)
    ):
        raise TypeError(
            f"{who}: {what} must be an int (1-D) or a tuple of ints, one per spatial axis, "
            f"got {value!r}. E.g. (3, 3) for images."
        )
    if any(v < 1 for v in sizes):
        raise ValueError(
            f"{who}: every {what} entry must be at least 1, got {tuple(sizes)}. A window of 0 "
            f"covers nothing; use 1 to leave an axis unchanged."
        )
    return tuple(int(v) for v in sizes)


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
                f"{who}: padding 'CAUSAL' is for 1-D inputs (batch, length, features); this "
                f"layer has {n} spatial axes. Use 'SAME', 'VALID' or explicit (low, high) pairs."
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


def check_rank(who: str, x: Any, n: int, what: str = "kernel") -> None:
    """Raises unless ``x`` is ``(batch, *spatial(n), features)``."""
    if x.ndim != n + 2:
        hint = ""
        if x.ndim == n + 1:
            hint = (
                " Add a batch axis (x[None]) or, for one-channel images, a channel axis "
                "(x[..., None])."
            )
        raise ValueError(
            f"{who}: input has shape {tuple(x.shape)} (rank {x.ndim}), expected rank {n + 2}: "
            f"(batch, {spatial_names(n)}, features) for a {n}-D {what}.{hint}"
        )


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
