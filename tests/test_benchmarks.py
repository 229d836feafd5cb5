"""Smoke runs of the benchmark harness, so that it never rots (not timing assertions).

``python -m benchmarks --quick`` runs every suite on tiny sizes, as a user runs it: in two
processes side by side (one per core of a 2-core CI machine), with XLA's CPU optimisations
turned down (``XLA_FLAGS``) because the run is mostly compilation and no number of it is
read. The assertions check the structure of what it prints and writes: every case, its
implementations and ratios, the notes with the targets, the JSON record and the plot.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import peers
from benchmarks.report import format_table, note_vs_fastest, plot, write_json
from benchmarks.timing import CaseResult, iqr, measure, rotations

ROOT = Path(__file__).resolve().parent.parent
GROUPS = (("mlp", "cnn", "fit"), ("rnn", "attention", "transformer"))
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """``(printed output, {suite group: JSON record}, output folder)`` of the quick runs."""
    out = tmp_path_factory.mktemp("benchmarks")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
    procs = []
    for i, group in enumerate(GROUPS):
        args = [sys.executable, "-m", "benchmarks", "--quick", "--json", str(out / f"{i}.json")]
        args += [arg for suite in group for arg in ("--suite", suite)]
        if i == 0:
            args += ["--plot", str(out / "ratios.png")]
        pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, text=True, **pipe))
    try:
        printed = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:  # timed out: leave no process behind
                p.kill()
    for p, text in zip(procs, printed, strict=True):
        assert p.returncode == 0, text
    records = [json.loads((out / f"{i}.json").read_text()) for i in range(len(GROUPS))]
    return "\n".join(printed), records, out


def _cases(records) -> dict[str, dict]:
    return {case["case"]: case for record in records for case in record["results"]}


def _case(records, prefix: str) -> dict:
    (case,) = [c for name, c in _cases(records).items() if name.startswith(prefix)]
    return case


def _names(case) -> list[str]:
    return [t["name"] for t in case["timings"]]


@pytest.mark.slow  # runs python -m benchmarks --quick in subprocesses (FUNDL_SLOW=1; CI runs it)
def test_json_records_the_environment(quick):
    _, records, _ = quick
    for record in records:
        env = record["environment"]
        for key in ("jax", "backend", "device_kind", "cpu_count", "python", "packages"):
            assert key in env
        assert env["backend"] == "cpu" and env["cpu_count"] >= 1
        assert set(env["packages"]) >= {"optax", "flax", "equinox", "dm-haiku", "keras"}


@pytest.mark.slow  # runs python -m benchmarks --quick in subprocesses (FUNDL_SLOW=1; CI runs it)
def test_every_suite_runs_every_case(quick):
    printed, records, _ = quick
    cases = _cases(records)
    assert len(cases) == 8  # mlp, cnn, rnn, attention: 1; transformer, fit: 2
    for name, case in cases.items():
        assert name in printed
        timings = case["timings"]
        assert len(timings) >= 2 and timings[0]["ratio"] == 1.0
        for t in timings:
            assert t["median_s"] > 0 and t["compile_s"] > 0 and math.isfinite(t["ratio"])
        assert case["memory_source"] and case["peak_memory_bytes"] > 0
    assert _names(_case(records, "mlp train step, batch 8"))[:3] == ["plain JAX", "fundl", "stax"]
    assert _names(_case(records, "lenet train step, batch 8"))[:3] == ["plain JAX", "fundl", "stax"]
    assert not any(name.startswith(("mlp train step, batch 128", "lenet train step, batch 128"))
                   for name in cases)  # quick: the first batch size only  # fmt: skip
    for prefix in ("mlp", "lenet", "lstm", "causal self-attention", "decoder block"):
        case = _case(records, prefix)
        # XLA's memory account of each jitted step (Flax NNX's nnx.jit step has none)
        assert all(t["memory_bytes"] > 0 for t in case["timings"] if t["name"] != "flax nnx")


@pytest.mark.slow  # runs python -m benchmarks --quick in subprocesses (FUNDL_SLOW=1; CI runs it)
def test_rnn_suite(quick):
    _, records, _ = quick
    case = _case(records, "lstm train step, batch 2, 4 steps")
    assert _names(case)[:4] == ["plain JAX lax.scan", "plain JAX lax.scan, hoisted projection",
                                "fundl rnn(lstm_cell)",
                                "fundl rnn(lstm_cell, fused_backward=False)"]  # fmt: skip
    assert case["notes"][0].startswith("fundl / plain JAX lax.scan = ")
    assert "fundl rnn(lstm_cell) / fastest (" in case["notes"][0]
    assert case["notes"][1].startswith("with fused_backward=False: fundl / plain JAX lax.scan = ")
    assert "compile(1024) / compile(16) = " in case["notes"][2]


@pytest.mark.slow  # runs python -m benchmarks --quick in subprocesses (FUNDL_SLOW=1; CI runs it)
def test_attention_and_transformer_suites(quick):
    _, records, _ = quick
    case = _case(records, "causal self-attention train step")
    assert _names(case)[:3] == ["jax.nn.dot_product_attention", "explicit softmax", "fundl"]
    assert case["notes"][0].startswith("fundl / fastest (")
    assert _names(_case(records, "decoder block train step")) == ["plain JAX", "fundl"]
    compile_ = _case(records, "compile time of a train step, decoder blocks")
    assert _names(compile_) == ["repeat(block, 1)", "repeat(block, 2)",
                                "serial of 2 blocks (unrolled)"]  # fmt: skip
    assert compile_["notes"][0].startswith("repeat(2) / repeat(1) = ")


@pytest.mark.slow  # runs python -m benchmarks --quick in subprocesses (FUNDL_SLOW=1; CI runs it)
def test_fit_suite(quick):
    _, records, _ = quick
    for what in ("steady time per epoch", "total time of 3 epochs incl. compilation"):
        case = _case(
            records, f"training loop, digits MLP, batch 32, 280 examples (9 steps/epoch): {what}"
        )
        names = _names(case)
        assert names[:5] == ["plain JAX, step", "plain JAX, scan", "fl.fit K=1", "fl.fit K=3",
                             "fl.fit K=9"]  # fmt: skip
        keras = "Keras 3 (jax)" in names
        assert keras or any(n.startswith(("keras not installed: keras 3 skipped", "Keras runs on"))
                            for n in case["notes"])  # fmt: skip
    notes = " ".join(
        _case(records, "training loop, digits MLP, batch 32, 280 examples (9 steps/epoch): steady")[
            "notes"
        ]
    )
    assert "fit K=1 / plain step loop = " in notes and "(target <= 1.05)" in notes
    assert "plain step loop / fit K=9 = " in notes and "(target >= 3)" in notes


@pytest.mark.parametrize(("module", "label"), [("flax", "flax linen"), ("equinox", "equinox"),
                                               ("haiku", "haiku")])  # fmt: skip
@pytest.mark.slow  # runs python -m benchmarks --quick in subprocesses (FUNDL_SLOW=1; CI runs it)
def test_peers_run_or_are_skipped_with_a_note(quick, module, label):
    _, records, _ = quick
    case = _case(records, "mlp train step, batch 8")
    if importlib.util.find_spec(module) is None:
        assert label not in _names(case)
        assert any(n.startswith(f"{'dm-haiku' if module == 'haiku' else module} not installed")
                   for n in case["notes"])  # fmt: skip
    else:
        assert label in _names(case)


@pytest.mark.slow  # runs python -m benchmarks --quick in subprocesses (FUNDL_SLOW=1; CI runs it)
def test_plot_is_written(quick):
    printed, _, out = quick
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib not installed: no plot written" in printed
    pytest.importorskip("matplotlib")
    assert (out / "ratios.png").read_bytes().startswith(b"\x89PNG")


def test_report_table_json_and_plot(tmp_path):
    """The timing and the report, on trivial work: ratios, table columns, notes, JSON keys."""
    res = measure("trivial", {"plain JAX": lambda: None, "fundl": lambda: sum(range(1000))},
                  rounds=3)  # fmt: skip
    assert isinstance(res, CaseResult) and res.timings[0].ratio == 1.0
    assert res.timings[1].ratio > 0 and res.timings[1].cpu_median_s >= 0
    assert note_vs_fastest(res).startswith("fundl / fastest (")
    table = format_table([res])
    assert "trivial  (time per step; ratio = median / plain JAX)" in table
    for column in ("median", "IQR", "ratio", "CPU", "compile", "XLA mem", "peak memory"):
        assert column in table
    write_json([res], str(tmp_path / "r.json"))
    record = json.loads((tmp_path / "r.json").read_text())
    assert {"jax", "backend", "device_kind", "cpu_count"} <= set(record["environment"])
    assert record["results"][0]["timings"][1]["name"] == "fundl"
    if importlib.util.find_spec("matplotlib") is None:
        assert plot([res], str(tmp_path / "r.png")) is False
    else:
        assert plot([res], str(tmp_path / "r.png")) is True


@pytest.mark.slow  # runs python -m benchmarks --quick in subprocesses (FUNDL_SLOW=1; CI runs it)
def test_gpu_option_smoke(tmp_path):
    """``--gpu --quick``: bfloat16 cases with throughput and MFU in the notes and the JSON.

    Tiny sizes in bfloat16 on the CPU (the code path of the GPU run, not its sizes); the
    peak is given, as the CPU has none in ``benchmarks.costs``' table. Structure only.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
    path = tmp_path / "gpu.json"
    args = [sys.executable, "-m", "benchmarks", "--gpu", "--quick", "--peak-tflops", "1",
            "--suite", "mlp", "--suite", "fit", "--json", str(path)]  # fmt: skip
    proc = subprocess.run(args, cwd=ROOT, env=env, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--gpu: compute dtype bfloat16, peak 1 TFLOP/s" in proc.stdout
    assert "fit suite skipped under --gpu" in proc.stdout
    (case,) = json.loads(path.read_text())["results"]  # mlp only: fit skipped
    assert case["case"] == "mlp train step, batch 8, bfloat16"
    assert _names(case)[:3] == ["plain JAX", "fundl", "stax"]
    assert set(case["speed"]) == set(_names(case))
    for name, speed in case["speed"].items():
        assert speed["throughput_unit"] == "examples/s" and speed["throughput"] > 0
        assert speed["model_flops_per_step"] > 0 and speed["peak_tflops"] == 1
        assert 0 < speed["mfu"] == speed["model_tflops"] / 1, name
    assert case["speed"]["plain JAX"]["xla_flops_per_step"] > 0
    (note,) = [n for n in case["notes"] if n.startswith("throughput and MFU (")]
    assert "XLA cost analysis of the baseline's step; peak 1 TFLOP/s" in note
    for name in ("plain JAX", "fundl"):
        assert f"; {name} " in f"; {note.split('): ', 1)[1]}" and "% MFU" in note
    assert note in proc.stdout


@pytest.mark.slow  # runs python -m benchmarks --quick in subprocesses (FUNDL_SLOW=1; CI runs it)
def test_default_run_writes_no_speed(quick):
    """Without ``--gpu`` the JSON record keeps its keys: no ``speed`` entry."""
    _, records, _ = quick
    assert not any("speed" in case for case in _cases(records).values())


def test_rotations_run_each_once_per_round_in_turn():
    orders = list(rotations(["a", "b", "c"], 4))
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_iqr_is_the_nearest_rank_interquartile_range():
    assert iqr([5.0, 1.0, 3.0, 2.0, 4.0, 6.0, 8.0, 7.0]) == 7.0 - 3.0  # sorted: q1 3, q3 7
    assert iqr([2.0]) == 0.0


def test_measure_reports_the_slower_function_slower():
    # Sleeps, not work: a busy shared machine stretches work, not a sleep's floor.
    res = measure("sleep", {"short": lambda: time.sleep(1e-3), "long": lambda: time.sleep(2e-2)},
                  rounds=5)  # fmt: skip
    short, long = res.timings
    assert short.ratio == 1.0 and long.ratio > 5 and long.median_s >= 2e-2
    assert len(long.samples) == 5 and long.iqr_s >= 0


def test_measure_times_the_first_call_apart_from_the_rounds():
    # The first call stands for a compilation: it is the compile time, in no round.
    calls = []

    def run():
        calls.append(None)
        time.sleep(0.2 if len(calls) == 1 else 0)

    (t,) = measure("compile", {"f": run}, rounds=3).timings
    assert len(calls) == 1 + 1 + 3  # compile, warm-up, rounds
    assert t.compile_s >= 0.2 and max(t.samples) < 0.2


def test_peers_note_a_missing_peer_once(monkeypatch):
    monkeypatch.setitem(peers.PEERS, "absent", peers.Peer("no_such_module_for_fundl", "absent-pkg"))
    makers = {"absent a": ("absent", lambda m: "a"), "absent b": ("absent", lambda m: "b"),
              "stax": ("stax", lambda stax: stax.Dense)}  # fmt: skip
    impls, notes = peers.build(makers)
    assert list(impls) == ["stax"] and callable(impls["stax"])
    assert notes == ["absent-pkg not installed: absent skipped (pip install -e '.[bench]')"]


def test_peers_skip_in_a_dtype_they_do_not_take_from_a_cast():
    makers = {"keras 3 x": ("keras 3", lambda keras: "x"), "stax": ("stax", lambda stax: "s")}
    impls, notes = peers.build(makers, "bfloat16", skips={"stax": "a reason"})
    assert impls == {}
    assert notes == ["keras 3 skipped in bfloat16: Keras sets precision by a global dtype policy",
                     "stax skipped in bfloat16: a reason"]  # fmt: skip
