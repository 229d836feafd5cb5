"""Reporting: the plain-text table, notes comparing implementations, JSON, a bar chart.

This module imports no benchmark: it reads :class:`~benchmarks.timing.CaseResult` records.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

import jax
import numpy as np

from benchmarks.timing import CaseResult

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


def _ms(seconds: float) -> str:
    return "-" if np.isnan(seconds) else f"{seconds * 1e3:.3f}ms"


def _mib(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**10:.1f}KiB" if abs(n) < 2**20 else f"{n / 2**20:.1f}MiB"


def format_case(res: CaseResult) -> list[str]:
    """The lines of one case in :func:`format_table`."""
    width = max(22, *(len(t.name) for t in res.timings))
    lines = [f"\n{res.case}  (time per {res.unit}; ratio = median / {res.timings[0].name})",
             f"  {'implementation':<{width}} {'median':>10} {'IQR':>9} {'ratio':>7} "
             f"{'CPU':>10} {'compile':>9} {'XLA mem':>10}"]  # fmt: skip
    for t in res.timings:
        lines.append(
            f"  {t.name:<{width}} {t.median_s * 1e3:>8.3f}ms {t.iqr_s * 1e3:>7.3f}ms "
            f"{t.ratio:>7.3f} {_ms(t.cpu_median_s):>10} {t.compile_s:>8.2f}s "
            f"{_mib(t.memory_bytes):>10}"
        )
    if res.peak_memory_bytes is not None:
        peak, growth = _mib(res.peak_memory_bytes), _mib(res.peak_memory_growth_bytes)
        lines.append(f"  peak memory ({res.memory_source}): {peak}; this case raised it by "
                     f"{growth}")  # fmt: skip
    return lines + [f"  note: {n}" for n in res.notes]


def format_table(results: Sequence[CaseResult]) -> str:
    """A plain-text table: one block per case, ratios to the baseline.

    Columns: median wall time per ``run()``, its IQR, the ratio to the baseline, the median
    process CPU time, the compile time (first call) and XLA's memory account.
    """
    return "\n".join(line for res in results for line in format_case(res))


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, object]:
    """The JAX version, backend, device kind, CPU count and :data:`PACKAGES`' versions."""
    device = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
        "packages": {name: _version(name) for name in PACKAGES},
    }


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


def _bars(ax, res: CaseResult, ticker) -> None:
    """One case's bars: time over the baseline on a log axis, fundl in orange."""
    names = [t.name for t in res.timings]
    ratios = [t.ratio for t in res.timings]
    colors = ["tab:orange" if n.startswith(("fundl", "fl.")) else "tab:blue" for n in names]
    # Bars grow from 1 (the baseline) on a log axis of at least 0.5x to 2x, so that a 2%
    # difference looks like one and "x times faster" and "x times slower" look alike.
    ax.barh(range(len(ratios)), [r - 1.0 for r in ratios], left=1.0, color=colors)
    ax.set_yticks(range(len(ratios)), names, fontsize=7)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(min(0.5, 0.9 * min(ratios, default=1)), max(2.0, 1.1 * max(ratios, default=1)))
    ticks = [t for t in (0.25, 0.5, 1, 2, 5, 10, 20, 50) if ax.get_xlim()[0] <= t]
    ax.set_xticks([t for t in ticks if t <= ax.get_xlim()[1]], minor=False)
    ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%gx"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(res.case, fontsize=8, loc="left")


def plot(results: Sequence[CaseResult], path: str) -> bool:
    """A PNG bar chart of the ratios (needs matplotlib; returns False without it).

    One bar per implementation and case: median time over the case's baseline (plain JAX,
    or the first implementation where a case has another, e.g. the training-loop cases).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    sizes = [max(len(r.timings), 1) for r in results]
    fig, axes = plt.subplots(len(results), 1, squeeze=False,
                             figsize=(8, 0.8 + sum(0.25 * n + 0.55 for n in sizes)),
                             gridspec_kw={"height_ratios": sizes})  # fmt: skip
    for ax, res in zip(axes[:, 0], results, strict=True):
        _bars(ax, res, matplotlib.ticker)
    axes[-1, 0].set_xlabel("time / the case's baseline (log scale; lower is faster; fundl orange)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
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
