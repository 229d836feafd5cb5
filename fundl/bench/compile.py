"""Compilation: its cost split into trace, lower and compile, and recompiles reported.

:func:`compile_cost` runs JAX's ahead-of-time stages of a jitted function
(``f.trace(*args)``, ``.lower()``, ``.compile()``) and times each; :class:`RecompileWarning`
is what :func:`fundl.bench.compare` warns when a callable compiled again after its first call,
naming the arguments that changed (``fundl.testing.assert_compiles_once`` fails a test on
the same finding).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple


class RecompileWarning(UserWarning):
    """A timed callable compiled again after its first call: its times include compiling."""


class CompileCost(NamedTuple):
    """Seconds spent in each stage of compiling a jitted function for some arguments.

    Attributes:
        trace_s: tracing the Python function to a jaxpr (``jax.jit(f).trace(*args)``).
        lower_s: lowering the jaxpr to StableHLO (``.lower()``).
        compile_s: XLA compiling it (``.compile()``).
    """

    trace_s: float
    lower_s: float
    compile_s: float

    @property
    def total_s(self) -> float:
        """The three stages together."""
        return self.trace_s + self.lower_s + self.compile_s


def _stage(run: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = run()
    return out, time.perf_counter() - t0


def compile_cost(jitted: Any, *args: Any) -> tuple[CompileCost, Any]:
    """Traces, lowers and compiles ``jitted`` for ``args``, timing each stage.

    Run it before the function's first call: once the function ran, JAX's caches make the
    stages nearly free.

    Args:
        jitted: a ``jax.jit`` function (it has ``.trace``).
        *args: arguments (arrays or ``jax.ShapeDtypeStruct``) as the calls pass them.

    Returns:
        ``(CompileCost, the jax.stages.Compiled)``; the compiled object feeds
        :func:`fundl.bench.xla_costs`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from fundl.bench import compile_cost
        >>> cost, compiled = compile_cost(jax.jit(jnp.sin), jnp.ones(3))
        >>> cost.total_s > 0
        True
    """
    traced, trace_s = _stage(lambda: jitted.trace(*args))
    lowered, lower_s = _stage(traced.lower)
    compiled, compile_s = _stage(lowered.compile)
    return CompileCost(trace_s, lower_s, compile_s), compiled
