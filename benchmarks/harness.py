"""Timing harness: implementations interleaved round by round in one process.

Each benchmark *case* maps implementation names ("plain JAX", "fundl", peers) to a
zero-argument ``run()`` that performs a fixed amount of work and blocks until it is done
(``jax.block_until_ready``). The harness calls each once to compile (timed separately), then
runs ``rounds`` rounds; in each round every implementation runs once, in a rotating order, so
machine drift hits all alike. It reports the median and spread per implementation and the
ratio of medians to the baseline (the first implementation, plain JAX).

Memory is reported two ways. Per implementation, where its work is one jitted function: XLA's
own account of that function compiled (arguments + outputs + temporaries - donated buffers,
:func:`xla_memory_bytes`), the same on every backend and free of noise. Per case: the
process's high-water mark (:func:`memory_high_water`), the device's ``peak_bytes_in_use``
where the backend keeps memory statistics (GPU, TPU) and else the process's peak resident
set size, with how much the case raised it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclass
class Timing:
    """The timings of one implementation in one case (seconds per ``run()`` call).

    ``cpu_median_s`` is the median process CPU time per call (all threads: on a busy
    shared machine it moves less than wall time); ``memory_bytes`` is XLA's memory
    account of the implementation's compiled function (:func:`xla_memory_bytes`), or
    ``None`` where its work is not one jitted function.
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
    ``memory_source`` (see :func:`memory_high_water`).
    """

    case: str
    unit: str
    timings: list[Timing]
    notes: list[str] = field(default_factory=list)
    peak_memory_bytes: int | None = None
    peak_memory_growth_bytes: int | None = None
    memory_source: str = ""
    speed: dict[str, dict] = field(default_factory=dict)
    """``--gpu`` runs only: per implementation, its throughput and MFU (:func:`add_speed`)."""


@dataclass(frozen=True)
class GpuRun:
    """The settings of ``python -m benchmarks --gpu``: realistic sizes in a low-precision dtype.

    ``dtype`` is the compute dtype (params stay float32: fundl's layers get ``dtype=``, the
    hand-written and peer steps cast their params inside the loss, :func:`cast_params`);
    ``peak_tflops`` the chip's peak dense TFLOP/s in that dtype (``None``: unknown, no MFU).
    """

    peak_tflops: float | None = None
    dtype: Any = jnp.bfloat16


BF16_RTOL = 3e-2
"""How far the first losses of a bfloat16 case may differ (``measure_train_steps``'s ``rtol``).

bfloat16 keeps 8 significant bits (relative rounding 2**-8 = 0.4%), and the implementations
round in different orders (fused or not, other matmul shapes); a different model gives a loss
off by far more than 3%.
"""


@dataclass(frozen=True)
class Speed:
    """What :func:`measure_train_steps` needs for throughput and MFU: ``items`` per step.

    ``model_flops``: the FLOPs of one step where XLA's cost analysis cannot count them (it
    counts a loop's body once, whatever its trip count: a ``lax.scan`` over time), and
    ``flops_source`` says where they come from.
    """

    items: int
    unit: str
    peak_tflops: float | None = None
    model_flops: float | None = None
    flops_source: str = ""


def memory_high_water() -> tuple[int | None, str]:
    """The process's peak memory so far, in bytes, and what measured it.

    The first device's ``peak_bytes_in_use`` where the backend keeps memory statistics (GPU,
    TPU); else the process's peak resident set size (``getrusage``), which on the CPU backend
    includes the arrays; ``(None, "unavailable")`` where neither exists (Windows).
    """
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    try:
        import resource
    except ImportError:
        return None, "unavailable"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024), "process peak RSS"


def record_memory(res: CaseResult, before: int | None) -> CaseResult:
    """Sets ``res``'s peak memory and its growth since ``before`` (a :func:`memory_high_water`)."""
    after, source = memory_high_water()
    res.peak_memory_bytes, res.memory_source = after, source
    if after is not None and before is not None:
        res.peak_memory_growth_bytes = after - before
    return res


def xla_memory_bytes(jitted: Callable, *args) -> int | None:
    """XLA's memory account of ``jitted`` compiled for ``args``, in bytes.

    Arguments + outputs + temporaries - the donated (aliased) buffers, from
    ``jitted.lower(*args).compile().memory_analysis()``: what one call needs at its peak,
    by the compiler's plan. Call it after a first call (the compilation is cached);
    ``None`` where the function cannot be lowered or the backend gives no analysis.
    """
    try:
        return compiled_memory_bytes(jitted.lower(*args).compile())
    except Exception:  # no .lower (not a jax.jit function), or it cannot lower these args
        return None


def compiled_memory_bytes(compiled) -> int | None:
    """:func:`xla_memory_bytes` of an already compiled ``jax.stages.Compiled``."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return int(total - m.alias_size_in_bytes)


def compiled_flops(compiled) -> float | None:
    """XLA's cost-analysis FLOPs of an already compiled ``jax.stages.Compiled`` (``None``: none).

    Custom calls (cuDNN's fused attention, for one) count as zero: compare a case's
    implementations with one count, the baseline's (see :func:`add_speed`).
    """
    try:
        cost = compiled.cost_analysis()
    except Exception:  # a backend without cost analysis
        return None
    if isinstance(cost, list | tuple):  # older JAX: one dict per computation
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def default_peak_tflops() -> float | None:
    """The first device's dense bf16 peak TFLOP/s by its kind (``benchmarks.gpt2``'s table)."""
    from benchmarks.gpt2 import peak_tflops

    return peak_tflops(jax.devices()[0].device_kind)


def cast_params(tree, dtype):
    """``tree`` with its floating leaves cast to ``dtype`` (``None``: ``tree`` unchanged)."""
    if dtype is None:
        return tree

    def cast(a):
        return a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a

    return jax.tree_util.tree_map(cast, tree)


def in_dtype(loss: Callable, dtype) -> Callable:
    """``loss(params, x, y)`` computing in ``dtype``: params and ``x`` cast on entry.

    The mixed-precision setup a user writes by hand around a pure function of its params
    (plain JAX, stax, Flax linen, Haiku, Equinox); the float32 params get float32 grads.
    ``dtype=None`` returns ``loss`` itself.
    """
    if dtype is None:
        return loss
    return lambda p, x, y: loss(cast_params(p, dtype), cast_params(x, dtype), y)


def add_speed(res: CaseResult, flops: dict[str, float | None], speed: Speed, steps: int) -> None:
    """Sets ``res.speed`` and adds a note: every implementation's throughput and MFU.

    MFU = the case's model FLOPs per step x steps per second / the peak, with the model FLOPs
    ``speed.model_flops`` if given, else the baseline's (the first implementation's) XLA cost
    analysis: the implementations do the same work, and XLA counts no FLOPs in custom calls
    such as cuDNN's attention. Each implementation's own count is kept as
    ``xla_flops_per_step``.
    """
    base = speed.model_flops or flops.get(res.timings[0].name)
    source = speed.flops_source if speed.model_flops else "XLA cost analysis of the baseline's step"
    peak = speed.peak_tflops
    for t in res.timings:
        per_s = steps / t.median_s
        tflops = base * per_s / 1e12 if base else None
        res.speed[t.name] = {
            "throughput": speed.items * per_s, "throughput_unit": f"{speed.unit}/s",
            "model_flops_per_step": base, "model_flops_source": source,
            "xla_flops_per_step": flops.get(t.name),
            "model_tflops": tflops, "peak_tflops": peak,
            "mfu": tflops / peak if tflops is not None and peak else None,
        }  # fmt: skip
    parts = []
    for name, s in res.speed.items():
        mfu = f"{100 * s['mfu']:.1f}% MFU" if s["mfu"] is not None else "MFU n/a"
        parts.append(f"{name} {s['throughput']:,.0f} {s['throughput_unit']}, {mfu}")
    gflop = f"{base / 1e9:.3g} GFLOP/step" if base else "no FLOP count"
    peak_s = f"{peak:g} TFLOP/s" if peak else "unknown (pass --peak-tflops)"
    res.notes.append(f"throughput and MFU ({gflop}, {source}; peak {peak_s}): "
                     + "; ".join(parts))  # fmt: skip


def missing(module: str) -> bool:
    """Whether ``module`` cannot be imported (a peer that is not installed)."""
    return importlib.util.find_spec(module) is None


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
    before, _ = memory_high_water()
    compile_s = {}
    for name in names:  # first call: compilation (and one run)
        t0 = time.perf_counter()
        impls[name]()
        compile_s[name] = time.perf_counter() - t0
        impls[name]()  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            c0, t0 = time.process_time(), time.perf_counter()
            impls[name]()
            samples[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    timings = []
    for name in names:
        s = sorted(samples[name])
        timings.append(Timing(name, compile_s[name], statistics.median(s), iqr(s), samples=s,
                              cpu_median_s=statistics.median(cpu[name])))  # fmt: skip
    set_ratios(timings)
    return record_memory(CaseResult(case, unit, timings), before)


def iqr(samples: list[float]) -> float:
    """The interquartile range (nearest-rank quartiles) of ``samples``."""
    s = sorted(samples)
    return s[(3 * len(s)) // 4] - s[len(s) // 4]


def set_ratios(timings: list[Timing]) -> None:
    """Sets each timing's ratio of medians to the first's (the baseline)."""
    for t in timings:
        t.ratio = t.median_s / timings[0].median_s


def _ms(seconds: float) -> str:
    return "-" if np.isnan(seconds) else f"{seconds * 1e3:.3f}ms"


def _mib(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**10:.1f}KiB" if abs(n) < 2**20 else f"{n / 2**20:.1f}MiB"


def format_table(results: list[CaseResult]) -> str:
    """A plain-text table: one block per case, ratios to the baseline.

    Columns: median wall time per ``run()``, its IQR, the ratio to the baseline, the median
    process CPU time, the compile time (first call) and XLA's memory account.
    """
    lines = []
    for res in results:
        lines.append(f"\n{res.case}  (time per {res.unit}; ratio = median / {res.timings[0].name})")
        width = max(22, *(len(t.name) for t in res.timings))
        lines.append(f"  {'implementation':<{width}} {'median':>10} {'IQR':>9} {'ratio':>7} "
                     f"{'CPU':>10} {'compile':>9} {'XLA mem':>10}")  # fmt: skip
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
        "packages": {name: _version(name) for name in PACKAGES},
    }


PACKAGES = ("jaxlib", "optax", "numpy", "flax", "equinox", "dm-haiku", "keras")
"""The distributions whose versions the JSON record lists (``None``: not installed)."""


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def write_json(results: list[CaseResult], path: str) -> None:
    """Writes the results and the environment as JSON."""
    # ``speed`` only where measured (--gpu), so that a default run's record keeps its keys
    cases = [{k: v for k, v in asdict(r).items() if k != "speed" or v} for r in results]
    record = {"environment": environment(), "results": cases}
    with open(path, "w") as f:
        json.dump(record, f, indent=2)


def plot(results: list[CaseResult], path: str) -> bool:
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
    fig, axes = plt.subplots(
        len(results),
        1,
        figsize=(8, 0.8 + sum(0.25 * n + 0.55 for n in sizes)),
        gridspec_kw={"height_ratios": sizes},
        squeeze=False,
    )
    for ax, res in zip(axes[:, 0], results, strict=True):
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
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(res.case, fontsize=8, loc="left")
    axes[-1, 0].set_xlabel("time / the case's baseline (log scale; lower is faster; fundl orange)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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


class StatefulStep(NamedTuple):
    """A train step that keeps its own state, for :func:`measure_train_steps`.

    For peers whose idiomatic step updates objects in place (Flax NNX's ``nnx.jit`` with an
    ``nnx.Optimizer``): ``step(*carry, x, y)`` returns the next carry, the loss last.
    """

    step: Callable
    carry: tuple


def measure_train_steps(
    case: str,
    impls: dict[str, tuple[Callable, object] | StatefulStep],
    opt: optax.GradientTransformation,
    x: jax.Array,
    y: jax.Array,
    steps: int,
    rounds: int,
    *,
    rtol: float = 1e-4,
    speed: Speed | None = None,
) -> CaseResult:
    """Times train steps made by :func:`make_step`, after checking they compute one loss.

    Each implementation gets its own copy of its params (the steps donate them); its first
    call (trace, compile and one step) is timed as the compile time, and its first loss must
    equal the baseline's (the first entry, plain JAX) to ``rtol``. Each one's memory
    is XLA's account of its compiled step (:func:`xla_memory_bytes`); with ``speed``, the
    case also gets each one's throughput and MFU (:func:`add_speed`).

    Args:
        case: the case's name.
        impls: ordered ``{name: (step, initial params)}``, or a :class:`StatefulStep`.
        opt: the optax optimizer the steps use.
        x: the input batch.
        y: the targets (e.g. integer labels, shape ``(batch,)``).
        steps: train steps per timed ``run()``.
        rounds: interleaved rounds.
        rtol: the relative tolerance of the first losses' agreement.
        speed: the work per step, for throughput and MFU (``None``: neither).
    """
    before, _ = memory_high_water()
    runs, first_losses, compile_s, memory, flops = {}, {}, {}, {}, {}
    for name, impl in impls.items():
        if isinstance(impl, StatefulStep):
            step, carry = impl
        else:
            step, params = impl
            params = jax.tree_util.tree_map(jnp.array, params)  # own copy: steps donate it
            carry = (params, opt.init(params), jnp.zeros(()))
        t0 = time.perf_counter()
        carry = jax.block_until_ready(step(*carry, x, y))
        compile_s[name] = time.perf_counter() - t0
        first_losses[name] = float(carry[-1])
        if speed is None:
            memory[name] = xla_memory_bytes(step, *carry, x, y)
        else:  # one compilation for both accounts
            try:
                compiled = step.lower(*carry, x, y).compile()
            except Exception:  # no .lower (Flax NNX's nnx.jit step)
                memory[name] = flops[name] = None
            else:
                memory[name], flops[name] = (
                    compiled_memory_bytes(compiled),
                    compiled_flops(compiled),
                )
        runs[name] = chained(step, carry, x, y, steps)
    base_name = next(iter(impls))
    base = first_losses[base_name]
    for name, loss in first_losses.items():
        if not np.isclose(loss, base, rtol=rtol):
            raise RuntimeError(f"{name} computes a different loss: {loss} vs {base_name} {base}")
    res = measure(case, runs, rounds=rounds, unit=f"{steps} steps")
    for t in res.timings:
        t.compile_s = compile_s[t.name]  # the first call: trace, compile and one step
        t.memory_bytes = memory[t.name]
    if speed is not None:
        add_speed(res, flops, speed, steps)
    return record_memory(res, before)
