"""Costs: memory, FLOPs and model FLOPs utilisation (MFU), from XLA and the process.

Memory two ways. Per compiled function: XLA's own account (arguments + outputs +
temporaries - donated buffers, :func:`compiled_memory_bytes`), the same on every backend and
free of noise. Per process: its high-water mark (:func:`memory_high_water`), the device's
``peak_bytes_in_use`` where the backend keeps memory statistics (GPU, TPU) and else the
process's peak resident set size.

FLOPs by XLA's cost analysis (:func:`compiled_flops`), and throughput and MFU from them
(:func:`speeds`), against the chip's peak (:func:`peak_tflops`).

This module imports no benchmark.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import jax

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
"""Dense bf16 peak TFLOP/s per device-kind substring (NVIDIA datasheets, SXM parts)."""


def peak_tflops(device_kind: str) -> float | None:
    """The dense bf16 peak TFLOP/s of a device kind (:data:`PEAK_BF16_TFLOPS`; else ``None``)."""
    for name, peak in PEAK_BF16_TFLOPS.items():
        if name in device_kind:
            return peak
    return None


def default_peak_tflops() -> float | None:
    """:func:`peak_tflops` of the first device."""
    return peak_tflops(jax.devices()[0].device_kind)


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


def compiled_memory_bytes(compiled) -> int | None:
    """XLA's memory account of a ``jax.stages.Compiled``, in bytes (``None``: no analysis).

    Arguments + outputs + temporaries - the donated (aliased) buffers, from
    ``compiled.memory_analysis()``: what one call needs at its peak, by the compiler's plan.
    """
    m = compiled.memory_analysis()
    if m is None:
        return None
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return int(total - m.alias_size_in_bytes)


def xla_memory_bytes(jitted: Callable, *args) -> int | None:
    """:func:`compiled_memory_bytes` of ``jitted`` compiled for ``args``.

    Call it after a first call (the compilation is cached); ``None`` where the function
    cannot be lowered or the backend gives no analysis.
    """
    try:
        return compiled_memory_bytes(jitted.lower(*args).compile())
    except Exception:  # no .lower (not a jax.jit function), or it cannot lower these args
        return None


def compiled_flops(compiled) -> float | None:
    """XLA's cost-analysis FLOPs of a ``jax.stages.Compiled`` (``None``: none counted).

    Custom calls (cuDNN's fused attention, for one) count as zero: compare a case's
    implementations with one count, the baseline's (see :func:`speeds`).
    """
    try:
        cost = compiled.cost_analysis()
    except Exception:  # a backend without cost analysis
        return None
    if isinstance(cost, list | tuple):  # older JAX: one dict per computation
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


@dataclass(frozen=True)
class Speed:
    """The work of one step, for throughput and MFU: ``items`` (of ``unit``) per step.

    ``model_flops``: the FLOPs of one step where XLA's cost analysis cannot count them (it
    counts a loop's body once, whatever its trip count: a ``lax.scan`` over time), and
    ``flops_source`` says where they come from.
    """

    items: int
    unit: str
    peak_tflops: float | None = None
    model_flops: float | None = None
    flops_source: str = ""


def speeds(
    seconds: dict[str, float], flops: dict[str, float | None], speed: Speed, steps: int
) -> dict[str, dict]:
    """Per implementation, its throughput and MFU.

    MFU = the model FLOPs per step x steps per second / the peak, with the model FLOPs
    ``speed.model_flops`` if given, else the baseline's (the first of ``seconds``) XLA cost
    analysis: the implementations do the same work, and XLA counts no FLOPs in custom calls
    such as cuDNN's attention. Each implementation's own count is kept as
    ``xla_flops_per_step``.

    Args:
        seconds: ordered ``{name: median seconds}`` per ``steps`` steps, baseline first.
        flops: ``{name: XLA's FLOPs of one step}`` (:func:`compiled_flops`).
        speed: the work per step.
        steps: the steps per timed call.
    """
    base = speed.model_flops or flops.get(next(iter(seconds)))
    source = speed.flops_source if speed.model_flops else "XLA cost analysis of the baseline's step"
    peak = speed.peak_tflops
    out = {}
    for name, median_s in seconds.items():
        per_s = steps / median_s
        tflops = base * per_s / 1e12 if base else None
        out[name] = {
            "throughput": speed.items * per_s, "throughput_unit": f"{speed.unit}/s",
            "model_flops_per_step": base, "model_flops_source": source,
            "xla_flops_per_step": flops.get(name),
            "model_tflops": tflops, "peak_tflops": peak,
            "mfu": tflops / peak if tflops is not None and peak else None,
        }  # fmt: skip
    return out


def speed_note(speed_of: dict[str, dict]) -> str:
    """One line of :func:`speeds`: the FLOP count, its source, the peak and each one's MFU."""
    first = next(iter(speed_of.values()))
    base, peak = first["model_flops_per_step"], first["peak_tflops"]
    parts = [
        f"{name} {s['throughput']:,.0f} {s['throughput_unit']}, "
        + (f"{100 * s['mfu']:.1f}% MFU" if s["mfu"] is not None else "MFU n/a")
        for name, s in speed_of.items()
    ]
    gflop = f"{base / 1e9:.3g} GFLOP/step" if base else "no FLOP count"
    peak_s = f"{peak:g} TFLOP/s" if peak else "unknown (pass --peak-tflops)"
    return (f"throughput and MFU ({gflop}, {first['model_flops_source']}; peak {peak_s}): "
            + "; ".join(parts))  # fmt: skip
