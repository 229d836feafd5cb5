"""Costs: the harness's throughput and MFU notes over :mod:`fundl.bench`'s XLA accounts.

XLA's memory and FLOP accounts of a compiled step (:func:`compiled_memory_bytes`,
:func:`compiled_flops`, from :func:`fundl.bench.xla_costs`), the process's high-water mark
(:func:`fundl.bench.memory_high_water`) and the chips' peaks (:func:`fundl.bench.peak_tflops`)
are fundl.bench's; here are the harness's per-case throughput and MFU (:func:`speeds`), which
count every implementation's work by the baseline's FLOPs.

This module imports no benchmark.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fundl import bench
from fundl.bench import memory_high_water, peak_tflops

__all__ = ["PEAK_BF16_TFLOPS", "Speed", "compiled_flops", "compiled_memory_bytes",
           "default_peak_tflops", "memory_high_water", "peak_tflops", "speed_note", "speeds",
           "xla_memory_bytes"]  # fmt: skip

PEAK_BF16_TFLOPS = bench.PEAK_TFLOPS
"""Dense bf16 peak TFLOP/s per device-kind substring (:data:`fundl.bench.PEAK_TFLOPS`)."""


def default_peak_tflops() -> float | None:
    """:func:`fundl.bench.peak_tflops` of the first device."""
    return peak_tflops()


def compiled_memory_bytes(compiled) -> int | None:
    """XLA's memory account of a ``jax.stages.Compiled``, in bytes (``None``: no analysis).

    Arguments + outputs + temporaries - the donated (aliased) buffers.
    """
    return bench.xla_costs(compiled).memory_bytes


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
    return bench.xla_costs(compiled).flops


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
