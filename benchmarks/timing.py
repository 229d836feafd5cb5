"""Timing: the harness's records over :mod:`fundl.bench`'s interleaved rounds.

Each *case* maps implementation names to a zero-argument ``run()`` that does a fixed amount
of work. :func:`measure` times them with :func:`fundl.bench.time_runs` (first call timed
apart as the compile time, one warm-up call, then ``rounds`` rounds in rotating order,
every output blocked on) and returns a :class:`CaseResult`: each one's median,
interquartile range and median process CPU time, and the ratio of medians to the baseline
(the first implementation). The statistics and the record of one implementation
(:class:`Timing`) are fundl.bench's; :class:`CaseResult` stays a mutable record because the
suites append their notes to it.

This module imports no benchmark: its parts take functions and return records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fundl import bench
from fundl.bench.results import Timing, summarize
from fundl.bench.results import with_ratios as _with_ratios
from fundl.bench.timing import iqr, rotations, timed

__all__ = ["CaseResult", "Timing", "iqr", "measure", "rotations", "summary", "timed",
           "with_peak_memory", "with_ratios"]  # fmt: skip


@dataclass
class CaseResult:
    """All implementations of one case, baseline first.

    ``peak_memory_bytes`` is the process's high-water mark after the case and
    ``peak_memory_growth_bytes`` how much the case raised it, as measured by
    ``memory_source`` (see :func:`fundl.bench.memory_high_water`).
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

    def comparison(self) -> bench.Comparison:
        """The case as a :class:`fundl.bench.Comparison` (for its table and plot)."""
        return bench.Comparison(self.case, self.unit, tuple(self.timings), tuple(self.notes),
                                self.peak_memory_bytes, self.peak_memory_growth_bytes,
                                self.memory_source)  # fmt: skip


def summary(
    name: str, compile_s: float, samples: Sequence[float], cpu: Sequence[float] = ()
) -> Timing:
    """A :class:`Timing` of ``samples`` (seconds): median, IQR and the median of ``cpu``."""
    return summarize(name, compile_s, samples, cpu)


def with_ratios(timings: Sequence[Timing]) -> list[Timing]:
    """Copies of ``timings``, each with its ratio of medians to the first's (the baseline)."""
    return _with_ratios(timings)


def with_peak_memory(res: CaseResult, before: int | None) -> CaseResult:
    """A copy of ``res`` with the peak memory now and its growth since ``before``.

    ``before``: a :func:`fundl.bench.memory_high_water` taken before the case.
    """
    after, source = bench.memory_high_water()
    growth = after - before if after is not None and before is not None else None
    return dataclasses.replace(res, peak_memory_bytes=after, peak_memory_growth_bytes=growth,
                               memory_source=source)  # fmt: skip


def measure(
    case: str, impls: dict[str, Callable[[], object]], rounds: int = 30, unit: str = "step"
) -> CaseResult:
    """Times ``impls`` interleaved (:func:`fundl.bench.time_runs`); the first is the baseline.

    Each ``run()``'s first call (compilation and one run) is timed as its compile time and
    left out of the rounds, as is a second (warm-up) call.

    Args:
        case: the case's name, e.g. ``"mlp train step, batch 8"``.
        impls: ordered ``{name: run}``; each ``run()`` does the same work.
        rounds: the number of interleaved rounds.
        unit: what one ``run()`` call is, for the table (e.g. ``"10 steps"``).

    Returns:
        A :class:`CaseResult` with the process's peak memory.
    """
    res = bench.time_runs(impls, rounds=rounds, case=case, unit=unit)
    return CaseResult(case, unit, list(res.timings), list(res.notes), res.peak_memory_bytes,
                      res.peak_memory_growth_bytes, res.memory_source)  # fmt: skip
