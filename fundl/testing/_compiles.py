"""Counting XLA compilations, to assert that a jitted step does not recompile.

:func:`count_compiles` counts the compilations inside a block; :func:`assert_compiles_once`
watches a step through a loop and fails, naming the arguments whose shapes, dtypes or Python
values changed, when a call after the first compiled again. :func:`signature` and
:func:`changes` are the parts that name them (``fundl.bench`` reports recompiles with them).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compiles() -> Iterator[list[str]]:
    """Counts XLA compilations inside the ``with`` block.

    Yields a list that receives one entry per backend compilation; use it to assert that a
    jitted step does not recompile on its second call.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from fundl.testing import count_compiles
        >>> step = jax.jit(lambda x: x * 2)
        >>> _ = step(jnp.ones(3))
        >>> with count_compiles() as compiles:
        ...     _ = step(jnp.ones(3))
        >>> len(compiles)
        0
    """
    events: list[str] = []

    def listener(event: str, duration: float, **kwargs: Any) -> None:
        del duration, kwargs  # the listener's signature; only the event's name is counted
        if event == _COMPILE_EVENT:
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _describe(leaf: Any) -> str:
    """What of ``leaf`` a jitted function compiles for: ``float32[4,3]`` or a Python value."""
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        weak = getattr(getattr(leaf, "aval", None), "weak_type", False)
        dims = ",".join(str(d) for d in leaf.shape)
        return f"{leaf.dtype}[{dims}]" + (" (weakly typed)" if weak else "")
    return f"{type(leaf).__name__} {leaf!r}"


def _named_args(fn: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``{parameter name: value}`` of a call (``arg0``, ``arg1``... where names are unknown)."""
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
    except (TypeError, ValueError):  # no signature, or one these arguments do not fit
        return {**{f"arg{i}": a for i, a in enumerate(args)}, **kwargs}
    named = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            named |= {f"{name}[{i}]": v for i, v in enumerate(value)}
        elif kind is inspect.Parameter.VAR_KEYWORD:
            named |= value
        else:
            named[name] = value
    return named


def signature(fn: Callable, args: tuple, kwargs: dict | None = None) -> dict[str, str]:
    """What a call of ``fn`` compiles for: each argument's leaves' shapes and dtypes.

    Args:
        fn: the function called (its parameter names name the arguments).
        args: the positional arguments of the call.
        kwargs: its keyword arguments.

    Returns:
        ``{argument path: description}``, e.g. ``{"x": "float32[4,3]", "n": "int 2",
        "ts.params['w']": "float32[3,2]"}``: arrays by shape and dtype, other leaves (static
        arguments, Python scalars) by value.

    Example:
        >>> import jax.numpy as jnp
        >>> from fundl.testing._compiles import signature
        >>> signature(lambda x, n: x, (jnp.ones((2, 3)), 4))
        {'x': 'float32[2,3]', 'n': 'int 4'}
    """
    out = {}
    for name, value in _named_args(fn, args, kwargs or {}).items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(value)[0]:
            out[name + jax.tree_util.keystr(path)] = _describe(leaf)
    return out


def _few(values: list[str]) -> str:
    return (
        ", ".join(values)
        if len(values) <= 3
        else f"{', '.join(values[:3])}, ... ({len(values)} in all)"
    )


def changes(first: dict[str, str], later: Sequence[dict[str, str]]) -> list[str]:
    """The arguments whose :func:`signature` s in ``later`` differ from ``first``.

    One line per argument, its first description then the different ones seen later, e.g.
    ``"x: float32[4] -> float32[5], float32[6]"``; an argument (or a leaf of one) present
    in one call only reads ``absent``.
    """
    seen: dict[str, dict[str, None]] = {}
    for now in later:
        for n in [*first, *(k for k in now if k not in first)]:
            if first.get(n) != now.get(n):
                seen.setdefault(n, {})[now.get(n, "absent")] = None
    return [f"{n}: {first.get(n, 'absent')} -> {_few(list(new))}" for n, new in seen.items()]


def why_recompiled(first: dict[str, str], later: Sequence[dict[str, str]]) -> str:
    """The :func:`changes` of the calls that compiled again, or that no argument changed."""
    changed = changes(first, later)
    if changed:
        return "the arguments that changed since the first call: " + "; ".join(changed)
    return (
        "no argument's shape, dtype or Python value changed (a new jax.jit per call, or a "
        "jitted function closed over a changing Python value?)"
    )


class Call(NamedTuple):
    """One call seen by :func:`assert_compiles_once`: its :func:`signature` and compilations."""

    signature: dict[str, str]
    compiles: int


class _Watched:
    """``fn`` that records each call's :class:`Call` in ``calls``."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.calls: list[Call] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        sig = signature(self.fn, args, kwargs)
        with count_compiles() as compiles:
            out = self.fn(*args, **kwargs)
        self.calls.append(Call(sig, len(compiles)))
        return out


def recompile_message(name: str, calls: list[Call]) -> str | None:
    """Why ``name`` compiled again after its first call, or ``None`` where it did not."""
    again = [i for i, call in enumerate(calls) if i > 0 and call.compiles]
    if not again:
        return None
    why = why_recompiled(calls[0].signature, [calls[i].signature for i in again])
    calls_s = ", ".join(str(i + 1) for i in again)
    return (
        f"{name} compiled again after its first call (on call(s) {calls_s} of {len(calls)}): "
        f"{why}. Keep every argument's shape and dtype fixed (pad the last batch), and mark "
        "Python values that change as traced arrays, not static arguments."
    )


@contextlib.contextmanager
def assert_compiles_once(step: Callable) -> Iterator[Callable]:
    """Fails when ``step`` compiles again after its first call inside the ``with`` block.

    Yields ``step`` wrapped to watch it: call the wrapper in the block as you call ``step``
    (a training loop feeding each call's outputs to the next). On leaving the block, an
    ``AssertionError`` names the call that compiled and the arguments whose shapes, dtypes or
    Python values changed since the first call (where none did, it says so: a new
    ``jax.jit`` per call, or a closure over a changing value). The first call may compile.

    Args:
        step: the function to watch, e.g. ``fl.make_train_step(...)``.

    Raises:
        AssertionError: a call after the first compiled.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from fundl.testing import assert_compiles_once
        >>> step = jax.jit(lambda x: x + 1)
        >>> with assert_compiles_once(step) as watched:
        ...     x = watched(jnp.zeros(3))
        ...     x = watched(x)
        >>> x
        Array([2., 2., 2.], dtype=float32)
    """
    watched = _Watched(step)
    yield watched
    name = getattr(step, "__name__", type(step).__name__)
    message = recompile_message(name, watched.calls)
    if message is not None:
        raise AssertionError(message)
