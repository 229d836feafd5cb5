"""``python -m benchmarks [--suite mlp ...] [--quick] [--gpu] [--json PATH] [--plot PATH]``.

Runs the suites (default: all, in this order): ``mlp`` and ``cnn`` (the seed MLP's and
LeNet-5's train steps), ``rnn`` (an LSTM's train step), ``attention`` (a causal
self-attention layer's train step), ``transformer`` (a pre-norm decoder block's train step
and the compile time of deep stacks), ``fit`` (the training loop) and ``startup`` (fresh
processes: re-runs with the compilation cache, time to first step). Each case runs plain
JAX written by hand, fundl and the installed peers, interleaved round by round; missing peers
are skipped with a note. ``--quick`` is a smoke run on tiny sizes, not a measurement.

``--gpu`` runs the suites at realistic sizes for a GPU in bfloat16 compute over float32
params (fundl's layers with ``dtype=jnp.bfloat16``; the hand-written steps and the peers
cast their params and inputs inside the loss; a peer whose bfloat16 setup is not that simple
is skipped with a note) and adds each case's throughput and model FLOPs utilisation (MFU:
the baseline's compiled step's FLOPs by XLA's cost analysis, per second, over the chip's peak
from its device kind or ``--peak-tflops``) as notes and in the JSON (``speed``). Sizes: MLP
batch 4,096 (the seed model's widths), LeNet batch 1,024, attention batch 32 x 1,024
positions, width 1,024, 16 heads, a decoder block batch 16 x 1,024 positions, width 1,024, 16
heads, an LSTM batch 256 x 256 steps, 512 inputs, 1,024 hidden. The ``fit`` suite and the
compile-time measurements are skipped. ``--gpu --quick`` runs the same code on tiny sizes
(bfloat16 on the CPU: a smoke run).
"""

from __future__ import annotations

import argparse
import importlib

from benchmarks.costs import default_peak_tflops
from benchmarks.report import environment_line, format_table, plot, write_json
from benchmarks.steps import GpuRun

SUITES = {"mlp": "benchmarks.mlp_step", "cnn": "benchmarks.cnn_step",
          "rnn": "benchmarks.rnn_step", "attention": "benchmarks.attention_step",
          "transformer": "benchmarks.transformer_step", "fit": "benchmarks.fit_bench",
          "startup": "benchmarks.startup"}  # fmt: skip
"""Suite name -> module with ``run(quick: bool) -> list[CaseResult]``, in the default order.

Each suite but ``fit`` and ``startup`` also takes ``gpu: GpuRun | None`` (``--gpu``)."""

NO_GPU = {"fit": "the training loop on a small MLP measures dispatch, not the chip",
          "startup": "fresh processes on the CPU measure imports and compilation"}  # fmt: skip
"""Suites that ``--gpu`` skips, and why."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--suite", action="append", choices=list(SUITES),
                        help="suite(s) to run, repeatable (default: all)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a smoke run: few, short rounds")
    gpu_help = "realistic GPU sizes in bfloat16, with throughput and MFU"
    parser.add_argument("--gpu", action="store_true", help=gpu_help)
    peak_help = "with --gpu: the chip's peak bf16 TFLOP/s (default: by its device kind)"
    parser.add_argument("--peak-tflops", type=float, default=None, help=peak_help)
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of the ratios")
    args = parser.parse_args(argv)
    print(environment_line())
    gpu = GpuRun(args.peak_tflops or default_peak_tflops()) if args.gpu else None
    if gpu is not None:
        peak = f"{gpu.peak_tflops:g} TFLOP/s" if gpu.peak_tflops else "unknown (no MFU)"
        print(f"--gpu: compute dtype {gpu.dtype.__name__}, peak {peak}")
    results = []
    for suite in args.suite or list(SUITES):
        if gpu is not None and suite in NO_GPU:
            print(f"{suite} suite skipped under --gpu: {NO_GPU[suite]}")
            continue
        module = importlib.import_module(SUITES[suite])
        results += module.run(quick=args.quick, gpu=gpu) if gpu else module.run(quick=args.quick)
    print(format_table(results))
    if args.json:
        write_json(results, args.json)
    if args.plot and not plot(results, args.plot):
        print("matplotlib not installed: no plot written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
