"""Reporting: the harness's notes, JSON record and command line over :mod:`fundl.bench`.

The table (:func:`fundl.bench.table`), the environment (:func:`fundl.bench.environment`)
and the bar chart (:func:`fundl.bench.plot`) are fundl.bench's; here are the notes comparing
fundl with the fastest implementation, the JSON record of a whole run (with the peers'
versions) and a case module's command line.

This module imports no benchmark: it reads :class:`~benchmarks.timing.CaseResult` records.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict

from benchmarks.timing import CaseResult
from fundl import bench

PACKAGES = ("jaxlib", "optax", "numpy", "flax", "equinox", "dm-haiku", "keras")
"""The distributions whose versions the JSON record lists (``None``: not installed)."""


def note_vs_fastest(
    res: CaseResult, name: str = "fundl", target: float = 1.0, exclude: Sequence[str] = ()
) -> str:
    """A note: ``name``'s median over the fastest implementation's, and the fastest other's.

    ``exclude``: implementations left out of the comparison (e.g. fundl's own variants).
    """
    timings = [t for t in res.timings if t.name not in exclude]
    mine = next(t for t in timings if t.name == name)
    fastest = min(timings, key=lambda t: t.median_s)
    note = f"{name} / fastest ({fastest.name}) = {mine.median_s / fastest.median_s:.3f}"
    others = [t for t in timings if t.name != name]
    if fastest is mine and others:  # how far ahead of the next one
        other = min(others, key=lambda t: t.median_s)
        note += f"; {name} / fastest other ({other.name}) = {mine.median_s / other.median_s:.3f}"
    return note + f" (target <= {target})"


def format_table(results: Sequence[CaseResult]) -> str:
    """A plain-text table: one block per case, ratios to the baseline (:func:`fundl.bench.table`).

    Columns: median wall time per ``run()``, its IQR, the ratio to the baseline, the median
    process CPU time, the compile time (first call) and XLA's memory account.
    """
    return bench.table([res.comparison() for res in results])


def environment() -> dict[str, object]:
    """:func:`fundl.bench.environment` with :data:`PACKAGES`' versions."""
    return bench.environment(PACKAGES)


def environment_line() -> str:
    """:func:`environment` on one line, as the runs print it first."""
    return ", ".join(f"{k}={v}" for k, v in environment().items())


def write_json(results: Sequence[CaseResult], path: str) -> None:
    """Writes the results and the environment as JSON."""
    # ``speed`` only where measured (--gpu), so that a default run's record keeps its keys
    cases = [{k: v for k, v in asdict(r).items() if k != "speed" or v} for r in results]
    record = {"environment": environment(), "results": cases}
    with open(path, "w") as f:
        json.dump(record, f, indent=2)


def plot(results: Sequence[CaseResult], path: str) -> bool:
    """A PNG bar chart of the ratios (needs matplotlib; returns False without it).

    One bar per implementation and case: median time over the case's baseline (plain JAX,
    or the first implementation where a case has another, e.g. the training-loop cases);
    fundl's in orange.
    """
    try:
        bench.plot([res.comparison() for res in results], path, highlight=("fundl", "fl."))
    except ImportError:
        return False
    return True


def main(
    run: Callable[..., Sequence[CaseResult]],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
) -> list[CaseResult]:
    """A case module's command line: ``run(quick=..., **parser's options)``, then its table.

    Adds ``--quick`` to ``parser``, prints the environment (:func:`environment_line`), runs
    and prints :func:`format_table`. ``run`` takes each option of ``parser`` by its name.
    """
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny, few rounds")
    args = parser.parse_args(argv)
    print(environment_line())
    results = list(run(**vars(args)))
    print(format_table(results))
    return results
