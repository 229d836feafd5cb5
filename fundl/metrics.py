"""Metrics that optax does not ship: accuracy and a numerically safe masked mean.

For losses use ``optax.losses`` directly: ``softmax_cross_entropy_with_integer_labels``
(integer labels), ``softmax_cross_entropy`` (one-hot labels), ``sigmoid_binary_cross_entropy``
and ``squared_error`` (take ``.mean()`` of each).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["accuracy", "masked_mean"]


def masked_mean(
    x: jax.Array, mask: jax.Array | None = None, axis: int | tuple[int, ...] | None = None
) -> jax.Array:
    r"""The mean of ``x`` over the entries where ``mask`` is true.

    :math:`\sum_i m_i x_i / \max(1, \sum_i m_i)`. Masked-out entries are replaced by zero
    before the sum, so a NaN or inf there reaches neither the value nor its gradient, and an
    all-false mask gives 0 rather than NaN.

    Args:
        x: values, any shape.
        mask: booleans (or 0/1) broadcastable to ``x.shape``; ``None`` means all true.
        axis: the axes to average over (default: all).

    Returns:
        The masked mean, with ``axis`` reduced.
    """
    if mask is None:
        return jnp.mean(x, axis=axis)
    mask = jnp.broadcast_to(jnp.asarray(mask, dtype=bool), jnp.shape(x))
    total = jnp.sum(jnp.where(mask, x, jnp.zeros_like(x)), axis=axis)
    count = jnp.sum(mask, axis=axis).astype(total.dtype)
    return total / jnp.maximum(count, jnp.ones_like(count))


def accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """The fraction of examples whose highest-scoring class is the label.

    Args:
        logits: scores (or probabilities), shape ``(batch, ..., classes)``.
        labels: integer class ids of shape ``(batch, ...)``, or one-hot labels of the same
            shape as ``logits``.
        mask: optional booleans of shape ``(batch, ...)`` selecting the examples to count.

    Returns:
        A scalar in ``[0, 1]``.

    Raises:
        ValueError: if the shapes of ``logits`` and ``labels`` do not agree.
    """
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    if labels.shape == logits.shape:
        labels = jnp.argmax(labels, axis=-1)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"accuracy: labels of shape {labels.shape} do not match logits of shape "
            f"{logits.shape}; expected integer labels of shape {logits.shape[:-1]} or one-hot "
            f"labels of shape {logits.shape}."
        )
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return masked_mean(correct, mask)
