"""Timing: callables interleaved round by round in one process, every output blocked on.

:func:`run_rounds` times each zero-argument ``run()``'s first call apart (compilation), calls
each ``warmup`` more times, then runs ``rounds`` rounds; in each round every callable runs
once, in an order rotated one further each round (:func:`rotations`), so that a drift of the
machine (clock, heat, another process) hits all alike instead of favouring whichever runs
first. Every call's output is passed to ``jax.block_until_ready``: JAX dispatches work
asynchronously, and a clock stopped at dispatch times nothing of the computation.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax

from fundl.testing import count_compiles


def rotations(names: Sequence[str], rounds: int) -> Iterator[list[str]]:
    """``rounds`` orders of ``names``, each rotated one further than the last.

    Example:
        >>> from fundl.bench import rotations
        >>> list(rotations(["a", "b", "c"], 4))
        [['a', 'b', 'c'], ['b', 'c', 'a'], ['c', 'a', 'b'], ['a', 'b', 'c']]
    """
    names = list(names)
    for r in range(rounds):
        k = r % len(names)
        yield names[k:] + names[:k]


def iqr(samples: Sequence[float]) -> float:
    """The interquartile range (nearest-rank quartiles) of ``samples``.

    Example:
        >>> from fundl.bench import iqr
        >>> iqr([5.0, 1.0, 3.0, 2.0, 4.0, 6.0, 8.0, 7.0])  # quartiles 3 and 7
        4.0
    """
    s = sorted(samples)
    return s[(3 * len(s)) // 4] - s[len(s) // 4]


def median(samples: Sequence[float]) -> float:
    """The median of ``samples`` (NaN where there are none)."""
    return statistics.median(samples) if samples else float("nan")


def timed(run: Callable[[], Any]) -> tuple[Any, float, float]:
    """``(output, wall seconds, process CPU seconds)`` of one ``run()``, blocked until done.

    CPU time is the whole process's (all threads): on a busy shared machine it moves less
    than wall time.
    """
    c0, t0 = time.process_time(), time.perf_counter()
    out = jax.block_until_ready(run())
    return out, time.perf_counter() - t0, time.process_time() - c0


class Rounds(NamedTuple):
    """What :func:`run_rounds` measured, per name.

    Attributes:
        first_s: the first call's wall seconds (compilation and one run).
        wall: the wall seconds of each timed call, in round order.
        cpu: the process CPU seconds of each timed call.
        compiles: the compilations after the first call (warm-up and rounds).
    """

    first_s: dict[str, float]
    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]
    compiles: dict[str, int]


def run_rounds(
    runs: Mapping[str, Callable[[], Any]],
    rounds: int,
    warmup: int = 1,
    on_compile: Callable[[str], None] | None = None,
) -> Rounds:
    """Times ``runs`` interleaved: first calls apart, then warm-up, then ``rounds`` rounds.

    Args:
        runs: ordered ``{name: run}``; each ``run()`` does one unit of work.
        rounds: the number of interleaved rounds (one timed call of each per round).
        warmup: untimed calls of each after its first.
        on_compile: called with a name, after the call, whenever one of its calls after the
            first compiled (to say why: :func:`fundl.bench.compare` names the arguments).
    """
    first_s = {name: timed(run)[1] for name, run in runs.items()}
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    compiles = dict.fromkeys(runs, 0)
    warm = [list(runs)] * warmup
    with count_compiles() as events:
        for i, order in enumerate([*warm, *rotations(list(runs), rounds)]):
            for name in order:
                seen = len(events)
                _, w, c = timed(runs[name])
                if i >= warmup:
                    wall[name].append(w)
                    cpu[name].append(c)
                if len(events) > seen:
                    compiles[name] += len(events) - seen
                    if on_compile is not None:
                        on_compile(name)
    return Rounds(first_s, wall, cpu, compiles)
