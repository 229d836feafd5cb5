"""Overfitting: training against held-out curves, with and without regularization.

A wide MLP trained on only 150 digits memorizes them: the training loss falls towards zero
while the held-out loss reaches its best early and then creeps back up. The same model with
weight decay (``optax.adamw``) and, when fundl has it, dropout shows how much each changes
the gap (on these small, clean images, little: the numbers are printed, not promised).
Prints the final numbers and saves the curves to ``overfitting.png`` when matplotlib is
installed.

    python examples/overfitting.py [--epochs 150] [--out overfitting.png]
"""

import argparse

import jax
import optax

import fundl as fl


def make_model(dropout_rate: float = 0.0):
    layers = [fl.flatten(), fl.dense(256), jax.nn.relu]
    if dropout_rate and hasattr(fl, "dropout"):
        layers.append(fl.dropout(dropout_rate))
    layers += [fl.dense(256), jax.nn.relu]
    if dropout_rate and hasattr(fl, "dropout"):
        layers.append(fl.dropout(dropout_rate))
    return fl.serial(*layers, fl.dense(10))


def main(epochs: int = 150, out: str = "overfitting.png", seed: int = 0) -> dict[str, dict]:
    (x, y), test = fl.datasets.digits_split()
    small = (x[:150], y[:150])
    runs = {
        "no regularization": (make_model(), optax.adam(1e-3)),
        "weight decay 0.5": (make_model(), optax.adamw(1e-3, weight_decay=0.5)),
    }
    if hasattr(fl, "dropout"):
        runs["dropout 0.5"] = (make_model(0.5), optax.adam(1e-3))
        runs["dropout + weight decay"] = (make_model(0.5), optax.adamw(1e-3, weight_decay=0.5))
    else:
        print("(fl.dropout not available in this fundl: dropout runs skipped)")
    histories = {}
    for name, (model, optimizer) in runs.items():
        _, history = fl.fit(
            model, optax.softmax_cross_entropy_with_integer_labels, optimizer, small,
            epochs=epochs, batch_size=30, seed=seed, eval_data=test,
            metrics={"accuracy": fl.accuracy}, steps_per_call=5, progress=False,
        )  # fmt: skip
        histories[name] = history
        last, best = history[-1], min(h["val_loss"] for h in history)
        print(
            f"{name:<24} train loss {last['loss']:.4f}  held-out loss {last['val_loss']:.4f} "
            f"(best {best:.4f})  held-out accuracy {last['val_accuracy']:.4f}"
        )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return histories
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, history) in enumerate(histories.items()):
        epochs_ = [h["epoch"] for h in history]
        ax.plot(epochs_, [h["loss"] for h in history], f"C{i}--", label=f"{name} (train)")
        ax.plot(epochs_, [h["val_loss"] for h in history], f"C{i}-", label=f"{name} (held-out)")
    ax.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="150 training digits")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"saved {out}")
    return histories


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--out", default="overfitting.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.epochs, args.out, args.seed)
