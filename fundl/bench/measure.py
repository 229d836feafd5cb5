"""Callables timed side by side: :func:`compare` for jitted functions, :func:`time_runs` for
zero-argument runs.

Both run :func:`fundl.bench.timing.run_rounds` (first call apart, warm-up, interleaved rounds
in rotating order, every output blocked on) and return a :class:`fundl.bench.Comparison`.
:func:`compare` adds, per jitted function, the compile cost in stages, XLA's cost and memory
analysis, throughput and MFU, and names the arguments that changed when a function compiled
again after its first call.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fundl.bench.compile import CompileCost, RecompileWarning, compile_cost
from fundl.bench.costs import XlaCosts, memory_high_water, mfu, peak_tflops, xla_costs
from fundl.bench.results import Comparison, Timing, environment, summarize, with_ratios
from fundl.bench.timing import Rounds, run_rounds
from fundl.testing._compiles import signature, why_recompiled

NextArgs = Callable[[tuple, Any], tuple]


def carry_first(args: tuple, out: Any) -> tuple:
    """The next call's arguments of a step ``step(state, *rest) -> (state, ...)``.

    The first output replaces the first argument; the rest stay: a train step's
    ``(train_state, batch) -> (train_state, logs)`` fed its own train state.

    Example:
        >>> from fundl.bench import carry_first
        >>> carry_first(("state 0", "batch"), ("state 1", "logs"))
        ('state 1', 'batch')
    """
    return (out[0], *args[1:])


class _Runner:
    """A zero-argument run of ``fn`` on its own arguments, fed forward by ``next_args``."""

    def __init__(self, fn: Callable, args: tuple, next_args: NextArgs | None):
        self.fn, self.args, self.next_args = fn, args, next_args
        self.last_args = args

    def __call__(self) -> Any:
        self.last_args = self.args
        out = self.fn(*self.args)
        if self.next_args is not None:
            self.args = self.next_args(self.args, out)
        return out


def _own_copy(args: tuple) -> tuple:
    """``args`` with fresh copies of its JAX arrays (a donating function deletes its own)."""
    return jax.tree_util.tree_map(lambda a: jnp.array(a) if isinstance(a, jax.Array) else a, args)


def _check(names: Sequence[str], baseline: str | None, rounds: int, who: str) -> int:
    """The baseline's index, after checking the arguments ``who`` got."""
    if not names:
        raise ValueError(f"{who}: nothing to time; pass a dict {{name: callable}}.")
    if rounds < 1:
        raise ValueError(f"{who}: rounds must be at least 1, got {rounds}.")
    if baseline is not None and baseline not in names:
        raise ValueError(
            f"{who}: baseline {baseline!r} is not one of the names {list(names)}; pass one "
            "of them, or None for the first."
        )
    return 0 if baseline is None else list(names).index(baseline)


def _finish(
    timings: list[Timing], base: int, case: str, unit: str, notes: list[str], before: int | None
) -> Comparison:
    """The :class:`Comparison`: ratios, the process's peak memory and the environment."""
    for note in notes:
        warnings.warn(note, RecompileWarning, stacklevel=3)
    after, source = memory_high_water()
    growth = after - before if after is not None and before is not None else None
    timings = with_ratios(timings, base)
    return Comparison(case, unit, tuple(timings), tuple(notes), after, growth, source,
                      environment(), timings[base].name)  # fmt: skip


def _timing(rounds: Rounds, name: str) -> Timing:
    t = summarize(name, rounds.first_s[name], rounds.wall[name], rounds.cpu[name])
    return dataclasses.replace(t, recompiles=rounds.compiles[name])


def time_runs(
    runs: Mapping[str, Callable[[], Any]],
    *,
    rounds: int = 20,
    warmup: int = 1,
    baseline: str | None = None,
    case: str = "",
    unit: str = "call",
) -> Comparison:
    """Times zero-argument ``run()`` s side by side in interleaved rounds.

    For work that is not one jitted call (a loop of steps, a whole ``fit``); jitted
    functions are better timed by :func:`compare`, which also reports their compile stages,
    FLOPs and memory, and names the arguments of a recompile. Each ``run()``'s first call is
    timed apart (its compile time), ``warmup`` more are untimed, then each runs once per
    round in rotating order, its output blocked on.

    Args:
        runs: ordered ``{name: run}``; each ``run()`` does the same work.
        rounds: interleaved rounds (timed calls of each).
        warmup: untimed calls of each after its first.
        baseline: the name the ratios divide by (``None``: the first).
        case: the comparison's title.
        unit: what one ``run()`` is.

    Returns:
        A :class:`fundl.bench.Comparison`.

    Warns:
        RecompileWarning: a ``run()`` compiled after its first call.

    Example:
        >>> import time
        >>> from fundl.bench import time_runs
        >>> res = time_runs({"a": lambda: time.sleep(0.001), "b": lambda: None}, rounds=3)
        >>> [t.name for t in res.timings], res["a"].ratio
        (['a', 'b'], 1.0)
    """
    base = _check(list(runs), baseline, rounds, "time_runs")
    before, _ = memory_high_water()
    r = run_rounds(runs, rounds, warmup)
    notes = [
        f"{name} compiled {n} time(s) after its first call: its times include compiling "
        "(time it with fundl.bench.compare to see which arguments changed)"
        for name, n in r.compiles.items()
        if n
    ]
    timings = [_timing(r, name) for name in runs]
    return _finish(timings, base, case or ", ".join(runs), unit, notes, before)


def _stages(fn: Callable, args: tuple) -> tuple[CompileCost | None, XlaCosts | None]:
    """``fn``'s compile cost and XLA's accounts, where ``fn`` is a ``jax.jit`` function."""
    if not hasattr(fn, "trace"):
        return None, None
    try:
        cost, compiled = compile_cost(fn, *args)
    except Exception:  # not traceable ahead of time: the first call raises any real error
        return None, None
    return cost, xla_costs(compiled)


def compare_calls(
    calls: Mapping[str, tuple[Callable, tuple]],
    *,
    rounds: int = 20,
    warmup: int = 1,
    baseline: str | None = None,
    case: str = "",
    unit: str = "call",
    next_args: NextArgs | None = None,
    items: int | None = None,
    peak: float | None = None,
) -> Comparison:
    """:func:`compare` with each function's own arguments: ``{name: (fn, args)}``."""
    base = _check(list(calls), baseline, rounds, "compare")
    before, _ = memory_high_water()
    runners, stages, first = {}, {}, {}
    for name, (fn, args) in calls.items():
        args = _own_copy(tuple(args))
        stages[name] = _stages(fn, args)  # before the first call: JAX's caches are cold
        first[name] = signature(fn, args)
        runners[name] = _Runner(fn, args, next_args)
    later: dict[str, list[dict[str, str]]] = {name: [] for name in calls}

    def on_compile(name: str) -> None:  # the signature of the call that compiled
        later[name].append(signature(runners[name].fn, runners[name].last_args))

    r = run_rounds(runners, rounds, warmup, on_compile)
    timings = [_with_costs(_timing(r, name), *stages[name], items, peak) for name in calls]
    notes = [
        f"{t.name} compiled {t.recompiles} time(s) after its first call, so its times include "
        f"compiling: {why_recompiled(first[t.name], later[t.name])}" + _programs(calls[t.name][0])
        for t in timings
        if t.recompiles
    ]
    return _finish(timings, base, case or ", ".join(calls), unit, notes, before)


def _programs(fn: Callable) -> str:
    """How many programs a ``jax.jit`` function's cache holds (JAX's own count), if known."""
    try:
        return f" (its jit cache holds {fn._cache_size()} programs)"
    except Exception:  # not a jax.jit function, or a JAX without the private count
        return ""


def _with_costs(
    t: Timing,
    cost: CompileCost | None,
    costs: XlaCosts | None,
    items: int | None,
    peak: float | None,
) -> Timing:
    """``t`` with its compile stages (added to its compile time), XLA's accounts, throughput
    and MFU."""
    flops = costs.flops if costs is not None else None
    return dataclasses.replace(
        t, compile_s=t.compile_s + (cost.total_s if cost else 0.0), compile=cost, costs=costs,
        memory_bytes=costs.memory_bytes if costs is not None else None,
        items_per_s=items / t.median_s if items else None, mfu=mfu(flops, t.median_s, peak),
    )  # fmt: skip


def compare(
    fns: Mapping[str, Callable],
    *args: Any,
    rounds: int = 20,
    warmup: int = 1,
    baseline: str | None = None,
    case: str = "",
    unit: str = "call",
    next_args: NextArgs | None = None,
    items: int | None = None,
    peak_tflops: float | None = None,
) -> Comparison:
    r"""Times jitted functions side by side on the same arguments, with their costs.

    Per ``jax.jit`` function, before its first call: its compile cost in stages
    (``fn.trace(*args)``, ``.lower()``, ``.compile()``) and XLA's cost and memory analysis
    of the compiled call (``None`` for other callables, which are timed as they are).
    Then its first call is timed apart, ``warmup`` calls are untimed, and ``rounds`` rounds
    run every function once each, in an order rotated one further each round, every output
    passed to ``jax.block_until_ready``. A function that compiles again after its first call
    gets a :class:`RecompileWarning` (and a note) naming the arguments whose shapes, dtypes
    or Python values changed.

    Each function gets its own copy of ``args`` (a donating step deletes its inputs); a step
    that donates, or whose outputs feed its next call, needs ``next_args``, e.g.
    :func:`carry_first` for ``step(state, batch) -> (state, logs)``.

    Throughput is ``items`` per median call; MFU is each function's own XLA FLOPs per
    second over the peak:

    $$\mathrm{MFU} = \frac{\text{FLOPs per call} / \text{median seconds}}{\text{peak FLOP/s}}$$

    Args:
        fns: ordered ``{name: fn}``; each ``fn(*args)`` does the same work.
        *args: the arguments of every call (arrays of any shapes; pytrees).
        rounds: interleaved rounds (timed calls of each).
        warmup: untimed calls of each after its first.
        baseline: the name the ratios divide by (``None``: the first).
        case: the comparison's title (default: the names).
        unit: what one call is, e.g. ``"train step"``.
        next_args: ``next_args(args, out) -> args`` of the next call (``None``: the same).
        items: the items (e.g. examples) one call processes, for throughput.
        peak_tflops: the chip's peak TFLOP/s in the dtype of the work (``None``: the
            bfloat16 peak of the device kind, :func:`peak_tflops`; unknown: no MFU).

    Returns:
        A :class:`fundl.bench.Comparison`; ``str()`` of it is its table.

    Raises:
        ValueError: no functions, ``rounds < 1``, or a baseline that is not one of the names.

    Warns:
        RecompileWarning: a function compiled again after its first call.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from fundl import bench
        >>> x = jnp.ones((32, 32))
        >>> res = bench.compare({"once": jax.jit(lambda x: x @ x),
        ...                      "twice": jax.jit(lambda x: x @ x @ x)}, x, rounds=5)
        >>> res["twice"].costs.flops == 2 * res["once"].costs.flops == 2 * 2 * 32**3
        True
    """
    peak = peak_tflops if peak_tflops is not None else _device_peak()
    return compare_calls({name: (fn, args) for name, fn in fns.items()}, rounds=rounds,
                         warmup=warmup, baseline=baseline, case=case, unit=unit,
                         next_args=next_args, items=items, peak=peak)  # fmt: skip


def _device_peak() -> float | None:
    return peak_tflops()
