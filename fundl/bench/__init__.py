"""Benchmark kit: time jitted functions right, and see what they cost to compile and run.

:func:`compare` times jitted functions side by side in interleaved rounds (rotating order,
warm-up, every output blocked on; median, IQR and CPU time; ratios to a baseline), with
each one's compile cost in stages (trace, lower, compile), XLA's FLOPs and memory accounts,
throughput and MFU, and warns (:class:`RecompileWarning`) naming the arguments that changed
when a function compiles again after its first call. :func:`train_step_cost` and
:func:`inference_cost` do it for a model in one call; :func:`time_runs` times any
zero-argument work. Results are values: a :class:`Comparison` prints as a table, writes
JSON with its environment (:meth:`Comparison.to_json`, :func:`from_json`) and plots
(:func:`plot`, matplotlib).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from fundl import bench
    >>> x = jnp.ones((64, 64))
    >>> res = bench.compare({"x @ x": jax.jit(lambda x: x @ x),
    ...                      "4 matmuls": jax.jit(lambda x: x @ x @ x @ x @ x)},
    ...                     x, rounds=5)
    >>> res["4 matmuls"].costs.flops / res["x @ x"].costs.flops
    4.0
"""

from fundl.bench.compile import CompileCost, RecompileWarning, compile_cost
from fundl.bench.costs import PEAK_TFLOPS, XlaCosts, memory_high_water, mfu, peak_tflops, xla_costs
from fundl.bench.figure import plot
from fundl.bench.measure import carry_first, compare, time_runs
from fundl.bench.results import Comparison, Timing, environment, from_json, table
from fundl.bench.step import inference_cost, train_step_cost
from fundl.bench.timing import iqr, rotations

__all__ = [
    # timing
    "compare",
    "time_runs",
    "carry_first",
    "train_step_cost",
    "inference_cost",
    # results
    "Comparison",
    "Timing",
    "table",
    "from_json",
    "plot",
    "environment",
    # compilation
    "compile_cost",
    "CompileCost",
    "RecompileWarning",
    # costs
    "xla_costs",
    "XlaCosts",
    "mfu",
    "peak_tflops",
    "PEAK_TFLOPS",
    "memory_high_water",
    # statistics
    "rotations",
    "iqr",
]
