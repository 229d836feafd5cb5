"""A small convolutional network that learns to see the handwritten digits.

conv 3x3 (32) -> batch_norm -> relu -> conv 3x3 (64) -> batch_norm -> relu -> max_pool 2x2
-> dropout 0.25 -> flatten -> dense 128 -> relu -> dropout 0.5 -> dense 10, trained with
adam on the UCI digits that ship with fundl (1,438 training and 359 held-out 8x8 images,
given a channel axis: (batch, 8, 8, 1)). The train step carries the batch_norm state and a
fresh dropout key; evaluation runs in inference mode (running statistics, no dropout).
Saves the loss and held-out accuracy curves (``fl.plot_history``) as a PNG when matplotlib
is installed (``pip install fundl[plot]``).

    python examples/cnn_digits.py [--epochs 15] [--batch-size 32] [--plot cnn_digits_loss.png]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fundl as fl

model = fl.serial(
    fl.conv(32, (3, 3)), fl.batch_norm(), jax.nn.relu,
    fl.conv(64, (3, 3)), fl.batch_norm(), jax.nn.relu,
    fl.max_pool((2, 2)),
    fl.dropout(0.25),
    fl.flatten(),
    fl.dense(128), jax.nn.relu,
    fl.dropout(0.5),
    fl.dense(10),
)  # fmt: skip
optimizer = optax.adam(1e-3)


def loss_fn(params, state, x, y, key):
    logits, state = model.apply(params, state, x, key=key, train=True)  # 1. forward pass
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()  # 2. loss
    return loss, state


@jax.jit
def train_step(params, state, opt_state, x, y, key):
    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)  # 3. backward, 4. update
    return optax.apply_updates(params, updates), state, opt_state, loss


@jax.jit
def evaluate(params, state, x, y):
    logits, _ = model.apply(params, state, x)  # inference: running statistics, no dropout
    return fl.accuracy(logits, y)


def main(
    epochs: int = 15,
    batch_size: int = 32,
    seed: int = 0,
    plot: str | None = "cnn_digits_loss.png",
) -> float:
    (x_train, y_train), (x_test, y_test) = fl.datasets.digits_split()
    x_train, x_test = x_train[..., None], x_test[..., None]  # add the channel axis
    key, init_key = jax.random.split(jax.random.key(seed))
    params, state = model.init(init_key, x_train[:1])
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(seed)
    steps = len(x_train) // batch_size  # drop the last partial batch: one compiled shape
    history = []  # one dict per epoch, as fl.fit returns
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(x_train))
        losses = []
        for i in range(steps):
            idx = order[i * batch_size : (i + 1) * batch_size]
            key, step_key = jax.random.split(key)  # a fresh dropout mask every step
            params, state, opt_state, loss = train_step(
                params, state, opt_state, x_train[idx], y_train[idx], step_key
            )
            losses.append(loss)
        acc = float(evaluate(params, state, x_test, y_test))
        history.append({"epoch": epoch, "loss": float(jnp.mean(jnp.stack(losses))),
                        "val_accuracy": acc})  # fmt: skip
        print(f"epoch {epoch:2d}  loss {history[-1]['loss']:.4f}  held-out accuracy {acc:.4f}")
    print(f"held-out accuracy: {acc:.4f}")
    if plot:
        try:
            fl.plot_history(history).savefig(plot, dpi=120)  # loss and held-out accuracy
            print(f"loss curve saved to {plot}")
        except ImportError:
            print("matplotlib is not installed: no loss curve (pip install 'fundl[plot]')")
    return acc


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="cnn_digits_loss.png", help="PNG path ('' for none)")
    args = parser.parse_args()
    main(args.epochs, args.batch_size, args.seed, args.plot or None)
