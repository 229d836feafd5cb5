"""Activations, re-exported from ``jax.nn`` (fundl does not re-implement them).

Each is a plain ``array -> array`` function, so it is a layer wherever a layer is expected:
``fl.serial(fl.dense(64), fl.relu)``. For a parameterised one, use ``functools.partial``:
``partial(fl.leaky_relu, negative_slope=0.1)``.
"""

from jax.nn import elu, gelu, leaky_relu, log_softmax, relu, sigmoid, silu, softmax, swish, tanh

__all__ = [
    "relu",
    "leaky_relu",
    "elu",
    "gelu",
    "silu",
    "swish",
    "sigmoid",
    "tanh",
    "softmax",
    "log_softmax",
]
