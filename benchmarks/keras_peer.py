"""Keras 3 (JAX backend) as a peer of the train-step cases, in its two idioms.

- ``keras 3 train_on_batch``: the step Keras teaches (``model.compile`` with its own Adam and
  loss, then ``model.train_on_batch``), timed as a :class:`~benchmarks.steps.StatefulStep`:
  Keras's per-call work (its data adapter, its variables' bookkeeping, the loss returned to
  the host each step) is what the small-batch cases show.
- ``keras 3 stateless_call``: the pure function Keras's JAX guide writes for a custom loop
  (``model.stateless_call`` inside ``jax.jit``), with the same optax optimizer as the others:
  Keras's graph without its loop.

Both start from the case's weights. Keras's Adam differs from optax's in where its epsilon
goes (``lr_t * m / (sqrt(v) + eps)`` with the bias correction folded into ``lr_t``), which
does not change the first loss the cases compare. Keras is imported by the peer registry
(:mod:`benchmarks.peers`), which notes it where it is missing or on another backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import optax

from benchmarks.steps import StatefulStep, make_step


def keras_loss(model, loss_of_outputs: Callable) -> tuple[Callable, list]:
    """``(loss(trainable, x, y), trainable)`` of a built Keras model via ``stateless_call``."""
    trainable = [v.value for v in model.trainable_variables]
    fixed = [v.value for v in model.non_trainable_variables]

    def loss(params, x, y):
        outputs, _ = model.stateless_call(params, fixed, x)
        return loss_of_outputs(outputs, y)

    return loss, trainable


def _fresh(keras, build: Callable, weights: Sequence):
    model = build(keras)
    model.set_weights([np.asarray(w) for w in weights])
    return model


def train_on_batch_step(keras, build: Callable, weights: Sequence, learning_rate: float):
    """Keras's own loop: ``compile`` (its Adam) and ``train_on_batch``, a :class:`StatefulStep`."""
    model = _fresh(keras, build, weights)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate, epsilon=1e-8),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))  # fmt: skip

    def train_on_batch(model, loss, x, y):
        return model, model.train_on_batch(x, y)

    return StatefulStep(train_on_batch, (model, np.zeros(())))


def makers(
    build: Callable,
    weights: Sequence,
    loss_of_outputs: Callable,
    opt: optax.GradientTransformation,
    learning_rate: float,
) -> dict[str, tuple[str, Callable]]:
    """Both Keras idioms of a classifier's train step, for :func:`benchmarks.peers.build`.

    Args:
        build: ``build(keras)`` makes a fresh, built Keras model (called once per idiom).
        weights: the initial weights, in ``model.get_weights()`` order.
        loss_of_outputs: ``loss(logits, labels)`` of the other implementations.
        opt: their optax optimizer (the ``stateless_call`` step uses it).
        learning_rate: the Adam learning rate (``train_on_batch`` uses Keras's Adam).
    """

    def stateless_call(keras):
        loss, trainable = keras_loss(_fresh(keras, build, weights), loss_of_outputs)
        return make_step(loss, opt), trainable

    return {
        "keras 3 train_on_batch": (
            "keras 3", lambda keras: train_on_batch_step(keras, build, weights, learning_rate)),
        "keras 3 stateless_call": ("keras 3", stateless_call),
    }  # fmt: skip
