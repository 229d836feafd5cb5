"""bfloat16 training against float32: the digits CNN's accuracy and the char transformer's bpc.

    python -m benchmarks.precision_accuracy [--quick] [--epochs 15] [--steps 600]

Trains each model twice from the same seed, on the same batches: once in float32, once under
the mixed-precision policy ``fl.Policy(float32, bfloat16, float32, keep=("*norm*",))``
(float32 master weights, bfloat16 compute, float32 outputs and norm params). The models come
from the examples: ``examples/cnn_digits.py``'s CNN (trained with ``fl.fit``, adam 1e-3, batch
32, held-out accuracy on 359 digits) and ``examples/char_transformer.py``'s ``make_model``
(a plain jitted adamw step as in the example, held-out bits per character; the tied output
projection ``fl.attend`` runs in the compute dtype too). Target (issue 16): bfloat16 within
1% accuracy and 0.05 bpc of float32. ``--quick`` is a smoke run on tiny budgets, not a
measurement.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fundl as fl

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    """The module ``examples/<name>.py`` (its ``main`` does not run)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FLOAT32 = fl.Policy(jnp.float32, jnp.float32, jnp.float32)
BFLOAT16 = fl.Policy(jnp.float32, jnp.bfloat16, jnp.float32, keep=("*norm*",))


def digits_accuracy(policy: fl.Policy, epochs: int, seed: int = 0) -> float:
    """Held-out accuracy of the digits CNN after ``epochs`` of ``fl.fit`` under ``policy``."""
    (x_train, y_train), (x_test, y_test) = fl.datasets.digits_split()
    x_train, x_test = x_train[..., None], x_test[..., None]  # add the channel axis
    model = fl.with_policy(load_example("cnn_digits").model, policy)
    loss = optax.softmax_cross_entropy_with_integer_labels
    _, history = fl.fit(model, loss, optax.adam(1e-3), (x_train, y_train), epochs=epochs,
                        batch_size=32, seed=seed, eval_data=(x_test, y_test),
                        metrics={"accuracy": fl.accuracy}, progress=False)  # fmt: skip
    return history[-1]["val_accuracy"]


def char_bits(policy: fl.Policy, steps: int, width: int, layers: int, seed: int = 0) -> float:
    """Held-out bits per character of the char transformer after ``steps`` under ``policy``."""
    context, batch_size, lr = 64, 32, 3e-3
    example = load_example("char_transformer")
    text = example.load_text()
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    data = np.array([lookup[c] for c in text], np.int32)
    split = int(0.9 * len(data))
    train, held_out = data[:split], data[split:]
    model = fl.with_policy(example.make_model(len(chars), width, 4, layers), policy)
    params, state = model.init(jax.random.key(seed), jnp.zeros((1, context), jnp.int32))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10 + 1), steps,
                                                  lr / 10)  # fmt: skip
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, 0.1))
    opt_state = optimizer.init(params)

    def loss_fn(params, x, y):
        h, _ = model.apply(params, state, x)  # output_dtype: float32
        logits = fl.attend(params["embed"], policy.cast_to_compute(h))  # tied head, compute
        logits = policy.cast_to_output(logits)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def batch(source, starts):
        seqs = source[starts[:, None] + np.arange(context + 1)[None, :]]
        return seqs[:, :-1], seqs[:, 1:]

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x, y = batch(train, rng.integers(0, len(train) - context - 1, batch_size))
        params, opt_state, _ = train_step(params, opt_state, x, y)
    starts = np.linspace(0, len(held_out) - context - 2, 20 * batch_size).astype(np.int64)
    eval_loss = jax.jit(loss_fn)
    losses = [float(eval_loss(params, *batch(held_out, s))) for s in starts.reshape(20, -1)]
    return float(np.mean(losses)) / math.log(2)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny budgets")
    parser.add_argument("--epochs", type=int, default=15, help="digits CNN epochs")
    parser.add_argument("--steps", type=int, default=600, help="char transformer steps")
    parser.add_argument("--width", type=int, default=64, help="char transformer width")
    parser.add_argument("--layers", type=int, default=2, help="char transformer blocks")
    args = parser.parse_args(argv)
    epochs, steps = (1, 20) if args.quick else (args.epochs, args.steps)
    figures = {}
    for label, policy in (("float32", FLOAT32), ("bfloat16", BFLOAT16)):
        t0 = time.perf_counter()
        figures[f"digits_accuracy_{label}"] = digits_accuracy(policy, epochs)
        t1 = time.perf_counter()
        figures[f"char_bpc_{label}"] = char_bits(policy, steps, args.width, args.layers)
        t2 = time.perf_counter()
        print(f"{label:>9}: digits CNN accuracy {figures[f'digits_accuracy_{label}']:.4f} "
              f"({epochs} epochs, {t1 - t0:.0f}s); char transformer "
              f"{figures[f'char_bpc_{label}']:.4f} bits/char ({steps} steps, width "
              f"{args.width}, {args.layers} blocks, {t2 - t1:.0f}s)")  # fmt: skip
    acc = figures["digits_accuracy_bfloat16"] - figures["digits_accuracy_float32"]
    bpc = figures["char_bpc_bfloat16"] - figures["char_bpc_float32"]
    print(f"bfloat16 - float32: accuracy {acc:+.4f} (target |d| <= 0.01), "
          f"bits/char {bpc:+.4f} (target <= 0.05)")  # fmt: skip
    return figures


if __name__ == "__main__":
    main()
