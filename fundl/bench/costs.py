"""Costs: XLA's FLOP and memory accounts of a compiled function, MFU and the process's peak.

Per compiled function, XLA's own accounts (:func:`xla_costs`): the FLOPs and bytes accessed
of its cost analysis, and the arguments, outputs, temporaries and donated (aliased) buffers
of its memory analysis, the same on every backend and free of timing noise. Per process, its
memory high-water mark (:func:`memory_high_water`). MFU (:func:`mfu`) is FLOPs per second
over the chip's peak (:func:`peak_tflops`).
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import jax

PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5p": 459.0,
}
"""Dense bfloat16 peak TFLOP/s per device-kind substring (vendors' datasheets; the first
match in this order counts, so ``"H100 PCIe"`` comes before ``"H100"``)."""


def peak_tflops(device_kind: str | None = None) -> float | None:
    """The dense bfloat16 peak TFLOP/s of a device kind (:data:`PEAK_TFLOPS`), else ``None``.

    Args:
        device_kind: e.g. ``"NVIDIA H100 80GB HBM3"`` (``None``: the first device's).

    Returns:
        The peak, or ``None`` for a kind not in the table (the CPU among them): no guess.

    Example:
        >>> from fundl.bench import peak_tflops
        >>> peak_tflops("NVIDIA H100 80GB HBM3"), peak_tflops("cpu")
        (989.0, None)
    """
    kind = jax.devices()[0].device_kind if device_kind is None else device_kind
    return next((peak for name, peak in PEAK_TFLOPS.items() if name in kind), None)


class XlaCosts(NamedTuple):
    """XLA's accounts of one compiled call (``None``: the backend gave no such analysis).

    Attributes:
        flops: floating-point operations (cost analysis; a loop's body is counted once,
            whatever its trip count, and custom calls such as cuDNN's attention count zero).
        bytes_accessed: bytes read and written (cost analysis).
        argument_bytes: the arguments' buffers (memory analysis).
        output_bytes: the outputs' buffers.
        temp_bytes: the temporaries XLA allocates.
        alias_bytes: the outputs written into donated arguments' buffers.
    """

    flops: float | None = None
    bytes_accessed: float | None = None
    argument_bytes: int | None = None
    output_bytes: int | None = None
    temp_bytes: int | None = None
    alias_bytes: int | None = None

    @property
    def memory_bytes(self) -> int | None:
        """What one call needs at its peak: arguments + outputs + temporaries - donated."""
        parts = (self.argument_bytes, self.output_bytes, self.temp_bytes, self.alias_bytes)
        if any(p is None for p in parts):
            return None
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes


def _cost_analysis(compiled: Any) -> dict:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # a backend without cost analysis
        return {}
    if isinstance(cost, list | tuple):  # older JAX: one dict per computation
        cost = cost[0] if cost else None
    return cost or {}


def xla_costs(compiled: Any) -> XlaCosts:
    """XLA's cost and memory analysis of a ``jax.stages.Compiled``.

    Args:
        compiled: e.g. ``jax.jit(f).trace(x).lower().compile()``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from fundl.bench import xla_costs
        >>> x = jnp.ones((8, 16))
        >>> costs = xla_costs(jax.jit(jnp.matmul).trace(x, x.T).lower().compile())
        >>> costs.flops  # 2 * m * n * k
        2048.0
    """
    cost = _cost_analysis(compiled)
    flops, accessed = cost.get("flops"), cost.get("bytes accessed")
    try:
        m = compiled.memory_analysis()
    except Exception:  # a backend without memory analysis
        m = None
    sizes = (
        (None,) * 4
        if m is None
        else (
            int(m.argument_size_in_bytes),
            int(m.output_size_in_bytes),
            int(m.temp_size_in_bytes),
            int(m.alias_size_in_bytes),
        )
    )
    return XlaCosts(
        float(flops) if flops is not None and flops > 0 else None,
        float(accessed) if accessed is not None else None,
        *sizes,
    )


def mfu(flops: float | None, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: ``flops`` done in ``seconds``, over ``peak`` TFLOP/s.

    ``None`` where the FLOPs or the peak are unknown.
    """
    if not flops or not peak:
        return None
    return flops / seconds / (peak * 1e12)


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
