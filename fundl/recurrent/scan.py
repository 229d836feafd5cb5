r"""``rnn``: a cell scanned over the time axis with ``jax.lax.scan``, in one of four ways.

:func:`rnn` picks one scan strategy up front (:func:`_choose_scan`) and runs it:

- ``_generic_scan``: any cell, through its ``apply``; state threaded, key folded per step.
- ``_in_step_scan``: a built-in cell, each step projecting its own input.
- ``_hoisted_scan``: a built-in cell, every step's input projected in one matmul first.
- ``_fused_scan``: a built-in cell with the params' gradients fused after the backward loop
  (:mod:`fundl.recurrent.fused`), hoisted or not.

Each strategy maps the batch-major input to ``(carry, ys, state)`` with ``ys`` time-major.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fundl.core import Layer, call_at, check_floating, named
from fundl.recurrent.cells import Carry, Cell, as_cell
from fundl.recurrent.fused import fused_scan, under_forward_mode

__all__ = ["rnn"]


class _Options(NamedTuple):
    """What every scan strategy reads of ``rnn``'s options."""

    name: str
    reverse: bool
    unroll: int | bool


def _spec(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: (tuple(jnp.shape(x)), str(jnp.dtype(x.dtype))), tree)


def _shapes(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: tuple(jnp.shape(x)), tree)


def _concrete(x: Any) -> np.ndarray | None:
    """``x`` as a NumPy array, or ``None`` when it is traced (under ``jit`` or ``vmap``)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _time_mask(name: str, x: jax.Array, lengths: Any) -> jax.Array | None:
    """``(batch, time)`` bool mask from ``lengths`` ``(batch,)`` or a bool mask, or None."""
    if lengths is None:
        return None
    batch, time = x.shape[0], x.shape[1]
    lengths = jnp.asarray(lengths)  # NumPy int64 lengths become int32 (JAX's default int)
    dtype = jnp.dtype(lengths.dtype)
    if dtype == jnp.bool_:
        if tuple(lengths.shape) != (batch, time):
            raise ValueError(
                f"{name}: mask has shape {tuple(lengths.shape)}, expected (batch, time) = "
                f"{(batch, time)} (True at real steps)."
            )
        return jnp.asarray(lengths)
    if not jnp.issubdtype(dtype, jnp.integer) or tuple(lengths.shape) != (batch,):
        raise ValueError(
            f"{name}: lengths must be integers of shape (batch,) = ({batch},) or a boolean "
            f"mask of shape (batch, time) = {(batch, time)}; got {dtype} of shape "
            f"{tuple(lengths.shape)}."
        )
    concrete = _concrete(lengths)  # None under jit: then out-of-range lengths act clipped
    bad = concrete is not None and concrete.size and (concrete.max() > time or concrete.min() < 0)
    if bad:
        raise ValueError(
            f"{name}: lengths must lie in [0, {time}] (the time axis of the input), got "
            f"values from {concrete.min()} to {concrete.max()}. Pad the inputs to the "
            f"longest sequence or fix the lengths."
        )
    steps = jnp.arange(time, dtype=dtype).reshape(1, time)
    return steps < lengths.reshape(batch, 1)


def _where(m: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``m`` (shape ``(batch,)``) is True, else ``old``, leaf by leaf."""

    def pick(n, o):
        return jnp.where(m.reshape(m.shape + (1,) * (n.ndim - 1)), n, o)

    return jax.tree_util.tree_map(pick, new, old)


def _check_new_carry(name: str, new: Carry, old: Carry) -> Carry:
    """``new``, if it matches ``old`` in structure, shapes and dtypes (as ``lax.scan`` needs)."""
    same_tree = jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(old)
    if not same_tree or _spec(new) != _spec(old):
        raise ValueError(
            f"{name}: the cell returned a carry {_spec(new)} that does not match the carry "
            f"it was given {_spec(old)} (structure, shapes and dtypes must agree, as "
            f"lax.scan needs). Make the cell return its new carry like the old one, "
            f"e.g. cast it with .astype(carry.dtype)."
        )
    return new


def _masked(name: str, c: Carry, new_c: Carry, y: Any, m: Any) -> tuple[Carry, Any]:
    """A step's ``(new_c, y)``, checked; where ``m`` (``(batch,)``) is False, ``c`` and 0."""
    new_c = _check_new_carry(name, new_c, c)
    if m is not None:
        new_c = _where(m, new_c, c)
        y = jax.tree_util.tree_map(lambda v: _where(m, v, jnp.zeros_like(v)), y)
    return new_c, y


def _masked_scan(opts: _Options, step: Callable, carry, state, xs, masks, steps):
    """``lax.scan`` of ``step(c, s, x_t, t) -> ((new_c, y), s)``, masked steps left out.

    ``xs`` ``(T, B, ...)``, ``masks`` ``(T, B)`` or ``None``, ``steps`` ``(T,)`` or
    ``None``. Returns ``(carry, ys, state)``, ``ys`` ``(T, B, ...)``.
    """

    def body(cs, inputs):
        c, s = cs
        x_t, m, t = inputs
        (new_c, y), s = step(c, s, x_t, t)
        new_c, y = _masked(opts.name, c, new_c, y, m)
        return (new_c, s), y

    (carry, state), ys = jax.lax.scan(
        body, (carry, state), (xs, masks, steps), reverse=opts.reverse, unroll=opts.unroll
    )
    return carry, ys, state


Scan = Callable[..., tuple[Carry, Any, Any]]
"""A scan strategy: ``scan(cell, opts, params, state, carry, x, masks, key, train) ->
(carry, ys, state)``, ``x`` ``(B, T, in)``, ``masks`` ``(T, B)`` or ``None``, ``ys``
``(T, B, ...)``."""


def _generic_scan(cell: Cell, opts: _Options, params, state, carry, x, masks, key, train):
    """Any cell, through its ``apply``: state threaded, the key folded with the step index."""

    def step(c, s, x_t, t):
        k = None if key is None else jax.random.fold_in(key, t)
        return call_at("rnn", cell.apply, params, s, c, x_t, key=k, train=train)

    xs = jnp.swapaxes(x, 0, 1)  # [T, B, in]
    steps = jnp.arange(x.shape[1], dtype=jnp.int32)  # for dropout keys
    return _masked_scan(opts, step, carry, state, xs, masks, steps)


def _in_step_scan(cell: Cell, opts: _Options, params, state, carry, x, masks, key, train):
    """A built-in cell, each step projecting its own input inside the loop."""
    del key, train
    parts = cell.parts
    xs = jnp.swapaxes(x, 0, 1)  # [T, B, in]
    call_at("rnn", jax.eval_shape, parts.project, params, x[:, :1])  # shape checks

    def step(c, s, x_t, t):
        del t
        return parts.step(params, c, parts.project(params, x_t)), s

    return _masked_scan(opts, step, carry, state, xs, masks, None)


def _hoisted_scan(cell: Cell, opts: _Options, params, state, carry, x, masks, key, train):
    """A built-in cell, every step's input projected before the loop in one matmul."""
    del key, train
    parts = cell.parts
    xs = jnp.swapaxes(call_at("rnn", parts.project, params, x), 0, 1)  # [T, B, G]

    def step(c, s, xp_t, t):
        del t
        return parts.step(params, c, xp_t), s

    return _masked_scan(opts, step, carry, state, xs, masks, None)


def _fused_scan(
    cell: Cell, opts: _Options, params, state, carry, x, masks, key, train, *, hoisted: bool
):
    """A built-in cell with the params' gradients fused after the backward loop."""
    del key, train
    parts = cell.parts
    call_at("rnn", jax.eval_shape, parts.project, params, x[:, :1])  # shape checks
    xs = jnp.swapaxes(x, 0, 1)  # [T, B, in]
    if hoisted:
        xs = call_at("rnn", parts.project, params, xs)  # [T, B, G]
    masked = functools.partial(_masked, opts.name)
    scan = fused_scan(parts, masked, hoisted, opts.reverse, opts.unroll)
    carry, ys = scan(params, carry, xs, masks)
    return carry, ys, state


def _choose_scan(
    cell: Cell, state: Any, hoist: bool | None, fused_backward: bool | None, traced: Any
) -> Scan:
    """The one scan strategy for ``cell`` and ``rnn``'s options.

    Built-in cells (with ``parts``, and no state) get the fast strategies; ``hoist=None``
    hoists on GPU and TPU, not on CPU; ``fused_backward=None`` fuses unless forward-mode
    autodiff traces ``traced`` (the params, carry and input).
    """
    if cell.parts is None or not (isinstance(state, tuple) and not state):
        return _generic_scan
    hoisted = jax.default_backend() != "cpu" if hoist is None else hoist
    fused = not under_forward_mode(traced) if fused_backward is None else fused_backward
    if fused:
        return functools.partial(_fused_scan, hoisted=hoisted)
    return _hoisted_scan if hoisted else _in_step_scan


def _last(ys: jax.Array, mask: jax.Array | None, reverse: bool) -> jax.Array:
    """The output of the last processed step of each sequence: ``(B, T, ...) -> (B, ...)``."""
    time = ys.shape[1]
    if mask is None:
        return ys[:, 0] if reverse else ys[:, time - 1]
    # The last real step going forward, the first going backward. With no real step the
    # index points at a masked step, whose output is zero.
    first = jnp.argmax(mask, axis=1)
    idx = first if reverse else time - 1 - jnp.argmax(mask[:, ::-1], axis=1)
    idx = idx.reshape((ys.shape[0], 1) + (1,) * (ys.ndim - 2))
    return jnp.take_along_axis(ys, idx.astype(jnp.int32), axis=1)[:, 0]


def _check_input(name: str, x: Any) -> None:
    if jnp.ndim(x) != 3:
        raise ValueError(
            f"{name}: input has shape {tuple(jnp.shape(x))}, expected (batch, time, "
            f"features). For a single sequence add a batch axis, x[None]; for one "
            f"step call the cell."
        )
    check_floating(name, x)


def _start_carry(name: str, cell: Cell, carry: Carry | None, x: Any, abstract: bool) -> Carry:
    """The initial carry: ``carry`` checked against the cell's, or zeros in ``x``'s dtype."""
    batch = x.shape[0]
    zeros = jax.eval_shape(lambda: cell.initial_carry((batch,), x.dtype))
    if carry is None:
        return zeros if abstract else cell.initial_carry((batch,), x.dtype)
    same_tree = jax.tree_util.tree_structure(carry) == jax.tree_util.tree_structure(zeros)
    if not same_tree or _shapes(carry) != _shapes(zeros):
        got = _shapes(carry) if same_tree else carry
        raise ValueError(
            f"{name}: the initial carry has shapes {got!r}, expected {_shapes(zeros)} for a "
            f"batch of {batch}. Build it with fl.initial_carry(cell, ({batch},))."
        )
    return carry


def rnn(
    cell: Cell,
    *,
    return_sequences: bool = True,
    return_carry: bool = False,
    reverse: bool = False,
    unroll: int | bool = 1,
    hoist: bool | None = None,
    fused_backward: bool | None = None,
) -> Layer:
    r"""Runs ``cell`` over the time axis with ``jax.lax.scan``: compiled once for any length.

    Inputs are batch-major, ``x`` of shape ``(batch, time, in)``. ``apply(params, state, x,
    lengths=None, carry=None)``:

    - ``lengths``: optional, the true length of each sequence, integers of shape
      ``(batch,)``, or a boolean mask ``(batch, time)`` (True at real steps). Masked steps
      leave the carry unchanged and output zeros, so a padded batch gives each sequence the
      outputs and final carry it has alone. With ``reverse=True`` each sequence starts at its
      own last real step. Lengths outside ``[0, time]`` raise a ``ValueError`` when they are
      concrete; under ``jit`` they cannot be checked and act as clipped to ``[0, time]``.
    - ``carry``: optional initial carry (default zeros, :func:`initial_carry`, in ``x``'s
      dtype), leaves ``(batch, H)``.

    The output is ``y``, or ``(y, final_carry)`` with ``return_carry=True``, where ``y`` is
    ``(batch, time, H)`` (``return_sequences=True``; zeros at masked steps) or the output
    of the last step processed, ``(batch, H)`` (``return_sequences=False``: at each
    sequence's last real step, or at step 0 with ``reverse=True``). The default output is a
    single array, so ``rnn`` layers stack in :func:`fundl.serial` with dropout and dense
    layers between them. Params and state are those of ``cell``.

    For the built-in cells, ``hoist=True`` computes the input projection :math:`x W_i + b`
    of all steps as one matmul outside the scan, so that only :math:`h W_h` runs step by
    step; ``hoist=False`` projects each step inside the scan. One big matmul wins on
    accelerators; on CPU the ``(time, batch, G)`` buffer it writes and reads back costs
    more than it saves (see ``benchmarks/rnn_step.py``). The numbers agree either way up to
    float rounding.

    For the built-in cells the backward pass is fused by default: a hand-written backward
    pass (a ``jax.custom_vjp``) computes the params' gradients after the backward loop, as
    one matmul over all steps (:math:`\sum_t h_{t-1}^\top \delta z_t` for :math:`W_h`, as
    cuDNN does), instead of the step-by-step accumulation inside the loop that JAX's
    autodiff of ``lax.scan`` makes (``benchmarks/rnn_step.py`` compares the two). A
    ``custom_vjp`` has no forward mode, so with ``fused_backward=None`` (the default) the
    layer checks its inputs' tracers at trace time and runs the plain scan when forward-mode
    autodiff (``jax.jvp``, ``jax.jacfwd``) traces them directly. ``jax.grad``, ``jax.vjp``,
    ``jax.hessian`` and gradients of gradients use the fused pass. Forward mode the check
    cannot see, because it reaches the layer only through a function already traced to a
    jaxpr (``jax.jvp`` of a ``jax.jit``-ed or ``jax.checkpoint``-ed function calling the
    layer) or because it is ``jax.linearize``, raises JAX's "can't apply forward-mode
    autodiff (jvp) to a custom_vjp function": pass ``fused_backward=False`` there.
    ``True`` always fuses; ``False`` never does. Both give the same numbers up to float
    rounding.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> layer = fl.rnn(fl.gru_cell(8))
        >>> x = jnp.ones((2, 5, 3))
        >>> params, state = layer.init(jax.random.key(0), x)
        >>> y, state = layer.apply(params, state, x, jnp.array([5, 2]))
        >>> y.shape, bool((y[1, 2:] == 0).all())
        ((2, 5, 8), True)

    Args:
        cell: a :class:`~fundl.Cell`: ``fl.lstm_cell(H)``, ``fl.gru_cell(H)``,
            ``fl.simple_rnn_cell(H)``, or a custom one (:func:`make_cell`).
        return_sequences: output every step (default) or only the last one.
        return_carry: also output the final carry.
        reverse: run from the last step to the first (outputs stay in input order).
        unroll: steps per scan iteration (``jax.lax.scan``'s ``unroll``); more can be
            faster for small cells, at the cost of compile time.
        hoist: project the inputs of all steps before the scan (see above). ``None``
            (default) hoists on GPU and TPU, not on CPU (``jax.default_backend()``).
        fused_backward: the params' gradients as one matmul after the backward loop (see
            above): ``None`` (default) unless forward-mode autodiff traces the inputs,
            ``True`` always (reverse mode only), ``False`` never. Ignored by custom cells.

    Returns:
        A :class:`~fundl.Layer` mapping ``(batch, time, in)`` to ``(batch, time, H)`` or
        ``(batch, H)``. Its :func:`~fundl.core.layer_info` meta holds ``rnn={"reverse":
        ..., "return_carry": ...}``, which :func:`bidirectional` reads.
    """
    cell = as_cell(cell, "rnn")
    options = {"return_sequences": return_sequences, "return_carry": return_carry,
               "reverse": reverse, "unroll": unroll, "hoist": hoist,
               "fused_backward": fused_backward}  # fmt: skip
    opts = _Options(_rnn_name(cell, options), reverse, unroll)

    def init(key, x, lengths=None, carry=None):
        _check_input(opts.name, x)
        _time_mask(opts.name, x, lengths)
        carry = _start_carry(opts.name, cell, carry, x, abstract=True)
        x_t = jax.ShapeDtypeStruct((x.shape[0], x.shape[2]), x.dtype)
        return call_at("rnn", cell.init, key, carry, x_t)

    def apply(params, state, x, lengths=None, carry=None, *, key=None, train=False):
        _check_input(opts.name, x)
        mask = _time_mask(opts.name, x, lengths)
        carry = _start_carry(opts.name, cell, carry, x, abstract=False)
        masks = None if mask is None else jnp.swapaxes(mask, 0, 1)  # [T, B]
        scan = _choose_scan(cell, state, hoist, fused_backward, (params, carry, x))
        carry, ys, state = scan(cell, opts, params, state, carry, x, masks, key, train)
        ys = jax.tree_util.tree_map(lambda v: jnp.swapaxes(v, 0, 1), ys)  # [B, T, ...]
        if not return_sequences:
            ys = jax.tree_util.tree_map(lambda v: _last(v, mask, reverse), ys)
        return ((ys, carry) if return_carry else ys), state

    meta = {"reverse": reverse, "return_carry": return_carry}
    side = ("lengths",)  # a side input: combinators pass lengths= on (fundl.core.side_inputs)
    return named(Layer(init, apply), opts.name, (("rnn", cell.layer),), rnn=meta, side_inputs=side)


_DEFAULTS = {"return_sequences": True, "return_carry": False, "reverse": False, "unroll": 1,
             "hoist": None, "fused_backward": None}  # fmt: skip


def _rnn_name(cell: Cell, options: dict[str, Any]) -> str:
    """``rnn(lstm_cell(8), reverse=True)``: the cell and the options that differ."""
    flags = [f"{k}={v}" for k, v in options.items() if v != _DEFAULTS[k]]
    return f"rnn({', '.join([cell.name, *flags])})"
