"""LSTM train step: fundl vs a hand-written lax.scan, Flax linen, Equinox and Keras 3.

One adam step on an LSTM (batch 32, 128 steps, 64 inputs, 256 hidden, float32) with a
squared-error loss on every step's output, forward and backward through the scan. Each
implementation runs in interleaved rounds (so that machine noise hits all of them alike);
the script prints each one's median time per step and its ratio to the fastest, then
fundl's compile time at 1,024 steps over that at 16 steps (the scan compiles once, so the
ratio should stay near 1; target <= 1.3).

Peers are optional: Flax (``pip install flax``), Equinox (``pip install equinox``) and
Keras 3 with the JAX backend (``pip install keras``) are measured when installed, and
skipped with a note otherwise. fundl depends on none of them.

    python benchmarks/rnn_step.py [--rounds 7] [--steps 5] [--unroll 1]
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


# -- hand-written lax.scan, input projection hoisted ------------------------------------------


def scan_case(x, y, unroll: int = 1):
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {
        "wi": jax.nn.initializers.glorot_uniform()(k1, (FEATURES, 4 * HIDDEN)),
        "wh": jax.nn.initializers.orthogonal()(k2, (HIDDEN, 4 * HIDDEN)),
        "b": jnp.zeros((4 * HIDDEN,)),
    }

    def forward(params, x):
        xp = x @ params["wi"] + params["b"].reshape(1, 1, -1)  # [B, T, 4H], hoisted

        def body(carry, xp_t):
            h, c = carry
            z = xp_t + h @ params["wh"]
            i, f, g, o = jnp.split(z, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        zeros = jnp.zeros((x.shape[0], HIDDEN), x.dtype)
        _, hs = jax.lax.scan(body, (zeros, zeros), jnp.swapaxes(xp, 0, 1), unroll=unroll)
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

    def loss_fn(trainable, x, y):
        ys, _ = layer.stateless_call(trainable, [], x)
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


def time_steps(step, carry, x, y, n: int) -> tuple[float, tuple]:
    params, opt_state = carry
    start = time.perf_counter()
    for _ in range(n):
        params, opt_state, loss = step(params, opt_state, x, y)
    jax.block_until_ready((params, loss))
    return (time.perf_counter() - start) / n, (params, opt_state)


def compile_seconds(time_steps_: int, repeats: int = 3, unroll: int = 1) -> float:
    """Median seconds to lower and compile fundl's train step for ``time_steps_`` steps."""
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
        start = time.perf_counter()
        jax.jit(step).lower(params, opt_state, x, y).compile()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main(rounds: int = 7, steps: int = 5, unroll: int = 1) -> dict[str, float]:
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
    }
    for label, (make, module) in PEERS.items():
        try:
            cases[label] = make(x, y)
        except ImportError as err:
            print(f"  skipped {label}: {module} is not installed ({err})")
    carries = {}
    for label, (step, carry) in cases.items():  # compile and warm up
        _, carries[label] = time_steps(step, carry, x, y, 2)
    samples: dict[str, list[float]] = {label: [] for label in cases}
    for _ in range(rounds):
        for label, (step, _) in cases.items():
            seconds, carries[label] = time_steps(step, carries[label], x, y, steps)
            samples[label].append(seconds)
    medians = {label: statistics.median(s) for label, s in samples.items()}
    fastest = min(medians.values())
    for label, m in sorted(medians.items(), key=lambda kv: kv[1]):
        print(f"  {label:40s} {m * 1e3:8.2f} ms/step   {m / fastest:5.2f}x fastest")
    peers = {k: v for k, v in medians.items() if not k.startswith("fundl")}
    best_peer = min(peers, key=peers.get)
    ratio = medians["fundl rnn(lstm_cell)"] / peers[best_peer]
    print(f"fundl / fastest other ({best_peer}): {ratio:.3f}x (target <= 1.0)")
    c16, c1024 = compile_seconds(16, unroll=unroll), compile_seconds(1024, unroll=unroll)
    print(
        f"fundl compile: {c16:.2f} s at 16 steps, {c1024:.2f} s at 1024 steps, "
        f"ratio {c1024 / c16:.2f} (target <= 1.3)"
    )
    return {"fundl_vs_fastest_other": ratio, "compile_ratio": c1024 / c16, **medians}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--unroll", type=int, default=1)
    args = parser.parse_args()
    main(args.rounds, args.steps, args.unroll)
