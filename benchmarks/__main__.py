"""``python -m benchmarks [--suite mlp ...] [--quick] [--json PATH] [--plot PATH]``.

Runs the suites (default: all, in this order): ``mlp`` and ``cnn`` (the seed MLP's and
LeNet-5's train steps), ``rnn`` (an LSTM's train step), ``attention`` (a causal
self-attention layer's train step), ``transformer`` (a pre-norm decoder block's train step
and the compile time of deep stacks) and ``fit`` (the training loop). Each case runs plain
JAX written by hand, fundl and the installed peers, interleaved round by round; missing peers
are skipped with a note. ``--quick`` is a smoke run on tiny sizes, not a measurement.
"""

from __future__ import annotations

import argparse
import importlib

from benchmarks.harness import environment, format_table, plot, write_json

SUITES = {"mlp": "benchmarks.mlp_step", "cnn": "benchmarks.cnn_step",
          "rnn": "benchmarks.rnn_step", "attention": "benchmarks.attention_step",
          "transformer": "benchmarks.transformer_step", "fit": "benchmarks.fit_bench"}  # fmt: skip
"""Suite name -> module with ``run(quick: bool) -> list[CaseResult]``, in the default order."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--suite", action="append", choices=list(SUITES),
                        help="suite(s) to run, repeatable (default: all)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a smoke run: few, short rounds")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of the ratios")
    args = parser.parse_args(argv)
    env = environment()
    print(", ".join(f"{k}={v}" for k, v in env.items()))
    results = []
    for suite in args.suite or list(SUITES):
        results += importlib.import_module(SUITES[suite]).run(quick=args.quick)
    print(format_table(results))
    if args.json:
        write_json(results, args.json)
    if args.plot and not plot(results, args.plot):
        print("matplotlib not installed: no plot written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
