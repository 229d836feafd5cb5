"""Dropout (Srivastava et al., 2014): zero random inputs while training."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fundl.core import Layer, check_floating, named

__all__ = ["dropout"]


def dropout(rate: float) -> Layer:
    r"""Inverted dropout: in training, zeroes each input with probability ``rate`` and scales
    the rest by :math:`1 / (1 - \text{rate})`, so the expected output equals the input.

    .. math::

        y = \frac{m \odot x}{1 - \text{rate}}, \qquad m_i \sim \text{Bernoulli}(1 -
        \text{rate})

    ``rate`` is the probability to *drop* (as Keras, PyTorch and Flax; stax's argument was
    the keep probability). In inference (``train=False``) the layer is the identity and
    needs no key. In training it needs ``key``; :func:`fundl.serial` and the other
    combinators give each layer its own key, so two dropout layers never share a mask.
    ``rate=0`` returns the input unchanged, ``rate=1`` returns zeros (both still ask for a
    key in training, so changing the rate never breaks the call).

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> drop = fl.dropout(0.5)
        >>> x = jnp.ones((2, 4))
        >>> y, _ = drop.apply((), (), x, key=jax.random.key(0), train=True)
        >>> sorted({float(v) for v in y.ravel()})  # dropped, or kept and scaled by 2
        [0.0, 2.0]
        >>> bool((drop.apply((), (), x)[0] == x).all())  # inference: the identity
        True

    Args:
        rate: the drop probability, in ``[0, 1]``.

    Returns:
        A :class:`~fundl.Layer` mapping any floating array to the same shape.
    """
    name = f"dropout({rate!r})"
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0:
        raise ValueError(
            f"{name}: rate is the probability to drop an input and must be a number in "
            f"[0, 1], got {rate!r}."
        )

    def init(key, x):
        del key
        check_floating(name, x)
        return (), ()

    def apply(params, state, x, key=None, train=False):
        del params
        check_floating(name, x)
        if not train:
            return x, state
        if key is None:
            raise ValueError(
                f"{name}: train=True needs a PRNG key to draw the dropout mask; pass "
                f"key=jax.random.key(seed) to apply (a fresh one each step, e.g. from "
                f"jax.random.split), or train=False for inference."
            )
        if rate == 0.0:
            return x, state
        if rate == 1.0:
            return jnp.zeros_like(x), state
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        return jnp.where(keep, x / jnp.array(1.0 - rate, x.dtype), jnp.zeros_like(x)), state

    return named(Layer(init, apply), name)
