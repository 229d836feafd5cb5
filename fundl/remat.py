"""Activation checkpointing: less memory for the gradient by recomputing a layer's activations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from fundl.combinators import as_layer
from fundl.core import Layer, call_at, layer_name, named, side_inputs

__all__ = ["remat"]


def remat(
    layer: Layer | Callable[..., Any],
    policy: Callable[..., bool] | None = None,
    prevent_cse: bool = True,
) -> Layer:
    """``layer`` under ``jax.checkpoint``: its activations are recomputed for the gradient.

    Without it, reverse-mode differentiation keeps every intermediate of the forward pass
    until the backward pass reads it, so memory grows with depth times batch. Under
    ``remat``, the backward pass reruns the layer's forward pass from its inputs and keeps
    only what ``policy`` says to save: more compute (up to one more forward pass), less
    memory. The params, state, keys and ``train`` flow as they do for ``layer``, and the
    outputs and gradients are the same numbers. In a deep stack, remat each block, e.g.
    ``fl.repeat(block, 12, remat=True)``, so the scan saves only each block's input.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> block = fl.remat(fl.serial(fl.dense(8), jnp.tanh),
        ...                  policy=jax.checkpoint_policies.dots_saveable)
        >>> block
        Layer(remat(serial))
        >>> params, state = block.init(jax.random.key(0), jnp.zeros((2, 8)))
        >>> y, state = block.apply(params, state, jnp.ones((2, 8)))
        >>> y.shape
        (2, 8)

    Args:
        layer: the layer (or function of arrays) to checkpoint.
        policy: which intermediates to save rather than recompute, a policy from
            ``jax.checkpoint_policies`` (e.g. ``dots_saveable``: keep matmul outputs,
            recompute the elementwise ops); ``None`` saves none, only the layer's inputs.
        prevent_cse: passed to ``jax.checkpoint``: stops XLA from merging the recomputation
            with the forward pass (which would undo the saving). ``False`` is safe, and can
            be faster, inside ``jax.lax.scan`` (as in :func:`fundl.repeat`), where the loop
            already keeps them apart.

    Returns:
        A :class:`~fundl.Layer` with ``layer``'s params and state, named
        ``remat(<layer's name>)``, with ``layer`` as its child ``"remat"``.

    Raises:
        TypeError: ``policy`` is not callable.
    """
    child = as_layer(layer)
    if policy is not None and not callable(policy):
        raise TypeError(
            f"remat({layer_name(child)}): policy must be a function from "
            f"jax.checkpoint_policies (e.g. jax.checkpoint_policies.dots_saveable) or None, "
            f"got {type(policy).__name__}."
        )

    def init(key, *inputs):
        return call_at("remat", child.init, key, *inputs)

    def apply(params, state, *inputs, key=None, train=False, **side):
        def run(params, state, inputs, key, side):
            return child.apply(params, state, *inputs, key=key, train=train, **side)

        checkpointed = jax.checkpoint(run, prevent_cse=prevent_cse, policy=policy)
        return call_at("remat", checkpointed, params, state, inputs, key, side)

    return named(Layer(init, apply), f"remat({layer_name(child)})", (("remat", child),),
                 side_inputs=side_inputs(child),
                 rebuild=lambda c: remat(c[0], policy, prevent_cse))  # fmt: skip
