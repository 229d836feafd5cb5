"""``bidirectional``: two :func:`fundl.rnn` layers over the same sequences, merged."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fundl.core import Layer, call_at, layer_info, layer_name, named

__all__ = ["bidirectional"]

_MERGES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "concat": lambda a, b: jnp.concatenate([a, b], axis=-1),
    "sum": lambda a, b: a + b,
    "mean": lambda a, b: (a + b) / 2,
}


def _rnn_meta(layer: Layer) -> dict:
    """What :func:`fundl.rnn` recorded about ``layer`` (``{}`` for any other layer)."""
    return layer_info(layer).meta.get("rnn", {})


def _check_directions(name: str, forward: Layer, backward: Layer) -> None:
    if _rnn_meta(forward).get("reverse", False):
        raise ValueError(f"{name}: the forward layer runs in reverse; build it with reverse=False.")
    if not _rnn_meta(backward).get("reverse", True):
        raise ValueError(
            f"{name}: the backward layer runs forward; build it with fl.rnn(cell, reverse=True)."
        )


def _merge_function(name: str, merge: str | Callable) -> Callable:
    """``merge`` itself, or the function a merge's name stands for."""
    if not isinstance(merge, str):
        return merge
    if merge not in _MERGES:
        raise ValueError(f"{name}: merge must be one of {sorted(_MERGES)} or a function.")
    return _MERGES[merge]


def _split_carry(name: str, carry: Any) -> tuple[Any, Any]:
    """``(forward_carry, backward_carry)`` from the optional pair ``carry``."""
    if carry is None:
        return None, None
    if not isinstance(carry, tuple | list) or len(carry) != 2:
        raise ValueError(
            f"{name}: carry must be a pair (forward_carry, backward_carry), got "
            f"{type(carry).__name__}."
        )
    return carry


def bidirectional(
    forward: Layer,
    backward: Layer,
    merge: str | Callable[[jax.Array, jax.Array], jax.Array] = "concat",
) -> Layer:
    """Runs ``forward`` and ``backward`` over the same sequences and merges their outputs.

    ``forward`` is an :func:`rnn` layer, ``backward`` one built with ``reverse=True`` (its
    outputs are in input order, so step ``t`` of both directions line up); their directions
    are read from :func:`fundl.core.layer_info`. ``apply(params, state, x, lengths=None,
    carry=None)`` passes ``lengths`` to both, so the backward direction starts at each
    sequence's own last real step (``lengths`` is a side input: combinators pass
    ``lengths=`` on to it); ``carry`` is an optional pair ``(forward_carry,
    backward_carry)``. Params and state are ``{"forward": ..., "backward": ...}``. When both
    layers return their carry, the output is ``(merged, (forward_carry, backward_carry))``.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> layer = fl.bidirectional(
        ...     fl.rnn(fl.lstm_cell(8)), fl.rnn(fl.lstm_cell(8), reverse=True)
        ... )
        >>> x = jnp.ones((2, 5, 3))
        >>> params, state = layer.init(jax.random.key(0), x)
        >>> layer.apply(params, state, x)[0].shape
        (2, 5, 16)

    Args:
        forward: the forward layer, ``(batch, time, in) -> (batch, time, H1)`` (or
            ``(batch, H1)``).
        backward: the backward layer, built with ``reverse=True``.
        merge: ``"concat"`` (on the feature axis, default), ``"sum"``, ``"mean"``, or a
            function ``(forward_out, backward_out) -> out``.

    Returns:
        A :class:`~fundl.Layer`; with ``"concat"`` it maps ``(batch, time, in)`` to
        ``(batch, time, H1 + H2)``.
    """
    if not isinstance(forward, Layer) or not isinstance(backward, Layer):
        raise TypeError(
            "bidirectional(forward, backward): expected two layers, e.g. "
            "fl.rnn(fl.lstm_cell(H)) and fl.rnn(fl.lstm_cell(H), reverse=True); got "
            f"{type(forward).__name__} and {type(backward).__name__}."
        )
    merge_name = merge if isinstance(merge, str) else getattr(merge, "__name__", "merge")
    name = f"bidirectional({layer_name(forward)}, {layer_name(backward)}, {merge_name})"
    merge_fn = _merge_function(name, merge)
    _check_directions(name, forward, backward)
    with_carry = all(_rnn_meta(d).get("return_carry", False) for d in (forward, backward))
    layers = {"forward": forward, "backward": backward}

    def init(key, x, lengths=None, carry=None):
        params, state = {}, {}
        carries = _split_carry(name, carry)
        for (d, layer), k, c in zip(layers.items(), jax.random.split(key), carries, strict=True):
            params[d], state[d] = call_at(f"bidirectional.{d}", layer.init, k, x, lengths, c)
        return params, state

    def apply(params, state, x, lengths=None, carry=None, *, key=None, train=False):
        keys = (None, None) if key is None else jax.random.split(key)
        outs, new_state = {}, {}
        for (d, layer), k, c in zip(layers.items(), keys, _split_carry(name, carry), strict=True):
            outs[d], new_state[d] = call_at(f"bidirectional.{d}", layer.apply, params[d],
                                         state[d], x, lengths, c, key=k, train=train)  # fmt: skip
        of, ob = outs["forward"], outs["backward"]
        if with_carry:
            return (merge_fn(of[0], ob[0]), (of[1], ob[1])), new_state
        return merge_fn(of, ob), new_state

    children = tuple((f"bidirectional.{d}", layer) for d, layer in layers.items())
    return named(Layer(init, apply), name, children, side_inputs=("lengths",),
                 rebuild=lambda c: bidirectional(*c, merge))  # fmt: skip
