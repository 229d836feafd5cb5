"""Timing harness: implementations interleaved round by round in one process.

Each benchmark *case* maps implementation names ("plain JAX", "fundl", peers) to a
zero-argument ``run()`` that performs a fixed amount of work and blocks until it is done
(``jax.block_until_ready``). The harness calls each once to compile (timed separately), then
runs ``rounds`` rounds; in each round every implementation runs once, in a rotating order, so
machine drift hits all alike. It reports the median and spread per implementation and the
ratio of medians to the baseline (the first implementation, plain JAX).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclass
class Timing:
    """The timings of one implementation in one case (seconds per ``run()`` call)."""

    name: str
    compile_s: float
    median_s: float
    iqr_s: float
    ratio: float = float("nan")
    samples: list[float] = field(default_factory=list)


@dataclass
class CaseResult:
    """All implementations of one case, baseline first."""

    case: str
    unit: str
    timings: list[Timing]
    notes: list[str] = field(default_factory=list)


def measure(
    case: str, impls: dict[str, Callable[[], object]], rounds: int = 30, unit: str = "step"
) -> CaseResult:
    """Times ``impls`` interleaved; the first entry is the baseline of the ratios.

    Args:
        case: the case's name, e.g. ``"mlp train step, batch 8"``.
        impls: ordered ``{name: run}``; each ``run()`` does the same work and blocks.
        rounds: the number of interleaved rounds.
        unit: what one ``run()`` call is, for the table (e.g. ``"10 steps"``).

    Returns:
        A :class:`CaseResult`.
    """
    names = list(impls)
    compile_s = {}
    for name in names:  # first call: compilation (and one run)
        t0 = time.perf_counter()
        impls[name]()
        compile_s[name] = time.perf_counter() - t0
        impls[name]()  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            impls[name]()
            samples[name].append(time.perf_counter() - t0)
    timings = []
    for name in names:
        s = sorted(samples[name])
        q1, q3 = s[len(s) // 4], s[(3 * len(s)) // 4]
        timings.append(Timing(name, compile_s[name], statistics.median(s), q3 - q1, samples=s))
    base = timings[0].median_s
    for t in timings:
        t.ratio = t.median_s / base
    return CaseResult(case, unit, timings)


def format_table(results: list[CaseResult]) -> str:
    """A plain-text table: one block per case, ratios to the baseline."""
    lines = []
    for res in results:
        lines.append(f"\n{res.case}  (time per {res.unit}; ratio = median / {res.timings[0].name})")
        lines.append(
            f"  {'implementation':<22} {'median':>10} {'IQR':>9} {'ratio':>7} {'compile':>9}"
        )
        for t in res.timings:
            lines.append(
                f"  {t.name:<22} {t.median_s * 1e3:>8.3f}ms {t.iqr_s * 1e3:>7.3f}ms "
                f"{t.ratio:>7.3f} {t.compile_s:>8.2f}s"
            )
        lines.extend(f"  note: {n}" for n in res.notes)
    return "\n".join(lines)


def environment() -> dict[str, object]:
    """The JAX version, backend, device kind and CPU count, for the JSON record."""
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
    }


def write_json(results: list[CaseResult], path: str) -> None:
    """Writes the results and the environment as JSON."""
    record = {"environment": environment(), "results": [asdict(r) for r in results]}
    with open(path, "w") as f:
        json.dump(record, f, indent=2)


def plot(results: list[CaseResult], path: str) -> bool:
    """A PNG bar chart of the ratios (needs matplotlib; returns False without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.35 * sum(len(r.timings) for r in results)))
    labels, ratios = [], []
    for res in results:
        for t in res.timings:
            labels.append(f"{res.case}: {t.name}")
            ratios.append(t.ratio)
    ax.barh(range(len(ratios)), ratios)
    ax.set_yticks(range(len(ratios)), labels, fontsize=7)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("time / plain JAX (lower is faster)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def make_step(loss_of_params: Callable, opt: optax.GradientTransformation):
    """A jitted, donating train step around ``loss_of_params(params, x, y)``."""

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, loss, x, y):
        loss, grads = jax.value_and_grad(loss_of_params)(params, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def chained(step: Callable, carry: tuple, x, y, steps: int) -> Callable[[], None]:
    """A ``run()`` doing ``steps`` train steps, each fed the previous one's outputs."""
    box = [carry]

    def run() -> None:
        c = box[0]
        for _ in range(steps):
            c = step(*c, x, y)
        box[0] = jax.block_until_ready(c)

    return run


def measure_train_steps(
    case: str,
    impls: dict[str, tuple[Callable, object]],
    opt: optax.GradientTransformation,
    x: jax.Array,
    y: jax.Array,
    steps: int,
    rounds: int,
) -> CaseResult:
    """Times train steps made by :func:`make_step`, after checking they compute one loss.

    Each implementation gets its own copy of its params (the steps donate them); its first
    call (trace, compile and one step) is timed as the compile time, and its first loss must
    equal the baseline's (the first entry, plain JAX) to ``rtol=1e-4``.

    Args:
        case: the case's name.
        impls: ordered ``{name: (step, initial params)}``.
        opt: the optax optimizer the steps use.
        x: the input batch.
        y: the integer labels, shape ``(batch,)``.
        steps: train steps per timed ``run()``.
        rounds: interleaved rounds.
    """
    runs, first_losses, compile_s = {}, {}, {}
    for name, (step, params) in impls.items():
        params = jax.tree_util.tree_map(jnp.array, params)  # own copy: steps donate it
        carry = (params, opt.init(params), jnp.zeros(()))
        t0 = time.perf_counter()
        carry = jax.block_until_ready(step(*carry, x, y))
        compile_s[name] = time.perf_counter() - t0
        first_losses[name] = float(carry[2])
        runs[name] = chained(step, carry, x, y, steps)
    base_name = next(iter(impls))
    base = first_losses[base_name]
    for name, loss in first_losses.items():
        if not np.isclose(loss, base, rtol=1e-4):
            raise RuntimeError(f"{name} computes a different loss: {loss} vs {base_name} {base}")
    res = measure(case, runs, rounds=rounds, unit=f"{steps} steps")
    for t in res.timings:
        t.compile_s = compile_s[t.name]  # the first call: trace, compile and one step
    return res
