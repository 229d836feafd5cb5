"""Results as values: :class:`Timing` per callable, :class:`Comparison` per case.

A :class:`Comparison` prints as a plain-text table (:meth:`Comparison.table`), writes and
reads JSON with the environment it ran in (:meth:`Comparison.to_json`, :func:`from_json`)
and draws its ratios (:func:`fundl.bench.plot`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax

from fundl.bench.compile import CompileCost
from fundl.bench.costs import XlaCosts
from fundl.bench.timing import iqr, median

NAN = float("nan")


@dataclass(frozen=True)
class Timing:
    """The timings of one callable in one comparison (seconds per call).

    Attributes:
        name: the callable's name.
        compile_s: seconds before the rounds could start: the first call (compilation and
            one run) and, for a jitted function, the trace, lower and compile before it.
        median_s: the median wall time of a timed call.
        iqr_s: its interquartile range.
        ratio: ``median_s`` over the baseline's.
        samples: the timed calls' wall seconds, sorted.
        cpu_median_s: the median process CPU seconds of a timed call (all threads).
        memory_bytes: XLA's memory account of the compiled call (arguments + outputs +
            temporaries - donated), ``None`` where it is not one jitted function.
        compile: the compile cost split into stages (jitted functions only).
        costs: XLA's cost and memory analysis (jitted functions only).
        items_per_s: throughput, where the comparison was told how many items a call does.
        mfu: model FLOPs utilisation against the peak (``None``: FLOPs or peak unknown).
        recompiles: the compilations after the first call (see :class:`RecompileWarning`).
    """

    name: str
    compile_s: float
    median_s: float
    iqr_s: float
    ratio: float = NAN
    samples: Sequence[float] = ()
    cpu_median_s: float = NAN
    memory_bytes: int | None = None
    compile: CompileCost | None = None
    costs: XlaCosts | None = None
    items_per_s: float | None = None
    mfu: float | None = None
    recompiles: int = 0


def summarize(
    name: str, compile_s: float, samples: Sequence[float], cpu: Sequence[float] = ()
) -> Timing:
    """A :class:`Timing` of ``samples`` (seconds): median, IQR and the median of ``cpu``."""
    s = tuple(sorted(samples))
    return Timing(name, compile_s, median(s), iqr(s), samples=s, cpu_median_s=median(cpu))


def with_ratios(timings: Sequence[Timing], baseline: int = 0) -> list[Timing]:
    """Copies of ``timings``, each with its ratio of medians to ``timings[baseline]``'s."""
    base = timings[baseline].median_s
    return [dataclasses.replace(t, ratio=t.median_s / base) for t in timings]


def environment(packages: Sequence[str] = ()) -> dict[str, Any]:
    """Where a measurement ran: JAX version, backend, device kind and count, CPU count.

    Args:
        packages: distributions whose versions to add under ``"packages"`` (``None`` for
            one not installed).
    """
    env = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if packages:
        env["packages"] = {name: _version(name) for name in packages}
    return env


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Comparison:
    """Callables timed side by side: one :class:`Timing` each, the baseline's ratio 1.

    Attributes:
        case: what was timed, the table's title.
        unit: what one call is (``"call"``, ``"train step"``, ``"10 steps"``).
        timings: one per callable, in the order given.
        notes: lines printed under the table (recompiles among them).
        peak_memory_bytes: the process's memory high-water mark after the rounds.
        peak_memory_growth_bytes: how much the rounds raised it.
        memory_source: what measured it (:func:`fundl.bench.memory_high_water`).
        environment: where it ran (:func:`fundl.bench.environment`).
        baseline: the name of the timing the ratios divide by (``""``: the first).
    """

    case: str
    unit: str
    timings: Sequence[Timing]
    notes: Sequence[str] = ()
    peak_memory_bytes: int | None = None
    peak_memory_growth_bytes: int | None = None
    memory_source: str = ""
    environment: dict = field(default_factory=dict)
    baseline: str = ""

    def __getitem__(self, name: str) -> Timing:
        """The :class:`Timing` called ``name``."""
        for t in self.timings:
            if t.name == name:
                return t
        raise KeyError(f"no timing named {name!r}; the names: {[t.name for t in self.timings]}")

    def __str__(self) -> str:
        return self.table()

    def table(self) -> str:
        """The plain-text table (see :func:`table`)."""
        return table([self])

    def to_json(self) -> str:
        """JSON of the comparison, its environment included (:func:`from_json` reads it)."""
        return json.dumps(_record(self), indent=2)

    def plot(self, path: str | None = None) -> Any:
        """A bar chart of the ratios (:func:`fundl.bench.plot`; needs matplotlib)."""
        from fundl.bench.figure import plot

        return plot([self], path)


def _record(c: Comparison) -> dict:
    record = dataclasses.asdict(c)
    for t, timing in zip(record["timings"], c.timings, strict=True):
        t["samples"] = list(timing.samples)
        for key in ("compile", "costs"):  # NamedTuples: by field name
            value = getattr(timing, key)
            t[key] = None if value is None else value._asdict()
    return record


def from_json(text: str) -> Comparison:
    """The :class:`Comparison` that :meth:`Comparison.to_json` wrote.

    Example:
        >>> from fundl.bench import Comparison, Timing, from_json
        >>> c = Comparison("f", "call", (Timing("f", 0.1, 0.01, 0.001, 1.0, (0.01,), 0.01),))
        >>> from_json(c.to_json()) == c
        True
    """
    record = json.loads(text)
    timings = []
    for t in record.pop("timings"):
        compile_, costs = t.pop("compile"), t.pop("costs")
        timings.append(
            Timing(
                **{**t, "samples": tuple(t["samples"])},
                compile=None if compile_ is None else CompileCost(**compile_),
                costs=None if costs is None else XlaCosts(**costs),
            )
        )
    return Comparison(**{**record, "timings": tuple(timings), "notes": tuple(record["notes"])})


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None or math.isnan(seconds) else f"{seconds * 1e3:.3f}ms"


def _mib(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**10:.1f}KiB" if abs(n) < 2**20 else f"{n / 2**20:.1f}MiB"


def _extras(t: Timing) -> list[str]:
    """The optional details of a timing, for a line under its row."""
    parts = []
    if t.compile is not None:
        c = t.compile
        parts.append(f"trace {c.trace_s:.3f}s, lower {c.lower_s:.3f}s, compile {c.compile_s:.3f}s")
    if t.costs is not None and t.costs.flops:
        parts.append(f"{t.costs.flops / 1e9:.4g} GFLOP/call")
    if t.items_per_s is not None:
        parts.append(f"{t.items_per_s:,.0f} items/s")
    if t.mfu is not None:
        parts.append(f"MFU {100 * t.mfu:.1f}%")
    if t.recompiles:
        parts.append(f"RECOMPILED {t.recompiles}x")
    return parts


def case_lines(c: Comparison) -> list[str]:
    """The lines of one comparison in :func:`table`."""
    width = max(22, *(len(t.name) for t in c.timings))
    base = c.baseline or c.timings[0].name
    lines = [f"\n{c.case}  (time per {c.unit}; ratio = median / {base})",
             f"  {'implementation':<{width}} {'median':>10} {'IQR':>9} {'ratio':>7} "
             f"{'CPU':>10} {'compile':>9} {'XLA mem':>10}"]  # fmt: skip
    for t in c.timings:
        lines.append(
            f"  {t.name:<{width}} {t.median_s * 1e3:>8.3f}ms {t.iqr_s * 1e3:>7.3f}ms "
            f"{t.ratio:>7.3f} {_ms(t.cpu_median_s):>10} {t.compile_s:>8.2f}s "
            f"{_mib(t.memory_bytes):>10}"
        )
        extras = _extras(t)
        if extras:
            lines.append(f"  {'':<{width}}   " + "; ".join(extras))
    if c.peak_memory_bytes is not None:
        peak, growth = _mib(c.peak_memory_bytes), _mib(c.peak_memory_growth_bytes)
        lines.append(f"  peak memory ({c.memory_source}): {peak}; this case raised it by "
                     f"{growth}")  # fmt: skip
    return lines + [f"  note: {n}" for n in c.notes]


def table(comparisons: Sequence[Comparison]) -> str:
    """A plain-text table: one block per comparison, ratios to its baseline.

    Columns: median wall time per call, its IQR, the ratio to the baseline, the median
    process CPU time, the compile time (up to the first result) and XLA's memory account;
    under a row, where known, the compile stages, GFLOP per call, throughput, MFU and
    recompiles.
    """
    return "\n".join(line for c in comparisons for line in case_lines(c))
