"""The guide's hello-world, trained in one call: a Keras-style MLP on handwritten digits.

Flatten -> Dense 128 relu -> Dense 64 relu -> Dense 10 (softmax inside the loss), adam,
sparse categorical cross-entropy, accuracy, 20 epochs of batch 32: Keras's ``model.fit``,
here ``fl.fit`` over pure functions. Runs offline on the UCI digits that ship with fundl
(1,438 training and 359 held-out 8x8 images). ``examples/mnist_mlp_manual.py`` writes the
four training steps out by hand.

    python examples/mnist_mlp.py [--epochs 20] [--batch-size 32] [--steps-per-call 8]
"""

import argparse

import jax
import optax

import fundl as fl

model = fl.serial(
    fl.flatten(),
    fl.dense(128), jax.nn.relu,
    fl.dense(64), jax.nn.relu,
    fl.dense(10),
)  # fmt: skip


def main(epochs: int = 20, batch_size: int = 32, seed: int = 0, steps_per_call: int = 1) -> float:
    train, test = fl.datasets.digits_split()
    _, history = fl.fit(
        model,
        optax.softmax_cross_entropy_with_integer_labels,  # per-example losses, as optax gives
        optax.adam(1e-3),
        train,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        eval_data=test,
        metrics={"accuracy": fl.accuracy},
        steps_per_call=steps_per_call,
    )
    for h in history:
        print(
            f"epoch {h['epoch']:2d}  loss {h['loss']:.4f}  accuracy {h['accuracy']:.4f}  "
            f"held-out accuracy {h['val_accuracy']:.4f}"
        )
    acc = history[-1]["val_accuracy"]
    print(f"held-out accuracy: {acc:.4f}")
    return acc


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps-per-call", type=int, default=1)
    args = parser.parse_args()
    main(args.epochs, args.batch_size, args.seed, args.steps_per_call)
