"""Keras 3 (JAX backend) as a peer of the train-step cases, in its two idioms.

- ``keras 3 train_on_batch``: the step Keras teaches (``model.compile`` with its own Adam and
  loss, then ``model.train_on_batch``), timed as a :class:`~benchmarks.harness.StatefulStep`:
  Keras's per-call work (its data adapter, its variables' bookkeeping, the loss returned to
  the host each step) is what the small-batch cases show.
- ``keras 3 stateless_call``: the pure function Keras's JAX guide writes for a custom loop
  (``model.stateless_call`` inside ``jax.jit``), with the same optax optimizer as the others:
  Keras's graph without its loop.

Both start from the case's weights. Keras's Adam differs from optax's in where its epsilon
goes (``lr_t * m / (sqrt(v) + eps)`` with the bias correction folded into ``lr_t``), which
does not change the first loss the harness compares. Keras is imported on the JAX backend
(``KERAS_BACKEND=jax`` unless set); a missing Keras, or one on another backend, raises
:class:`ImportError`, which the cases turn into a skip note.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import optax

from benchmarks.harness import StatefulStep, make_step

SKIP_NOTE = "keras 3 not installed: keras skipped (pip install -e '.[bench]')"
GPU_NOTE = "keras 3 skipped in bfloat16: Keras sets precision by a global dtype policy"


def import_keras():
    """Keras 3 on the JAX backend (:class:`ImportError` if missing or on another backend)."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    if keras.backend.backend() != "jax":
        raise ImportError(f"Keras runs on {keras.backend.backend()}, not JAX")
    return keras


def keras_loss(model, loss_of_outputs: Callable) -> tuple[Callable, list]:
    """``(loss(trainable, x, y), trainable)`` of a built Keras model via ``stateless_call``."""
    trainable = [v.value for v in model.trainable_variables]
    fixed = [v.value for v in model.non_trainable_variables]

    def loss(params, x, y):
        outputs, _ = model.stateless_call(params, fixed, x)
        return loss_of_outputs(outputs, y)

    return loss, trainable


def keras_steps(
    build: Callable,
    weights: Sequence,
    loss_of_outputs: Callable,
    opt: optax.GradientTransformation,
    learning_rate: float,
) -> dict[str, tuple[Callable, object] | StatefulStep]:
    """Both Keras idioms of a classifier's train step, from ``weights``.

    Args:
        build: makes a fresh, built Keras model (called twice: one per idiom).
        weights: the initial weights, in ``model.get_weights()`` order.
        loss_of_outputs: ``loss(logits, labels)`` of the other implementations.
        opt: their optax optimizer (the ``stateless_call`` step uses it).
        learning_rate: the Adam learning rate (``train_on_batch`` uses Keras's Adam).
    """
    keras = import_keras()

    def fresh():
        model = build()
        model.set_weights([np.asarray(w) for w in weights])
        return model

    loss, trainable = keras_loss(fresh(), loss_of_outputs)
    model = fresh()
    model.compile(optimizer=keras.optimizers.Adam(learning_rate, epsilon=1e-8),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))  # fmt: skip

    def train_on_batch(model, loss, x, y):
        return model, model.train_on_batch(x, y)

    return {
        "keras 3 train_on_batch": StatefulStep(train_on_batch, (model, np.zeros(()))),
        "keras 3 stateless_call": (make_step(loss, opt), trainable),
    }


def add_keras_steps(
    impls: dict, notes: list, dtype, build: Callable, weights: Sequence, *args
) -> None:
    """Adds :func:`keras_steps` (``args``: the rest of its arguments) to ``impls``.

    A note instead where Keras is missing or ``dtype`` (the compute dtype of ``--gpu``) is
    set: Keras takes its precision from a global dtype policy, not from a cast in the loss.
    """
    if dtype is not None:
        notes.append(GPU_NOTE)
        return
    try:
        impls.update(keras_steps(build, weights, *args))
    except ImportError:
        notes.append(SKIP_NOTE)
