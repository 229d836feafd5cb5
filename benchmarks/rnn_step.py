"""LSTM train step: fundl vs hand-written ``lax.scan`` LSTMs, Flax linen, Equinox and Keras 3.

    python -m benchmarks --suite rnn          # or: python -m benchmarks.rnn_step [--quick]

One adam step on an LSTM (batch 32, 128 steps, 64 inputs, 256 hidden, float32) with a
squared-error loss on every step's output, forward and backward through the scan; params and
optimizer state donated. Every implementation starts from the same weights (fundl's init:
glorot input kernels, orthogonal recurrent kernels, forget bias 1) and their first losses are
compared before timing, so all compute the same thing. They run interleaved round by round
(``benchmarks.timing``); the case reports each one's median and spread, its ratio to plain
JAX and, as a note, fundl's ratio to the fastest implementation of the run (target <= 1.0),
then fundl's compile time at 1,024 steps over that at 16 steps (the scan compiles once, so
the ratio should stay near 1; target <= 1.3). Then batch 8 and 64 and hidden 128 and 512
(:data:`SWEEP`) against the hand-written scan, Flax linen and Equinox.

Two hand-written references: the baseline projects the input inside each step; the other
(the textbook form) hoists the input projection out of the scan (one big matmul). On a 2-core CPU
the in-step one is ~20% faster (the hoisted ``(time, batch, 4H)`` buffer costs more memory
traffic than the big matmul saves), which is why ``fl.rnn`` hoists only on GPU and TPU.

Peers are optional: Flax linen (``nn.RNN`` of ``LSTMCell`` and of ``OptimizedLSTMCell``),
Equinox (``LSTMCell`` under ``lax.scan`` and ``vmap``) and Keras 3 on the JAX backend
(``keras.layers.LSTM`` through ``stateless_call``) are measured when installed
(``pip install -e '.[bench]'``), and skipped with a note otherwise.

    python -m benchmarks.rnn_step [--rounds 7] [--steps 5] [--unroll 1] [--only flax] [--quick]

``python -m benchmarks --gpu`` runs batch 256, 256 steps, 512 inputs, 1,024 hidden in
bfloat16 (inputs and carry; float32 params cast in the loss, fundl's cell with ``dtype``) with
throughput (tokens = batch x steps) and MFU notes; Equinox is the one peer whose bfloat16 setup
is a plain cast (Flax linen's carry follows its cells' float32 ``param_dtype``; Keras 3 sets
precision by a global dtype policy), and the compile-time ratio is left to the CPU run.
"""

from __future__ import annotations

import functools
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fundl as fl
from benchmarks import peers
from benchmarks.costs import Speed
from benchmarks.report import main, note_vs_fastest
from benchmarks.steps import GpuRun, in_dtype, make_step, measure_run, mse
from benchmarks.timing import CaseResult, timed

SIZES = {"batch": 32, "time": 128, "features": 64, "hidden": 256}
QUICK = {"batch": 2, "time": 4, "features": 3, "hidden": 5}
"""The tiny sizes of ``--quick`` (a smoke run, not a measurement)."""
GPU = {"batch": 256, "time": 256, "features": 512, "hidden": 1024}
"""The sizes of ``--gpu``."""
GPU_SKIPS = {"flax linen": "nn.RNN's carry takes its cell's param_dtype (float32), so no plain "
             "bfloat16 run"}  # fmt: skip
"""Peers that ``--gpu`` skips besides Keras 3 (see :mod:`benchmarks.peers`), and why."""


UNFUSED = "fundl rnn(lstm_cell, fused_backward=False)"
"""fundl with JAX's autodiff of the scan (the params' gradients accumulated in the loop)."""
SWEEP = ({**SIZES, "batch": 8}, {**SIZES, "batch": 64}, {**SIZES, "hidden": 128},
         {**SIZES, "hidden": 512})  # fmt: skip
"""More sizes (CPU runs, not ``--quick``): batch 8 and 64, hidden 128 and 512."""
SWEEP_NAMES = ("plain JAX lax.scan", "fundl rnn(lstm_cell)", "flax linen nn.RNN(LSTMCell)",
               "flax linen nn.RNN(OptimizedLSTMCell)", "equinox LSTMCell + lax.scan")  # fmt: skip
"""The implementations each sweep size runs (the main size runs them all)."""


def _plain_loss(hoist: bool, unroll: int):
    """A hand-written LSTM loss over fundl's params ``{"wi", "wh", "b"}``."""

    def forward(params, x):
        hidden = params["wh"].shape[0]
        # Hoisted: (batch, time, 4H) projected before the scan; else projected step by step.
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

        zeros = jnp.zeros((x.shape[0], hidden), x.dtype)
        _, hs = jax.lax.scan(body, (zeros, zeros), jnp.swapaxes(xs, 0, 1), unroll=unroll)
        return jnp.swapaxes(hs, 0, 1)

    return lambda p, x, y: mse(forward(p, x), y)


def _gates(a: jax.Array) -> list[jax.Array]:
    """The four gate blocks (input, forget, cell, output) of a ``(..., 4H)`` array."""
    return jnp.split(a, 4, axis=-1)


def flax_case(weights, nn, optimized: bool = False):
    """Flax linen (``nn``) ``nn.RNN`` of an LSTM cell: ``(loss, params)``."""
    hidden = weights["wh"].shape[0]
    cell = nn.OptimizedLSTMCell(hidden) if optimized else nn.LSTMCell(hidden)
    model = nn.RNN(cell)
    params = {}
    for g, wi, wh, b in zip("ifgo", _gates(weights["wi"]), _gates(weights["wh"]),
                            _gates(weights["b"]), strict=True):  # fmt: skip
        params[f"i{g}"] = {"kernel": wi}
        params[f"h{g}"] = {"kernel": wh, "bias": b}
    return lambda p, x, y: mse(model.apply(p, x), y), {"params": {"cell": params}}


def equinox_case(weights, eqx):
    """Equinox ``LSTMCell`` under ``lax.scan``, batched with ``vmap``: ``(loss, params)``."""
    n_in, hidden = weights["wi"].shape[0], weights["wh"].shape[0]
    cell = eqx.nn.LSTMCell(n_in, hidden, key=jax.random.key(0))
    cell = eqx.tree_at(lambda c: (c.weight_ih, c.weight_hh, c.bias), cell,
                       (weights["wi"].T, weights["wh"].T, weights["b"]))  # fmt: skip
    params, static = eqx.partition(cell, eqx.is_array)

    def forward(params, x):
        cell = eqx.combine(params, static)

        def run(seq):  # one sequence, (time, in)
            def body(carry, x_t):
                carry = cell(x_t, carry)
                return carry, carry[0]

            zeros = jnp.zeros((hidden,), seq.dtype)
            return jax.lax.scan(body, (zeros, zeros), seq)[1]

        return jax.vmap(run)(x)

    return lambda p, x, y: mse(forward(p, x), y), params


def keras_case(weights, keras):
    """Keras 3 ``layers.LSTM`` through ``stateless_call`` (JAX backend): ``(loss, params)``."""
    n_in, hidden = weights["wi"].shape[0], weights["wh"].shape[0]
    layer = keras.layers.LSTM(hidden, return_sequences=True)
    layer.build((None, None, n_in))
    by_name = {"kernel": weights["wi"], "recurrent_kernel": weights["wh"], "bias": weights["b"]}
    trainable = [by_name[v.path.rsplit("/", 1)[-1]] for v in layer.trainable_variables]
    fixed = [v.value for v in layer.non_trainable_variables]  # e.g. the seed generator

    def loss_fn(trainable, x, y):
        ys, _ = layer.stateless_call(trainable, fixed, x)
        return mse(ys, y)

    return loss_fn, trainable


PEERS = {
    "flax linen nn.RNN(LSTMCell)": ("flax linen", flax_case),
    "flax linen nn.RNN(OptimizedLSTMCell)": (
        "flax linen", lambda w, nn: flax_case(w, nn, optimized=True)),
    "equinox LSTMCell + lax.scan": ("equinox", equinox_case),
    "keras 3 LSTM (jax backend)": ("keras 3", keras_case),
}  # fmt: skip
"""``{label: (peer, case(weights, module) -> (loss, params))}``."""


def implementations(weights, opt, unroll: int = 1, only: str | None = None, dtype=None):
    """``{name: (step, params)}`` for every implementation available, and skip notes.

    Args:
        weights: fundl's LSTM params ``{"wi": (in, 4H), "wh": (H, 4H), "b": (4H,)}``.
        opt: the optax optimizer.
        unroll: the scan's unroll of fundl and the hand-written references.
        only: run only the peers whose name contains this.
        dtype: the compute dtype (``None``: the input's); the peers of :data:`GPU_SKIPS`
            and Keras 3 are skipped with a note when it is set.
    """
    hidden = weights["wh"].shape[0]
    layer = fl.rnn(fl.lstm_cell(hidden, dtype=dtype), unroll=unroll)
    unfused = fl.rnn(fl.lstm_cell(hidden, dtype=dtype), unroll=unroll, fused_backward=False)
    hoisted = in_dtype(_plain_loss(True, unroll), dtype)
    impls = {
        "plain JAX lax.scan": (in_dtype(_plain_loss(False, unroll), dtype), weights),
        "plain JAX lax.scan, hoisted projection": (hoisted, weights),
        "fundl rnn(lstm_cell)": (lambda p, x, y: mse(layer.apply(p, (), x)[0], y), weights),
        UNFUSED: (lambda p, x, y: mse(unfused.apply(p, (), x)[0], y), weights),
    }
    makers = {
        label: (peer, functools.partial(case, weights))
        for label, (peer, case) in PEERS.items()
        if not only or only in label
    }
    peer_impls, notes = peers.build(makers, dtype, GPU_SKIPS)
    impls |= {
        label: (in_dtype(loss, dtype), params) for label, (loss, params) in peer_impls.items()
    }
    return {name: (make_step(loss, opt), params) for name, (loss, params) in impls.items()}, notes


def compile_seconds(sizes: dict, time_steps: int, opt, unroll: int = 1) -> float:
    """CPU seconds to trace, lower and compile fundl's train step at ``time_steps``."""
    x = jax.ShapeDtypeStruct((sizes["batch"], time_steps, sizes["features"]), jnp.float32)
    y = jax.ShapeDtypeStruct((sizes["batch"], time_steps, sizes["hidden"]), jnp.float32)
    layer = fl.rnn(fl.lstm_cell(sizes["hidden"]), unroll=unroll)  # a fresh one: no cache hit
    params, state = layer.init(jax.random.key(0), x)
    step = make_step(lambda p, x, y: mse(layer.apply(p, state, x)[0], y), opt)
    opt_state = opt.init(params)
    # compiling is single-threaded: CPU time, less noisy
    return timed(lambda: step.lower(params, opt_state, jnp.zeros(()), x, y).compile())[2]


def run(
    quick: bool = False,
    rounds: int | None = None,
    steps: int | None = None,
    unroll: int = 1,
    only: str | None = None,
    gpu: GpuRun | None = None,
) -> list[CaseResult]:
    """The LSTM train-step case, then the sizes of :data:`SWEEP` (CPU runs, not ``quick``).

    ``quick`` uses tiny sizes and one short round. ``gpu``: :data:`GPU` sizes (unless
    ``quick``) in ``gpu.dtype``, with throughput and MFU, without the compile-time ratio.
    """
    sizes = QUICK if quick else GPU if gpu else SIZES
    rounds = rounds or (1 if quick else 5 if gpu else 7)
    steps = steps or (1 if quick else 2 if gpu else 5)
    res, notes = lstm_case(sizes, rounds, steps, unroll, only, gpu)
    fundl, unfused = res.timings[2:4]
    res.notes.append(f"with fused_backward=False: fundl / plain JAX lax.scan = "
                     f"{unfused.ratio:.3f}; "
                     f"{note_vs_fastest(res, unfused.name, exclude=[fundl.name])}")  # fmt: skip
    if gpu is not None:
        res.notes.append("compile(1024) / compile(16) not measured under --gpu (see the CPU run)")
        res.notes.extend(notes)
        return [res]
    res.notes.append(compile_note(sizes, quick, unroll))
    res.notes.extend(notes)
    sweep = [] if quick else SWEEP
    return [res] + [lstm_case(s, 5, 3, unroll, only, None, SWEEP_NAMES)[0] for s in sweep]


def lstm_case(sizes, rounds, steps, unroll, only, gpu, names=None):
    """One size's case, with the note of fundl against the fastest, and the skip notes."""
    dtype = gpu.dtype if gpu else None
    b, t, f, h = sizes["batch"], sizes["time"], sizes["features"], sizes["hidden"]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((b, t, f)), dtype or jnp.float32)
    y = jnp.asarray(rng.standard_normal((b, t, h)), jnp.float32)
    weights, _ = fl.rnn(fl.lstm_cell(h)).init(jax.random.key(0), x.astype(jnp.float32))
    opt = optax.adam(1e-3)
    impls, notes = implementations(weights, opt, unroll, only, dtype)
    impls = {n: impl for n, impl in impls.items() if names is None or n in names}
    case = f"lstm train step, batch {b}, {t} steps, {f} inputs, {h} hidden"
    # XLA's cost analysis counts a scan's body once: the matmuls' FLOPs by hand instead,
    # 2 per multiply-add of x W_i and h W_h over every step, forward and backward (3x)
    flops = 3 * 2 * b * t * (f + h) * 4 * h
    speed = Speed(b * t, "tokens", model_flops=flops,
                  flops_source="the matmuls, 6 B T (in + H) 4H")  # fmt: skip
    res = measure_run(gpu, case, impls, opt, x, y, steps, rounds, speed)
    fundl = next(r for r in res.timings if r.name == "fundl rnn(lstm_cell)")
    exclude = [UNFUSED] if names is None else []
    res.notes.append(f"fundl / plain JAX lax.scan = {fundl.ratio:.3f}; "
                     f"{note_vs_fastest(res, fundl.name, exclude=exclude)}")  # fmt: skip
    return res, notes


def compile_note(sizes: dict, quick: bool, unroll: int) -> str:
    """Compile time at 16 and 1,024 steps, interleaved, medians (one pair in a quick run)."""
    opt = optax.adam(1e-3)
    c16s, c1024s = [], []
    for _ in range(1 if quick else 5):
        c16s.append(compile_seconds(sizes, 16, opt, unroll))
        c1024s.append(compile_seconds(sizes, 1024, opt, unroll))
    c16, c1024 = statistics.median(c16s), statistics.median(c1024s)
    return (f"fundl compile (CPU time) {c16:.2f} s at 16 steps, {c1024:.2f} s at 1024: "
            f"compile(1024) / compile(16) = {c1024 / c16:.2f} (target <= 1.3)")  # fmt: skip


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 7)")
    parser.add_argument("--steps", type=int, help="train steps per timed run (default 5)")
    parser.add_argument("--unroll", type=int, default=1)
    parser.add_argument("--only", help="run only the peers whose name contains this")
    main(run, parser)
