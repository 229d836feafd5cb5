"""A smoke run of benchmarks/rnn_step.py on tiny sizes (not a timing assertion)."""

import importlib.util
from pathlib import Path

import jax

PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "rnn_step.py"


def test_rnn_benchmark_quick_run(capsys):
    spec = importlib.util.spec_from_file_location("rnn_step", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # The peers (and optax's adam: an int32 step count) rely on JAX's default promotion
    # rules, which the suite makes strict; benchmarks run as users run them.
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        result = module.main(rounds=1, steps=1, quick=True)
    printed = capsys.readouterr().out
    assert "LSTM train step (adam): batch 2, 4 steps" in printed
    assert "fundl / fastest other, wall time" in printed
    assert "fundl compile (CPU time)" in printed
    assert result["fundl rnn(lstm_cell)"] > 0
    assert result["compile_ratio"] > 0
    assert module.HIDDEN == 256  # the sizes are restored after a quick run
