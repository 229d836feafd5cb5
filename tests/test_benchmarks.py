"""A smoke run of the benchmark harness (not a timing assertion): it must never rot."""

import json

import jax

from benchmarks.__main__ import main


def test_benchmark_harness_quick_run(tmp_path, capsys):
    out = tmp_path / "results.json"
    # The peers (and optax's adam: an int32 step count) rely on JAX's default promotion
    # rules, which the suite makes strict; benchmarks run as users run them.
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        assert main(["--suite", "mlp", "--quick", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mlp train step, batch 8" in printed
    assert "mlp train step, batch 128" in printed
    record = json.loads(out.read_text())
    assert record["environment"]["backend"] == jax.default_backend()
    for case in record["results"]:
        names = [t["name"] for t in case["timings"]]
        assert names[:3] == ["plain JAX", "fundl", "stax"]
        assert case["timings"][0]["ratio"] == 1.0
        assert all(t["median_s"] > 0 and t["compile_s"] > 0 for t in case["timings"])
