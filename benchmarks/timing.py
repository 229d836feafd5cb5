"""Timing: implementations interleaved round by round in one process.

Each *case* maps implementation names to a zero-argument ``run()`` that does a fixed amount
of work and blocks until it is done (``jax.block_until_ready``). :func:`measure` calls each
once to compile (timed apart), once more to warm up, then runs ``rounds`` rounds; in each
round every implementation runs once, in a rotating order (:func:`rotations`), so that drift
of the machine hits all alike. It reports each one's median, interquartile range and median
process CPU time, and the ratio of medians to the baseline (the first implementation).

This module imports no benchmark: its parts take functions and return records.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from benchmarks.costs import memory_high_water

T = TypeVar("T")


@dataclass
class Timing:
    """The timings of one implementation in one case (seconds per ``run()`` call).

    ``cpu_median_s`` is the median process CPU time per call (all threads: on a busy
    shared machine it moves less than wall time); ``memory_bytes`` is XLA's memory
    account of the implementation's compiled function (:func:`benchmarks.costs.xla_memory_bytes`),
    or ``None`` where its work is not one jitted function.
    """

    name: str
    compile_s: float
    median_s: float
    iqr_s: float
    ratio: float = float("nan")
    samples: list[float] = field(default_factory=list)
    cpu_median_s: float = float("nan")
    memory_bytes: int | None = None


@dataclass
class CaseResult:
    """All implementations of one case, baseline first.

    ``peak_memory_bytes`` is the process's high-water mark after the case and
    ``peak_memory_growth_bytes`` how much the case raised it, as measured by
    ``memory_source`` (see :func:`benchmarks.costs.memory_high_water`).
    """

    case: str
    unit: str
    timings: list[Timing]
    notes: list[str] = field(default_factory=list)
    peak_memory_bytes: int | None = None
    peak_memory_growth_bytes: int | None = None
    memory_source: str = ""
    speed: dict[str, dict] = field(default_factory=dict)
    """Low-precision (``--gpu``) runs only: per implementation, its throughput and MFU."""


def iqr(samples: Sequence[float]) -> float:
    """The interquartile range (nearest-rank quartiles) of ``samples``."""
    s = sorted(samples)
    return s[(3 * len(s)) // 4] - s[len(s) // 4]


def summary(
    name: str, compile_s: float, samples: Sequence[float], cpu: Sequence[float] = ()
) -> Timing:
    """A :class:`Timing` of ``samples`` (seconds): median, IQR and the median of ``cpu``."""
    s = sorted(samples)
    cpu_median = statistics.median(cpu) if cpu else float("nan")
    return Timing(name, compile_s, statistics.median(s), iqr(s), samples=s, cpu_median_s=cpu_median)


def with_ratios(timings: Sequence[Timing]) -> list[Timing]:
    """Copies of ``timings``, each with its ratio of medians to the first's (the baseline)."""
    base = timings[0].median_s
    return [dataclasses.replace(t, ratio=t.median_s / base) for t in timings]


def with_peak_memory(res: CaseResult, before: int | None) -> CaseResult:
    """A copy of ``res`` with the peak memory now and its growth since ``before``.

    ``before``: a :func:`benchmarks.costs.memory_high_water` taken before the case.
    """
    after, source = memory_high_water()
    growth = after - before if after is not None and before is not None else None
    return dataclasses.replace(res, peak_memory_bytes=after, peak_memory_growth_bytes=growth,
                               memory_source=source)  # fmt: skip


def rotations(names: Sequence[str], rounds: int) -> Iterator[list[str]]:
    """``rounds`` orders of ``names``, each rotated one further than the last."""
    names = list(names)
    for r in range(rounds):
        k = r % len(names)
        yield names[k:] + names[:k]


def timed(run: Callable[[], T]) -> tuple[T, float, float]:
    """``(what run returned, wall seconds, process CPU seconds)`` of one ``run()`` call."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = run()
    return out, time.perf_counter() - t0, time.process_time() - c0


def interleave(
    impls: dict[str, Callable[[], object]], rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Runs ``impls`` in :func:`rotations`: per name, its wall and its CPU seconds per call."""
    wall: dict[str, list[float]] = {name: [] for name in impls}
    cpu: dict[str, list[float]] = {name: [] for name in impls}
    for order in rotations(list(impls), rounds):
        for name in order:
            _, w, c = timed(impls[name])
            wall[name].append(w)
            cpu[name].append(c)
    return wall, cpu


def measure(
    case: str, impls: dict[str, Callable[[], object]], rounds: int = 30, unit: str = "step"
) -> CaseResult:
    """Times ``impls`` interleaved; the first entry is the baseline of the ratios.

    Each ``run()``'s first call (compilation and one run) is timed as its compile time and
    left out of the rounds, as is a second (warm-up) call.

    Args:
        case: the case's name, e.g. ``"mlp train step, batch 8"``.
        impls: ordered ``{name: run}``; each ``run()`` does the same work and blocks.
        rounds: the number of interleaved rounds.
        unit: what one ``run()`` call is, for the table (e.g. ``"10 steps"``).

    Returns:
        A :class:`CaseResult` with the process's peak memory.
    """
    before, _ = memory_high_water()
    compile_s = {}
    for name, run in impls.items():
        compile_s[name] = timed(run)[1]
        run()  # warm-up
    wall, cpu = interleave(impls, rounds)
    timings = [summary(name, compile_s[name], wall[name], cpu[name]) for name in impls]
    return with_peak_memory(CaseResult(case, unit, with_ratios(timings)), before)
