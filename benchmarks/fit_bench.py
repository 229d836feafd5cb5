"""Benchmark of the training loop: ``fl.fit`` against hand-written JAX loops (and Keras 3).

The seed MLP (flatten, dense 128, relu, dense 64, relu, dense 10; adam 1e-3) on the digits
training split (1,438 examples), batch 32, 20 epochs, shuffled each epoch: 45 steps per epoch
(44 full batches and one of 30). Implementations, all in this one process:

- ``plain JAX, step``: a jitted step per batch, batches gathered with NumPy (the last partial
  batch is a second shape, compiled once);
- ``plain JAX, scan``: one jitted ``lax.scan`` over the epoch's 44 full batches, then the
  partial batch as one step;
- ``fl.fit K=1`` and ``fl.fit K=9`` / ``K=45`` (``steps_per_call``);
- ``Keras 3 (jax)``: ``model.fit`` with the same model, data and batch size, when Keras is
  installed.

For each: total wall time of the 20 epochs including compilation (a fresh function each
repeat, so every repeat compiles), and the steady time per epoch (median over epochs 2-20).
Each implementation runs ``--repeats`` times, interleaved; the best of the repeats is
reported (other load on a shared machine only adds time), with the ratios the issue sets as
targets. Timings on a shared machine are noisy.

    PYTHONPATH=. python benchmarks/fit_bench.py [--repeats 5] [--verbose] [--epochs 20]

Keras is not a fundl dependency; to include it without touching the environment:
``python -m venv --system-site-packages /tmp/kvenv && /tmp/kvenv/bin/pip install keras``,
then run this script with ``KERAS_BACKEND=jax /tmp/kvenv/bin/python``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fundl as fl

BATCH = 32


def _model():
    return fl.serial(
        fl.flatten(),
        fl.dense(128), jax.nn.relu,
        fl.dense(64), jax.nn.relu,
        fl.dense(10),
    )  # fmt: skip


def _xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def run_fit(x, y, epochs, k):
    stamps = []
    t0 = time.perf_counter()
    fl.fit(_model(), _xent, optax.adam(1e-3), (x, y), epochs=epochs, batch_size=BATCH, seed=0,
           steps_per_call=k, progress=False,
           callbacks=[lambda e, logs, ts: stamps.append(time.perf_counter())])  # fmt: skip
    return time.perf_counter() - t0, np.diff(stamps)


def _plain_setup(x):
    model, opt = _model(), optax.adam(1e-3)
    params, state = model.init(jax.random.key(0), x[:1])
    opt_state = opt.init(params)

    def step(carry, batch):
        params, opt_state = carry
        bx, by = batch

        def loss_fn(p):
            return jnp.mean(_xent(model.apply(p, state, bx)[0], by))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return (params, opt_state), step


def run_plain_step(x, y, epochs):
    t0 = time.perf_counter()
    carry, step = _plain_setup(x)
    step = jax.jit(step, donate_argnums=0)
    rng = np.random.default_rng(0)
    stamps = []
    for _ in range(epochs):
        order = rng.permutation(len(x))
        losses = []
        for i in range(0, len(x), BATCH):
            idx = order[i : i + BATCH]
            carry, loss = step(carry, (x[idx], y[idx]))
            losses.append(loss)
        float(jnp.mean(jnp.stack(losses)))  # the epoch's mean loss, as fit reports it
        stamps.append(time.perf_counter())
    return time.perf_counter() - t0, np.diff(stamps)


def run_plain_scan(x, y, epochs):
    t0 = time.perf_counter()
    carry, step = _plain_setup(x)
    xd, yd = jnp.asarray(x), jnp.asarray(y)
    full = len(x) // BATCH

    @jax.jit
    def epoch_fn(carry, order):
        idx = order[: full * BATCH].reshape(full, BATCH)
        carry, losses = jax.lax.scan(lambda c, i: step(c, (xd[i], yd[i])), carry, idx)
        rest = order[full * BATCH :]
        carry, last = step(carry, (xd[rest], yd[rest]))
        return carry, jnp.concatenate([losses, last[None]])

    rng = np.random.default_rng(0)
    stamps = []
    for _ in range(epochs):
        carry, losses = epoch_fn(carry, jnp.asarray(rng.permutation(len(x))))
        float(jnp.mean(losses))
        stamps.append(time.perf_counter())
    return time.perf_counter() - t0, np.diff(stamps)


def run_keras(x, y, epochs):
    import keras

    if keras.backend.backend() != "jax":
        raise ImportError("set KERAS_BACKEND=jax")
    stamps = []

    class Stamp(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    model = keras.Sequential([
        keras.Input((8, 8)),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10),
    ])  # fmt: skip
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))  # fmt: skip
    model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0, callbacks=[Stamp()])
    return time.perf_counter() - t0, np.diff(stamps)


def main(
    repeats: int = 5, epochs: int = 20, verbose: bool = False
) -> dict[str, tuple[float, float]]:
    (x, y), _ = fl.datasets.digits_split()
    steps = -(-len(x) // BATCH)
    impls = {
        "plain JAX, step": lambda: run_plain_step(x, y, epochs),
        "plain JAX, scan": lambda: run_plain_scan(x, y, epochs),
        "fl.fit K=1": lambda: run_fit(x, y, epochs, 1),
        "fl.fit K=9": lambda: run_fit(x, y, epochs, 9),
        f"fl.fit K={steps}": lambda: run_fit(x, y, epochs, steps),
    }
    notes = []
    try:
        import os

        os.environ.setdefault("KERAS_BACKEND", "jax")
        import keras  # noqa: F401

        impls["Keras 3 (jax)"] = lambda: run_keras(x, y, epochs)
    except ImportError:
        notes.append("Keras 3 is not installed: its case is skipped (pip install keras).")
    totals: dict[str, list[float]] = {k: [] for k in impls}
    epoch_s: dict[str, list[float]] = {k: [] for k in impls}
    for r in range(repeats):
        names = list(impls)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            total, per_epoch = impls[name]()
            totals[name].append(total)
            epoch_s[name].append(float(np.median(per_epoch)))
    # The best (lowest) of the repeats: other processes on a shared machine only ever add time.
    result = {k: (min(totals[k]), min(epoch_s[k])) for k in impls}
    print(f"digits MLP, batch {BATCH}, {epochs} epochs ({steps} steps each), best of "
          f"{repeats}; {jax.devices()[0].platform}, jax {jax.__version__}")  # fmt: skip
    print(f"{'implementation':<20} {'ms/epoch (steady)':>18} {'total s (incl. compile)':>24}")
    for name, (total, per) in result.items():
        print(f"{name:<20} {per * 1e3:>18.2f} {total:>24.2f}")
        if verbose:
            print(f"{'':<20} median {statistics.median(epoch_s[name]) * 1e3:>11.2f} "
                  f"{statistics.median(totals[name]):>24.2f}")  # fmt: skip
    step_ms = result["plain JAX, step"][1]
    big = f"fl.fit K={steps}"
    print("\nratios (targets from issue 4):")
    print(f"  fit K=1 / plain step loop:      {result['fl.fit K=1'][1] / step_ms:.2f}  "
          f"(target <= 1.05)")  # fmt: skip
    print(f"  plain step loop / fit K={steps}:   {step_ms / result[big][1]:.2f}  "
          f"(target >= 3)")  # fmt: skip
    print(f"  plain step loop / fit K=9:      {step_ms / result['fl.fit K=9'][1]:.2f}")
    print(
        f"  fit K={steps} / plain scan loop:   {result[big][1] / result['plain JAX, scan'][1]:.2f}"
    )
    if "Keras 3 (jax)" in result:
        k_total, k_epoch = result["Keras 3 (jax)"]
        print(f"  Keras epoch / fit K={steps} epoch: {k_epoch / result[big][1]:.2f} (target >= 4)")
        print(
            f"  fit K={steps} total / Keras total: {result[big][0] / k_total:.2f} (target <= 0.33)"
        )
    else:
        # The orientation numbers for Keras 3 on this machine: 14 ms/epoch steady,
        # 1.65 s for the 20 epochs including compilation.
        print(f"  (Keras, from the issue) 14 ms / fit K={steps} epoch: "
              f"{14e-3 / result[big][1]:.2f} (target >= 4)")  # fmt: skip
        print(f"  fit K={steps} total / 1.65 s (Keras, from the issue): "
              f"{result[big][0] / 1.65:.2f} (target <= 0.33)")  # fmt: skip
    for note in notes:
        print("note:", note)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    main(args.repeats, args.epochs, args.verbose)
