"""Transfer learning: pretrain on digits 0-4, freeze the body, train a new head on 5-9.

1. Pretrain ``serial(body=..., head=...)`` on the digits 0-4 (body: flatten, dense 128,
   relu; head: dense 64, relu, dense 5).
2. Build a new model with the same body and a fresh head, load the pretrained body into it
   (``fl.graft``) and train only the head (``fl.freeze`` over the param tree, built on
   ``optax.multi_transform``) on the digits 5-9, relabelled 0-4.
3. Compare with the same head trained on a random, frozen body: the pretrained features
   transfer.

    python examples/transfer_learning.py [--epochs 10]
"""

import argparse

import jax
import numpy as np
import optax

import fundl as fl


def make_model():
    body = fl.serial(fl.flatten(), fl.dense(128), jax.nn.relu)  # general stroke features
    head = fl.serial(fl.dense(64), jax.nn.relu, fl.dense(5))  # digit-specific
    return fl.serial(body=body, head=head)


def subset(data, digits):
    x, y = data
    keep = np.isin(y, digits)
    return x[keep], (y[keep] - digits[0]).astype(np.int32)


def main(epochs: int = 10, seed: int = 0) -> dict[str, float]:
    train, test = fl.datasets.digits_split()
    loss = optax.softmax_cross_entropy_with_integer_labels
    common = {"batch_size": 32, "metrics": {"accuracy": fl.accuracy}, "progress": False}

    # 1. pretrain on 0-4
    low = [0, 1, 2, 3, 4]
    pretrained, history = fl.fit(
        make_model(), loss, optax.adam(1e-3), subset(train, low), epochs=epochs, seed=seed,
        eval_data=subset(test, low), **common,
    )  # fmt: skip
    print(f"pretrained on 0-4: held-out accuracy {history[-1]['val_accuracy']:.4f}")

    # 2. new head on 5-9, body loaded and frozen
    high = [5, 6, 7, 8, 9]
    x_high, _ = subset(train, high)
    only_head = fl.freeze(optax.adam(1e-3), {"body": True, "head": False})
    results = {}
    for name, body in [("pretrained body", pretrained.params["body"]), ("random body", None)]:
        model = make_model()
        key = jax.random.key(seed + 1)
        params, _ = model.init(key, x_high[:1])
        if body is not None:
            params = fl.graft(params, body, at=("body",))
        start = fl.init_train_state(model, only_head, key, x_high[:1], params=params)
        ts, history = fl.fit(
            model, loss, only_head, subset(train, high), epochs=epochs, seed=seed,
            train_state=start, eval_data=subset(test, high), **common,
        )  # fmt: skip
        frozen = jax.tree_util.tree_map(np.array_equal, ts.params["body"], start.params["body"])
        assert all(jax.tree_util.tree_leaves(frozen)), "the body must not change"
        results[name] = history[-1]["val_accuracy"]
        print(f"head on 5-9, {name} (frozen): held-out accuracy {results[name]:.4f}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.epochs, args.seed)
