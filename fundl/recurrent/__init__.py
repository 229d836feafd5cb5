r"""Recurrent layers: SimpleRNN, LSTM and GRU cells, scanned over time by :func:`rnn`.

A **cell** is a :class:`Cell` value, one time step and its zero memory::

    params, state = cell.init(key, carry, x_t)
    (new_carry, y_t), state = cell.apply(params, state, carry, x_t)

with ``x_t`` of shape ``(batch, in)`` and a ``carry`` (the memory: an array, or a pytree
such as the LSTM's ``(h, c)``) whose leaves are ``(batch, features)``.
:func:`initial_carry` builds the zero carry of any cell. :func:`rnn` turns a cell into a
layer over whole sequences ``(batch, time, in)``, with ``jax.lax.scan`` so that it compiles
once whatever the sequence length; it takes optional ``lengths`` (or a boolean mask) for
padded batches and an optional initial carry, and outputs ``(batch, time, H)`` or
``(batch, H)`` (plus the final carry with ``return_carry=True``), so that it stacks in
:func:`fundl.serial`. :func:`bidirectional` runs two of them in opposite directions.

Modules: ``cells`` (the :class:`Cell` value, the built-in cells, :func:`make_cell`),
``scan`` (:func:`rnn` and its scan strategies), ``fused`` (the fused backward pass) and
``bidir`` (:func:`bidirectional`).

Example:
    >>> import jax, jax.numpy as jnp, fundl as fl
    >>> model = fl.serial(fl.rnn(fl.lstm_cell(16), return_sequences=False), fl.dense(10))
    >>> params, state = model.init(jax.random.key(0), jnp.zeros((1, 8, 8)))
    >>> logits, state = model.apply(params, state, jnp.ones((4, 8, 8)))
    >>> logits.shape
    (4, 10)
"""

from fundl.recurrent.bidir import bidirectional
from fundl.recurrent.cells import (
    Cell,
    gru_cell,
    initial_carry,
    lstm_cell,
    make_cell,
    simple_rnn_cell,
)
from fundl.recurrent.scan import rnn

__all__ = [
    "Cell",
    "simple_rnn_cell",
    "lstm_cell",
    "gru_cell",
    "make_cell",
    "initial_carry",
    "rnn",
    "bidirectional",
]
