"""LSTM train step: fundl vs a hand-written lax.scan, Flax linen, Equinox and Keras 3.

One adam step on an LSTM (batch 32, 128 steps, 64 inputs, 256 hidden, float32) with a
squared-error loss on every step's output, forward and backward through the scan. Each
implementation runs in interleaved rounds (so that machine noise hits all of them alike);
the script prints each one's median time per step (wall clock, and the process's CPU time,
which a busy shared machine disturbs less) and its ratio to the fastest, then
fundl's compile time at 1,024 steps over that at 16 steps (the scan compiles once, so the
ratio should stay near 1; target <= 1.3).

Two hand-written references: the issue's, which hoists the input projection out of the
scan (one big matmul), and one that projects inside each step. On a 2-core CPU the in-step
one is ~20% faster (the hoisted ``(time, batch, 4H)`` buffer costs more memory traffic than
the big matmul saves), which is why ``fl.rnn`` hoists only on GPU and TPU by default.

Peers are optional: Flax (``pip install flax``), Equinox (``pip install equinox``) and
Keras 3 with the JAX backend (``pip install keras``) are measured when installed, and
skipped with a note otherwise. fundl depends on none of them.

    python benchmarks/rnn_step.py [--rounds 7] [--steps 5] [--unroll 1] [--only flax] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fundl as fl

BATCH, TIME, FEATURES, HIDDEN = 32, 128, 64, 256
optimizer = optax.adam(1e-3)


def make_trainer(loss_fn: Callable, params) -> tuple[Callable, tuple]:
    """A jitted adam step on ``loss_fn(params, x, y)`` and its initial (params, opt_state)."""

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, (params, optimizer.init(params))


def mse(ys: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(ys - y))


# -- fundl ---------------------------------------------------------------------------------


def fundl_case(x, y, unroll: int = 1):
    layer = fl.rnn(fl.lstm_cell(HIDDEN), unroll=unroll)
    params, state = layer.init(jax.random.key(0), x)

    def loss_fn(params, x, y):
        return mse(layer.apply(params, state, x)[0], y)

    return make_trainer(loss_fn, params)


# -- hand-written lax.scan: input projection hoisted (the reference), or in the step --


def scan_case(x, y, unroll: int = 1, hoist: bool = True):
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {
        "wi": jax.nn.initializers.glorot_uniform()(k1, (FEATURES, 4 * HIDDEN)),
        "wh": jax.nn.initializers.orthogonal()(k2, (HIDDEN, 4 * HIDDEN)),
        "b": jnp.zeros((4 * HIDDEN,)),
    }

    def forward(params, x):
        # Hoisted: [B, T, 4H] projected before the scan; else projected step by step.
        xs = x @ params["wi"] + params["b"].reshape(1, 1, -1) if hoist else x

        def body(carry, xs_t):
            h, c = carry
            if hoist:
                z = xs_t + h @ params["wh"]
            else:
                z = xs_t @ params["wi"] + h @ params["wh"] + params["b"].reshape(1, -1)
            i, f, g, o = jnp.split(z, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        zeros = jnp.zeros((x.shape[0], HIDDEN), x.dtype)
        _, hs = jax.lax.scan(body, (zeros, zeros), jnp.swapaxes(xs, 0, 1), unroll=unroll)
        return jnp.swapaxes(hs, 0, 1)

    return make_trainer(lambda p, x, y: mse(forward(p, x), y), params)


# -- peers, when installed -----------------------------------------------------------------


def flax_case(x, y, optimized: bool = False):
    import flax.linen as nn

    cell = nn.OptimizedLSTMCell(HIDDEN) if optimized else nn.LSTMCell(HIDDEN)
    model = nn.RNN(cell)
    params = model.init(jax.random.key(0), x)
    return make_trainer(lambda p, x, y: mse(model.apply(p, x), y), params)


def equinox_case(x, y):
    import equinox as eqx

    cell = eqx.nn.LSTMCell(FEATURES, HIDDEN, key=jax.random.key(0))
    params, static = eqx.partition(cell, eqx.is_array)

    def forward(params, x):
        cell = eqx.combine(params, static)

        def run(seq):  # one sequence, [T, in]
            def body(carry, x_t):
                carry = cell(x_t, carry)
                return carry, carry[0]

            zeros = jnp.zeros((HIDDEN,), seq.dtype)
            return jax.lax.scan(body, (zeros, zeros), seq)[1]

        return jax.vmap(run)(x)

    return make_trainer(lambda p, x, y: mse(forward(p, x), y), params)


def keras_case(x, y):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    if keras.backend.backend() != "jax":
        raise ImportError("Keras is installed with a backend other than JAX")
    layer = keras.layers.LSTM(HIDDEN, return_sequences=True)
    layer.build(x.shape)
    trainable = [v.value for v in layer.trainable_variables]
    fixed = [v.value for v in layer.non_trainable_variables]  # e.g. the seed generator

    def loss_fn(trainable, x, y):
        ys, _ = layer.stateless_call(trainable, fixed, x)
        return mse(ys, y)

    return make_trainer(loss_fn, trainable)


PEERS = {
    "flax linen nn.RNN(LSTMCell)": (flax_case, "flax"),
    "flax linen nn.RNN(OptimizedLSTMCell)": (
        lambda x, y: flax_case(x, y, optimized=True),
        "flax",
    ),
    "equinox LSTMCell + lax.scan": (equinox_case, "equinox"),
    "keras 3 LSTM (jax backend)": (keras_case, "keras"),
}


# -- timing --------------------------------------------------------------------------------


def time_steps(step, carry, x, y, n: int) -> tuple[float, float, tuple]:
    """Wall-clock and process CPU seconds per step over ``n`` chained steps."""
    params, opt_state = carry
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        params, opt_state, loss = step(params, opt_state, x, y)
    jax.block_until_ready((params, loss))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return wall / n, cpu / n, (params, opt_state)


def compile_seconds(time_steps_: int, repeats: int = 3, unroll: int = 1) -> float:
    """Median CPU seconds to trace, lower and compile fundl's train step at ``time_steps_``."""
    x = jax.ShapeDtypeStruct((BATCH, time_steps_, FEATURES), jnp.float32)
    y = jax.ShapeDtypeStruct((BATCH, time_steps_, HIDDEN), jnp.float32)
    samples = []
    for _ in range(repeats):
        layer = fl.rnn(fl.lstm_cell(HIDDEN), unroll=unroll)  # a fresh function: no cache hit
        params, state = layer.init(jax.random.key(0), x)

        def loss_fn(params, x, y, layer=layer, state=state):
            return mse(layer.apply(params, state, x)[0], y)

        def step(params, opt_state, x, y, loss_fn=loss_fn):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        opt_state = optimizer.init(params)
        start = time.process_time()  # compiling is single-threaded: CPU time, less noisy
        jax.jit(step).lower(params, opt_state, x, y).compile()
        samples.append(time.process_time() - start)
    return statistics.median(samples)


def main(
    rounds: int = 7,
    steps: int = 5,
    unroll: int = 1,
    only: str | None = None,
    quick: bool = False,
) -> dict[str, float]:
    global BATCH, TIME, FEATURES, HIDDEN
    sizes = BATCH, TIME, FEATURES, HIDDEN
    if quick:  # a smoke run on tiny sizes (the test suite's), not a measurement
        BATCH, TIME, FEATURES, HIDDEN = 2, 4, 3, 5
    try:
        return _run(rounds, steps, unroll, only)
    finally:
        BATCH, TIME, FEATURES, HIDDEN = sizes


def _run(rounds: int, steps: int, unroll: int, only: str | None) -> dict[str, float]:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((BATCH, TIME, FEATURES)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((BATCH, TIME, HIDDEN)), jnp.float32)
    print(
        f"LSTM train step (adam): batch {BATCH}, {TIME} steps, {FEATURES} inputs, "
        f"{HIDDEN} hidden, float32, {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPUs; {rounds} interleaved rounds of {steps} steps"
    )
    cases: dict[str, tuple] = {
        "fundl rnn(lstm_cell)": fundl_case(x, y, unroll),
        "hand-written lax.scan (hoisted)": scan_case(x, y, unroll),
        "hand-written lax.scan (in-step projection)": scan_case(x, y, unroll, hoist=False),
    }
    for label, (make, module) in PEERS.items():
        if only and only not in label:
            continue
        try:
            cases[label] = make(x, y)
        except ImportError as err:
            print(f"  skipped {label}: {module} is not installed ({err})")
    carries = {}
    for label, (step, carry) in cases.items():  # compile and warm up
        *_, carries[label] = time_steps(step, carry, x, y, 2)
    walls: dict[str, list[float]] = {label: [] for label in cases}
    cpus: dict[str, list[float]] = {label: [] for label in cases}
    labels = list(cases)
    for r in range(rounds):  # alternate the order, so that no one always runs first
        for label in labels if r % 2 == 0 else labels[::-1]:
            step = cases[label][0]
            wall, cpu, carries[label] = time_steps(step, carries[label], x, y, steps)
            walls[label].append(wall)
            cpus[label].append(cpu)
    medians = {label: statistics.median(s) for label, s in walls.items()}
    cpu_medians = {label: statistics.median(s) for label, s in cpus.items()}
    fastest, fastest_cpu = min(medians.values()), min(cpu_medians.values())
    print(f"  {'':44s} {'wall ms/step':>12s} {'vs fastest':>10s} {'CPU ms/step':>12s} {'vs':>6s}")
    for label, m in sorted(medians.items(), key=lambda kv: kv[1]):
        c = cpu_medians[label]
        print(
            f"  {label:44s} {m * 1e3:12.2f} {m / fastest:9.2f}x {c * 1e3:12.2f} "
            f"{c / fastest_cpu:5.2f}x"
        )
    ratio = ratio_cpu = 0.0
    for what, table in (("wall", medians), ("CPU", cpu_medians)):
        others = {k: v for k, v in table.items() if not k.startswith("fundl")}
        best = min(others, key=others.get)
        r = table["fundl rnn(lstm_cell)"] / others[best]
        print(f"fundl / fastest other, {what} time ({best}): {r:.3f}x (target <= 1.0)")
        ratio, ratio_cpu = (r, ratio_cpu) if what == "wall" else (ratio, r)
    compile_seconds(16, repeats=1, unroll=unroll)  # warm up tracing caches
    c16s, c1024s = [], []
    for _ in range(5):  # interleaved, medians
        c16s.append(compile_seconds(16, repeats=1, unroll=unroll))
        c1024s.append(compile_seconds(1024, repeats=1, unroll=unroll))
    c16, c1024 = statistics.median(c16s), statistics.median(c1024s)
    print(
        f"fundl compile (CPU time): {c16:.2f} s at 16 steps, {c1024:.2f} s at 1024 steps, "
        f"ratio {c1024 / c16:.2f} (target <= 1.3)"
    )
    return {
        "fundl_vs_fastest_other": ratio,
        "fundl_vs_fastest_other_cpu_time": ratio_cpu,
        "compile_ratio": c1024 / c16,
        **medians,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--unroll", type=int, default=1)
    parser.add_argument("--only", help="run only the peers whose name contains this")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    args = parser.parse_args()
    main(args.rounds, args.steps, args.unroll, args.only, args.quick)
