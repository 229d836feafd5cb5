"""fundl.bench: recompiles named, slower work reported slower, compilation timed apart,
XLA's FLOP count, JSON with the environment, the one-call train step and inference costs."""

import importlib.util
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fundl as fl
from fundl import bench


def _grow(x, scale):
    """A step whose output is one longer than its input: every call compiles anew."""
    return jnp.concatenate([x, x[:1]]) * scale, scale


def test_a_recompiling_step_is_reported_with_the_changing_argument():
    step = jax.jit(_grow)
    with pytest.warns(bench.RecompileWarning) as record:
        res = bench.compare({"grow": step}, jnp.ones(4), jnp.float32(2.0), rounds=3,
                            next_args=lambda args, out: out)  # fmt: skip
    (t,) = res.timings
    assert t.recompiles == 1 + 3  # the warm-up call and every round
    (message,) = [str(w.message) for w in record]
    # scale is not named: its shape and dtype stay
    assert message == (
        "grow compiled 4 time(s) after its first call, so its times include compiling: the "
        "arguments that changed since the first call: x: float32[4] -> float32[5], "
        "float32[6], float32[7], ... (4 in all) (its jit cache holds 5 programs)"
    )
    assert res.notes == (message,)


def test_a_changing_static_argument_is_named_with_its_values():
    step = jax.jit(lambda x, n: x * n, static_argnames="n")
    with pytest.warns(
        bench.RecompileWarning,
        match=r"first call: n: int 1 -> int 2, int 3 \(its jit cache holds 3 programs\)$",
    ):
        bench.compare({"scale": step}, jnp.ones(3), 1, rounds=1,
                      next_args=lambda args, out: (args[0], args[1] + 1))  # fmt: skip


def test_a_recompile_without_a_changed_argument_says_so():
    def fresh_jit(x):  # a new jax.jit each call: nothing is cached
        return jax.jit(lambda x: x + 1)(x)

    with pytest.warns(bench.RecompileWarning, match="no argument's shape, dtype or Python value"):
        bench.compare({"fresh": fresh_jit}, jnp.ones(3), rounds=2)


def test_a_stable_step_warns_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = bench.compare({"f": jax.jit(jnp.sin)}, jnp.ones(3), rounds=2)
    assert res["f"].recompiles == 0 and res.notes == ()


def test_the_slower_function_of_a_pair_is_reported_slower():
    # The same matmul done once and 4 times in a chain (no common subexpression to share).
    # On a busy 2-core machine the interleaved rounds see the same load: a wide margin.
    x = jax.random.normal(jax.random.key(0), (192, 192))
    once = jax.jit(lambda x: x @ x)
    four = jax.jit(lambda x: (((x @ x) @ x) @ x) @ x)
    res = bench.compare({"once": once, "four": four}, x, rounds=9)
    assert res["once"].ratio == 1.0
    assert res["four"].ratio > 2.0 and res["four"].median_s > 2 * res["once"].median_s
    assert len(res["four"].samples) == 9 and res["four"].iqr_s >= 0


def test_the_ratios_divide_by_the_chosen_baseline():
    res = bench.time_runs({"a": lambda: None, "b": lambda: sum(range(100))}, rounds=3,
                          baseline="b")  # fmt: skip
    assert res["b"].ratio == 1.0 and res.baseline == "b"
    assert "ratio = median / b)" in res.table()
    with pytest.raises(ValueError, match=r"baseline 'c' is not one of the names \['a', 'b'\]"):
        bench.time_runs({"a": lambda: None, "b": lambda: None}, baseline="c")
    with pytest.raises(ValueError, match="time_runs: rounds must be at least 1, got 0"):
        bench.time_runs({"a": lambda: None}, rounds=0)
    with pytest.raises(ValueError, match=r"compare: nothing to time; pass a dict \{name: "):
        bench.compare({}, jnp.ones(3))


def test_timings_leave_compilation_out():
    def chain(x):  # many small ops on a tiny input: compiling dominates
        for i in range(60):
            x = jnp.sin(x) * (i + 1.0) if i % 2 else jnp.cos(x) + i
        return x

    res = bench.compare({"chain": jax.jit(chain)}, jnp.ones(4), rounds=5)
    t = res["chain"]
    assert t.compile.trace_s > 0 and t.compile.lower_s > 0 and t.compile.compile_s > 0
    assert t.compile_s >= t.compile.total_s  # stages, then the first call
    assert 20 * t.median_s < t.compile.total_s
    assert max(t.samples) < t.compile_s and len(t.samples) == 5


def test_matmul_flops_are_2mnk_and_mfu_uses_the_given_peak():
    m, n, k = 16, 24, 40
    a, b = jnp.ones((m, k)), jnp.ones((k, n))
    res = bench.compare({"matmul": jax.jit(jnp.matmul)}, a, b, rounds=2, peak_tflops=1.0,
                        items=m)  # fmt: skip
    t = res["matmul"]
    # XLA may count a few more FLOPs than the multiply-adds (none here on the CPU): 1%.
    np.testing.assert_allclose(t.costs.flops, 2 * m * n * k, rtol=1e-2)
    assert t.costs.argument_bytes == (m * k + k * n) * 4 and t.costs.output_bytes == m * n * 4
    assert t.memory_bytes == t.costs.memory_bytes > 0
    assert t.mfu == pytest.approx(t.costs.flops / t.median_s / 1e12)
    assert t.items_per_s == pytest.approx(m / t.median_s)


def test_peaks_are_known_or_none():
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.peak_tflops("cpu") is None
    assert bench.mfu(None, 1.0, 989.0) is None and bench.mfu(1e12, 1.0, None) is None


def test_json_round_trips_with_the_environment(tmp_path):
    res = bench.compare({"f": jax.jit(jnp.cos), "g": jax.jit(jnp.sin)}, jnp.ones(8), rounds=3)
    text = res.to_json()
    env = json.loads(text)["environment"]
    assert env["jax"] == jax.__version__ and env["backend"] == jax.default_backend()
    assert env["device_kind"] == jax.devices()[0].device_kind and env["cpu_count"] >= 1
    back = bench.from_json(text)
    assert back == res
    assert isinstance(back["g"].compile, bench.CompileCost)
    assert isinstance(back["g"].costs, bench.XlaCosts)


def test_the_table_has_every_column_and_row():
    res = bench.compare({"f": jax.jit(jnp.cos)}, jnp.ones(8), rounds=2, items=8,
                        case="cosine")  # fmt: skip
    text = str(res)
    assert text == res.table() == bench.table([res])
    assert "cosine  (time per call; ratio = median / f)" in text
    for column in ("median", "IQR", "ratio", "CPU", "compile", "XLA mem", "peak memory"):
        assert column in text
    assert "trace " in text and ", lower " in text and "items/s" in text


def test_plot_draws_a_figure(tmp_path):
    res = bench.time_runs({"a": lambda: None, "b": lambda: None}, rounds=2)
    if importlib.util.find_spec("matplotlib") is None:
        with pytest.raises(ImportError):
            res.plot()
        return
    fig = res.plot(str(tmp_path / "r.png"))
    assert len(fig.axes) == 1 and (tmp_path / "r.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow  # two train steps compiled (fundl's alone takes 1 s on a CPU core)
def test_train_step_cost_against_a_hand_written_step():
    model = fl.dense(3)
    opt = optax.sgd(0.1)
    x, y = jnp.ones((8, 5)), jnp.zeros((8, 3))

    def loss(out, t):
        return jnp.mean((out - t) ** 2)

    @jax.jit
    def plain(carry, batch):  # the same model and update, by hand
        params, opt_state = carry
        grads = jax.grad(lambda p: loss(batch[0] @ p["w"] + p["b"][None], batch[1]))(params)
        updates, opt_state = opt.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), None

    params, _ = model.init(jax.random.key(0), x)
    against = {"plain": (plain, (params, opt.init(params)))}
    res = fl.bench.train_step_cost(model, loss, opt, (x, y), rounds=3, against=against)
    assert [t.name for t in res.timings] == ["fundl", "plain"]
    assert res.case == "train step, batch 8" and res.unit == "train step"
    for t in res.timings:
        assert t.recompiles == 0 and t.items_per_s == pytest.approx(8 / t.median_s)
        # forward x @ w: 2 * 8 * 5 * 3 FLOPs, the backward pass about twice that
        assert t.costs.flops > 2 * 8 * 5 * 3 * 2 and t.memory_bytes > 0


def test_inference_cost_counts_the_forward_pass():
    x = jnp.ones((4, 6))
    res = fl.bench.inference_cost(fl.dense(5, use_bias=False), x, rounds=2)
    # the multiply-adds; XLA may count a few FLOPs more (as in the matmul test above): 1%
    np.testing.assert_allclose(res["fundl"].costs.flops, 2 * 4 * 6 * 5, rtol=1e-2)
    assert res["fundl"].items_per_s == pytest.approx(4 / res["fundl"].median_s)
