r"""Recurrent layers: SimpleRNN, LSTM and GRU cells, scanned over time by :func:`rnn`.

A **cell** is a :class:`~fundl.Layer` that computes one time step::

    params, state = cell.init(key, carry, x_t)
    (new_carry, y_t), state = cell.apply(params, state, carry, x_t)

with ``x_t`` of shape ``(batch, in)`` and a ``carry`` (the memory: an array, or a pytree
such as the LSTM's ``(h, c)``) whose leaves are ``(batch, hidden)``.
:func:`initial_carry` builds the zero carry of any cell. :func:`rnn` turns a cell into a
layer over whole sequences ``(batch, time, in)``, with ``jax.lax.scan`` so that it compiles
once whatever the sequence length; it takes optional ``lengths`` (or a boolean mask) for
padded batches and an optional initial carry, and outputs ``(batch, time, H)`` or
``(batch, H)`` (plus the final carry with ``return_carry=True``), so that it stacks in
:func:`fundl.serial`. :func:`bidirectional` runs two of them in opposite directions.

Gate layouts follow cuDNN and PyTorch, so that weights carry over (see
:mod:`fundl.interop`):

- LSTM, params ``{"wi": (in, 4H), "wh": (H, 4H), "b": (4H,)}``, gates in the order input,
  forget, cell, output.
- GRU, params ``{"wi": (in, 3H), "wh": (H, 3H), "bi": (3H,), "bh": (3H,)}``, gates in the
  order reset, update, new, the reset gate applied after the hidden matmul.

Example:
    >>> import jax, jax.numpy as jnp, fundl as fl
    >>> model = fl.serial(fl.rnn(fl.lstm_cell(16), return_sequences=False), fl.dense(10))
    >>> params, state = model.init(jax.random.key(0), jnp.zeros((1, 8, 8)))
    >>> logits, state = model.apply(params, state, jnp.ones((4, 8, 8)))
    >>> logits.shape
    (4, 10)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.nn import initializers

from fundl.core import (
    Layer,
    check_floating,
    default_float_dtype,
    flat_matmul,
    layer_name,
    named,
    with_path,
)

__all__ = [
    "simple_rnn_cell",
    "lstm_cell",
    "gru_cell",
    "make_cell",
    "initial_carry",
    "rnn",
    "bidirectional",
]

Initializer = Callable[..., jax.Array]
Carry = Any
"""A cell's memory: an array or a pytree of arrays, each of shape ``(batch, hidden)``."""
default_wi_init: Initializer = initializers.glorot_uniform()
"""Glorot (Xavier) uniform, for the input weights (applied per gate), as Keras."""
default_wh_init: Initializer = initializers.orthogonal()
"""Orthogonal, for the recurrent weights (applied per gate), as Keras."""


class _CellImpl(NamedTuple):
    """What :func:`rnn` knows about a cell, attached to its ``apply``.

    ``initial_carry(batch_shape, dtype)`` builds the zero carry. For the built-in cells,
    ``project(params, x) -> xp`` is the input projection (any leading axes, ``(..., in) ->
    (..., G)``), ``recur(params, carry, cdtype) -> zr`` the recurrent projection in the
    compute dtype (any leading axes, linear in the carry) and ``merge(carry, xp_t, zr_t) ->
    (carry, y_t)`` the rest of the step (elementwise, no params), so that :func:`rnn` can
    project all steps in one matmul outside the scan (``hoist``) and compute the params'
    gradients after the backward loop (``fused_backward``). They are ``None`` for cells
    made by :func:`make_cell`.
    """

    initial_carry: Callable[[tuple[int, ...], Any], Carry]
    project: Callable[[Any, jax.Array], jax.Array] | None = None
    recur: Callable[[Any, Carry, Any], jax.Array] | None = None
    merge: Callable[[Carry, jax.Array, jax.Array], tuple[Carry, jax.Array]] | None = None

    def step(self, params: Any, carry: Carry, xp: jax.Array) -> tuple[Carry, jax.Array]:
        """One step from the projected input ``xp``: ``(new_carry, y)``."""
        return self.merge(carry, xp, self.recur(params, carry, xp.dtype))


def _bias(b: jax.Array, ndim: int) -> jax.Array:
    """Reshapes a ``(features,)`` bias to broadcast explicitly against ``ndim``-d arrays."""
    return b.reshape((1,) * (ndim - 1) + b.shape)


def _per_gate(init: Initializer, key: jax.Array, rows: int, hidden: int, gates: int, dtype):
    """``init`` applied to each gate's ``(rows, hidden)`` block, concatenated on the columns."""
    keys = jax.random.split(key, gates)
    return jnp.concatenate([init(k, (rows, hidden), dtype) for k in keys], axis=1)


def _spec(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: (tuple(jnp.shape(x)), str(jnp.dtype(x.dtype))), tree)


def _shapes(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: tuple(jnp.shape(x)), tree)


def _check_hidden(name: str, hidden: int) -> None:
    if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
        raise ValueError(f"{name}: hidden must be a positive int, got {hidden!r}.")


def _gated_cell(
    name: str,
    hidden: int,
    carry_names: tuple[str, ...],
    make_params: Callable[[jax.Array, int, Any], dict],
    project: Callable[[Any, jax.Array, Any], jax.Array],
    recur: Callable[[Any, Carry, Any], jax.Array],
    merge: Callable[[Carry, jax.Array, jax.Array], tuple[Carry, jax.Array]],
    dtype: Any,
    param_dtype: Any,
) -> Layer:
    """Builds a cell Layer from its input projection, recurrent projection and merge.

    ``project(params, x, cdtype)`` and ``recur(params, carry, cdtype)`` compute in the
    compute dtype ``cdtype``; ``merge(carry, xp, zr)`` computes in ``xp``'s dtype and
    returns the new carry in the carry's dtypes.
    """
    pair = len(carry_names) > 1
    carry_doc = (
        f"a tuple ({', '.join(carry_names)}), each of shape (batch, {hidden})"
        if pair
        else f"an array of shape (batch, {hidden})"
    )

    def make_carry(batch_shape, dtype_):
        zeros = jnp.zeros((*batch_shape, hidden), dtype_)
        return tuple(zeros for _ in carry_names) if pair else zeros

    def check_x(x):
        if jnp.ndim(x) < 1:
            raise ValueError(
                f"{name}: x_t is a scalar, expected shape (batch, in_features). Add a "
                f"feature axis, e.g. x[..., None]."
            )
        check_floating(name, x)

    def check_carry(carry, x):
        leaves = carry if pair else (carry,)
        ok = isinstance(carry, tuple) and len(carry) == len(carry_names) if pair else True
        want = (*jnp.shape(x)[:-1], hidden)
        ok = ok and all(hasattr(c, "shape") and tuple(jnp.shape(c)) == want for c in leaves)
        if not ok:
            got = _shapes(carry) if hasattr(carry, "shape") or isinstance(carry, tuple) else carry
            raise ValueError(
                f"{name}: carry should be {carry_doc}, here {want}; got {got!r}. Build it "
                f"with fl.initial_carry(cell, {want[:-1]})."
            )
        for c in leaves:
            check_floating(name, c, "The carry must be floating-point, e.g. fl.initial_carry.")

    def init(key, carry, x):
        check_x(x)
        check_carry(carry, x)
        return make_params(key, x.shape[-1], param_dtype or default_float_dtype()), ()

    def project_(params, x):
        w = params["wi"]
        if x.shape[-1] != w.shape[0]:
            raise ValueError(
                f"{name}: input has last dimension {x.shape[-1]}, params expect {w.shape[0]}. "
                f"Feed inputs of shape (..., {w.shape[0]}) or re-init the params on this input."
            )
        return project(params, x, dtype or x.dtype)

    def apply(params, state, carry, x, key=None, train=False):
        del key, train
        check_x(x)
        check_carry(carry, x)
        xp = project_(params, x)
        return merge(carry, xp, recur(params, carry, xp.dtype)), state

    layer = named(Layer(init, apply), name)
    impl = _CellImpl(make_carry, project_, recur, merge)
    layer.apply._fundl_cell = impl  # type: ignore[attr-defined]
    return layer


class _Summed(NamedTuple):
    """A merge that depends on ``xp + zr`` only: ``merge(carry, z)`` with ``z = xp + zr``.

    Called as ``merge(carry, xp, zr)``; :func:`rnn`'s fused backward pass saves and
    differentiates the sum alone.
    """

    of_sum: Callable[[Carry, jax.Array], tuple[Carry, jax.Array]]

    def __call__(self, carry: Carry, xp: jax.Array, zr: jax.Array) -> tuple[Carry, jax.Array]:
        return self.of_sum(carry, xp + zr.astype(xp.dtype))


def _dense_project(params: dict, x: jax.Array, cdtype: Any, bias: str) -> jax.Array:
    """``x @ wi + b`` in the compute dtype: ``(..., in) -> (..., G)``."""
    y = flat_matmul(x.astype(cdtype), params["wi"].astype(cdtype))
    return y + _bias(params[bias].astype(cdtype), y.ndim)


def simple_rnn_cell(
    hidden: int,
    *,
    activation: Callable[[jax.Array], jax.Array] = jax.nn.tanh,
    wi_init: Initializer = default_wi_init,
    wh_init: Initializer = default_wh_init,
    b_init: Initializer = initializers.zeros,
    dtype: Any = None,
    param_dtype: Any = None,
) -> Layer:
    r"""The Elman cell (Keras ``SimpleRNN``, PyTorch ``nn.RNN``): one step of

    .. math:: h' = \phi(x W_i + h W_h + b), \qquad y = h'

    Params: ``{"wi": (in, hidden), "wh": (hidden, hidden), "b": (hidden,)}``. Carry: ``h``,
    shape ``(batch, hidden)``.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> cell = fl.simple_rnn_cell(4)
        >>> h = fl.initial_carry(cell, (2,))
        >>> params, state = cell.init(jax.random.key(0), h, jnp.zeros((2, 3)))
        >>> (h, y), state = cell.apply(params, state, h, jnp.ones((2, 3)))
        >>> h.shape, y.shape
        ((2, 4), (2, 4))

    Args:
        hidden: the size ``H`` of the hidden state.
        activation: :math:`\phi`, e.g. ``jax.nn.tanh`` (default) or ``jax.nn.relu``.
        wi_init: initializer of ``wi`` (default glorot uniform).
        wh_init: initializer of ``wh`` (default orthogonal).
        b_init: initializer of ``b`` (default zeros).
        dtype: the compute dtype; ``None`` computes in the input's dtype. The carry keeps
            its own dtype.
        param_dtype: the storage dtype of the params (default float32, or float64 under
            ``jax_enable_x64``).

    Returns:
        A cell :class:`~fundl.Layer`: ``apply(params, state, h, x_t) -> ((h', y_t),
        state)`` with ``x_t`` ``(batch, in)``, ``h``, ``h'`` and ``y_t`` ``(batch, hidden)``.
    """
    act_name = getattr(activation, "__name__", "activation")
    name = (
        f"simple_rnn_cell({hidden})"
        if act_name == "tanh"
        else (f"simple_rnn_cell({hidden}, {act_name})")
    )
    _check_hidden(name, hidden)

    def make_params(key, n_in, pdtype):
        ki, kh, kb = jax.random.split(key, 3)
        return {
            "wi": wi_init(ki, (n_in, hidden), pdtype),
            "wh": wh_init(kh, (hidden, hidden), pdtype),
            "b": b_init(kb, (hidden,), pdtype),
        }

    def project(params, x, cdtype):
        return _dense_project(params, x, cdtype, "b")

    def recur(params, h, cdtype):
        return jnp.matmul(h.astype(cdtype), params["wh"].astype(cdtype))

    def merge(h, z):
        h_new = activation(z)
        return h_new.astype(h.dtype), h_new

    return _gated_cell(
        name, hidden, ("h",), make_params, project, recur, _Summed(merge), dtype, param_dtype
    )


def lstm_cell(
    hidden: int,
    *,
    forget_bias: float = 1.0,
    wi_init: Initializer = default_wi_init,
    wh_init: Initializer = default_wh_init,
    b_init: Initializer = initializers.zeros,
    dtype: Any = None,
    param_dtype: Any = None,
) -> Layer:
    r"""The long short-term memory cell (Hochreiter and Schmidhuber), cuDNN's gate layout.

    .. math::
        z &= x W_i + h W_h + b, \qquad [z_i, z_f, z_g, z_o] = z \\
        i &= \sigma(z_i), \quad f = \sigma(z_f), \quad g = \tanh(z_g),
            \quad o = \sigma(z_o) \\
        c' &= f \odot c + i \odot g, \qquad h' = o \odot \tanh(c'), \qquad y = h'

    Params: ``{"wi": (in, 4H), "wh": (H, 4H), "b": (4H,)}``, the four gates side by side in
    the order input, forget, cell, output (PyTorch's order; its two biases sum to ``b``, see
    :func:`fundl.interop.lstm_from_torch`). Carry: ``(h, c)``, each ``(batch, H)``.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> cell = fl.lstm_cell(4)
        >>> carry = fl.initial_carry(cell, (2,))
        >>> params, state = cell.init(jax.random.key(0), carry, jnp.zeros((2, 3)))
        >>> jax.tree_util.tree_map(jnp.shape, params)
        {'b': (16,), 'wh': (4, 16), 'wi': (3, 16)}
        >>> ((h, c), y), state = cell.apply(params, state, carry, jnp.ones((2, 3)))
        >>> y.shape
        (2, 4)

    Args:
        hidden: the size ``H`` of ``h`` and ``c``.
        forget_bias: added to the forget gate's slice of ``b`` at init (default 1, as Keras's
            ``unit_forget_bias``), so that the cell starts by remembering.
        wi_init: initializer of each gate's ``(in, H)`` block of ``wi`` (default glorot
            uniform).
        wh_init: initializer of each gate's ``(H, H)`` block of ``wh`` (default orthogonal).
        b_init: initializer of ``b`` (default zeros), before ``forget_bias`` is added.
        dtype: the compute dtype; ``None`` computes in the input's dtype. The carry keeps
            its own dtype.
        param_dtype: the storage dtype of the params.

    Returns:
        A cell :class:`~fundl.Layer`: ``apply(params, state, (h, c), x_t) -> (((h', c'),
        y_t), state)`` with ``x_t`` ``(batch, in)`` and the rest ``(batch, H)``.
    """
    name = f"lstm_cell({hidden})"
    _check_hidden(name, hidden)

    def make_params(key, n_in, pdtype):
        ki, kh, kb = jax.random.split(key, 3)
        b = b_init(kb, (4 * hidden,), pdtype)
        b = b + jnp.concatenate(
            [jnp.zeros((hidden,), pdtype), jnp.full((hidden,), forget_bias, pdtype)]
            + [jnp.zeros((hidden,), pdtype)] * 2
        )
        return {
            "wi": _per_gate(wi_init, ki, n_in, hidden, 4, pdtype),
            "wh": _per_gate(wh_init, kh, hidden, hidden, 4, pdtype),
            "b": b,
        }

    def project(params, x, cdtype):
        return _dense_project(params, x, cdtype, "b")

    def recur(params, carry, cdtype):
        return jnp.matmul(carry[0].astype(cdtype), params["wh"].astype(cdtype))  # (..., 4H)

    def merge(carry, z):
        h, c = carry
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c_new = jax.nn.sigmoid(f) * c.astype(z.dtype) + jax.nn.sigmoid(i) * jnp.tanh(g)
        h_new = jax.nn.sigmoid(o) * jnp.tanh(c_new)
        return (h_new.astype(h.dtype), c_new.astype(c.dtype)), h_new

    return _gated_cell(
        name, hidden, ("h", "c"), make_params, project, recur, _Summed(merge), dtype, param_dtype
    )


def gru_cell(
    hidden: int,
    *,
    wi_init: Initializer = default_wi_init,
    wh_init: Initializer = default_wh_init,
    b_init: Initializer = initializers.zeros,
    dtype: Any = None,
    param_dtype: Any = None,
) -> Layer:
    r"""The gated recurrent unit (Cho et al.), cuDNN's and PyTorch's variant.

    .. math::
        [a_r, a_z, a_n] &= x W_i + b_i, \qquad [u_r, u_z, u_n] = h W_h + b_h \\
        r &= \sigma(a_r + u_r), \qquad z = \sigma(a_z + u_z) \\
        n &= \tanh(a_n + r \odot u_n), \qquad h' = (1 - z) \odot n + z \odot h, \qquad y = h'

    The reset gate multiplies the hidden matmul (``reset_after``, as cuDNN and Keras's
    default), which is why there are two biases.

    Params: ``{"wi": (in, 3H), "wh": (H, 3H), "bi": (3H,), "bh": (3H,)}``, gates in the order
    reset, update, new (exactly PyTorch's ``nn.GRU``, transposed). Carry: ``h``,
    ``(batch, H)``.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> cell = fl.gru_cell(4)
        >>> h = fl.initial_carry(cell, (2,))
        >>> params, state = cell.init(jax.random.key(0), h, jnp.zeros((2, 3)))
        >>> (h, y), state = cell.apply(params, state, h, jnp.ones((2, 3)))
        >>> h.shape
        (2, 4)

    Args:
        hidden: the size ``H`` of the hidden state.
        wi_init: initializer of each gate's ``(in, H)`` block of ``wi`` (default glorot
            uniform).
        wh_init: initializer of each gate's ``(H, H)`` block of ``wh`` (default orthogonal).
        b_init: initializer of ``bi`` and ``bh`` (default zeros).
        dtype: the compute dtype; ``None`` computes in the input's dtype. The carry keeps
            its own dtype.
        param_dtype: the storage dtype of the params.

    Returns:
        A cell :class:`~fundl.Layer`: ``apply(params, state, h, x_t) -> ((h', y_t), state)``
        with ``x_t`` ``(batch, in)`` and ``h``, ``h'``, ``y_t`` ``(batch, H)``.
    """
    name = f"gru_cell({hidden})"
    _check_hidden(name, hidden)

    def make_params(key, n_in, pdtype):
        ki, kh, kbi, kbh = jax.random.split(key, 4)
        return {
            "wi": _per_gate(wi_init, ki, n_in, hidden, 3, pdtype),
            "wh": _per_gate(wh_init, kh, hidden, hidden, 3, pdtype),
            "bi": b_init(kbi, (3 * hidden,), pdtype),
            "bh": b_init(kbh, (3 * hidden,), pdtype),
        }

    def project(params, x, cdtype):
        return _dense_project(params, x, cdtype, "bi")

    def recur(params, h, cdtype):
        u = jnp.matmul(h.astype(cdtype), params["wh"].astype(cdtype))  # (..., 3H)
        return u + _bias(params["bh"].astype(cdtype), u.ndim)

    def merge(h, xp, u):
        cdtype = xp.dtype
        a_r, a_z, a_n = jnp.split(xp, 3, axis=-1)
        u_r, u_z, u_n = jnp.split(u.astype(cdtype), 3, axis=-1)
        r = jax.nn.sigmoid(a_r + u_r)
        z = jax.nn.sigmoid(a_z + u_z)
        n = jnp.tanh(a_n + r * u_n)
        h_new = (1 - z) * n + z * h.astype(cdtype)
        return h_new.astype(h.dtype), h_new

    return _gated_cell(name, hidden, ("h",), make_params, project, recur, merge, dtype, param_dtype)


def make_cell(layer: Layer, initial_carry: Callable[[tuple[int, ...], Any], Carry]) -> Layer:
    """Makes a custom cell usable by :func:`rnn` and :func:`fundl.initial_carry`.

    ``layer`` must follow the cell signature: ``init(key, carry, x_t)`` and ``apply(params,
    state, carry, x_t, key=None, train=False) -> ((new_carry, y_t), state)``, with
    ``new_carry`` of the same structure, shapes and dtypes as ``carry``. Its state is
    threaded through the steps; a key, when given, is folded with the step index.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> def init(key, h, x):
        ...     return {"w": jnp.ones((x.shape[-1], h.shape[-1]))}, ()
        >>> def apply(params, state, h, x, key=None, train=False):
        ...     h = 0.5 * h + x @ params["w"]
        ...     return (h, h), state
        >>> cell = fl.make_cell(fl.Layer(init, apply), lambda shape, dtype: jnp.zeros((*shape, 3)))
        >>> layer = fl.rnn(cell)
        >>> params, state = layer.init(jax.random.key(0), jnp.zeros((1, 4, 2)))
        >>> y, state = layer.apply(params, state, jnp.ones((1, 4, 2)))
        >>> y[0, :, 0]
        Array([2.  , 3.  , 3.5 , 3.75], dtype=float32)

    Args:
        layer: a layer with the cell signature above.
        initial_carry: ``(batch_shape, dtype) -> carry``, the zero carry.

    Returns:
        The same layer, now a cell.
    """
    if not isinstance(layer, Layer) or not callable(initial_carry):
        raise TypeError(
            "make_cell(layer, initial_carry): expected a fundl Layer and a function "
            f"(batch_shape, dtype) -> carry, got {type(layer).__name__} and "
            f"{type(initial_carry).__name__}."
        )
    layer.apply._fundl_cell = _CellImpl(initial_carry)  # type: ignore[attr-defined]
    return layer


def _impl(cell: Layer, who: str) -> _CellImpl:
    impl = getattr(cell.apply, "_fundl_cell", None) if isinstance(cell, Layer) else None
    if impl is None:
        raise TypeError(
            f"{who}: {layer_name(cell) if isinstance(cell, Layer) else type(cell).__name__} "
            f"is not a recurrent cell. Use fl.lstm_cell(H), fl.gru_cell(H), "
            f"fl.simple_rnn_cell(H), or wrap a custom cell with fl.make_cell(layer, "
            f"initial_carry)."
        )
    return impl


def initial_carry(cell: Layer, batch_shape: tuple[int, ...], dtype: Any = None) -> Carry:
    """The zero carry of ``cell`` for a batch of shape ``batch_shape``.

    Example:
        >>> import fundl as fl
        >>> h, c = fl.initial_carry(fl.lstm_cell(8), (32,))
        >>> h.shape, c.shape
        ((32, 8), (32, 8))

    Args:
        cell: a cell (``fl.lstm_cell(H)``, ...).
        batch_shape: the leading shape, usually ``(batch,)``.
        dtype: the carry's dtype (default float32, or float64 under ``jax_enable_x64``).

    Returns:
        The carry: leaves of shape ``(*batch_shape, hidden)``, zeros.
    """
    impl = _impl(cell, "initial_carry")
    return impl.initial_carry(tuple(batch_shape), dtype or default_float_dtype())


def _call(segment: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError) as err:
        raise with_path(err, segment) from None


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


def rnn(
    cell: Layer,
    *,
    return_sequences: bool = True,
    return_carry: bool = False,
    reverse: bool = False,
    unroll: int | bool = 1,
    hoist: bool | None = None,
    fused_backward: bool = False,
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
    more than it saves (measured: the LSTM train step of ``benchmarks/rnn_step.py`` runs
    ~20% faster unhoisted on CPU). The numbers agree either way up to float rounding.

    ``fused_backward=True`` (built-in cells) gives the scan a hand-written backward pass
    that computes the params' gradients after the backward loop, as one matmul over all
    steps (:math:`\sum_t h_{t-1}^\top \delta z_t` for :math:`W_h`, as cuDNN does), instead
    of the step-by-step accumulation inside the loop that JAX's autodiff of ``lax.scan``
    makes. Measured: the LSTM train step of ``benchmarks/rnn_step.py`` ~10% faster on a
    2-core CPU. The price: reverse mode only. ``jax.grad``, ``jax.vjp``, ``jax.hessian``
    and gradients of gradients work; ``jax.jvp`` and ``jax.jacfwd`` of the layer raise
    (a ``jax.custom_vjp``), so the default stays off.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> layer = fl.rnn(fl.gru_cell(8))
        >>> x = jnp.ones((2, 5, 3))
        >>> params, state = layer.init(jax.random.key(0), x)
        >>> y, state = layer.apply(params, state, x, jnp.array([5, 2]))
        >>> y.shape, bool((y[1, 2:] == 0).all())
        ((2, 5, 8), True)

    Args:
        cell: a cell: ``fl.lstm_cell(H)``, ``fl.gru_cell(H)``, ``fl.simple_rnn_cell(H)``, or
            one made with :func:`make_cell`.
        return_sequences: output every step (default) or only the last one.
        return_carry: also output the final carry.
        reverse: run from the last step to the first (outputs stay in input order).
        unroll: steps per scan iteration (``jax.lax.scan``'s ``unroll``); more can be
            faster for small cells, at the cost of compile time.
        hoist: project the inputs of all steps before the scan (see above). ``None``
            (default) hoists on GPU and TPU, not on CPU (``jax.default_backend()``).
        fused_backward: the params' gradients as one matmul after the backward loop (see
            above; reverse-mode autodiff only). Ignored by cells made with
            :func:`make_cell`.

    Returns:
        A :class:`~fundl.Layer` mapping ``(batch, time, in)`` to ``(batch, time, H)`` or
        ``(batch, H)``.
    """
    impl = _impl(cell, "rnn")
    flags = [
        f"{k}={v}"
        for k, v, default in (
            ("return_sequences", return_sequences, True),
            ("return_carry", return_carry, False),
            ("reverse", reverse, False),
            ("unroll", unroll, 1),
            ("hoist", hoist, None),
            ("fused_backward", fused_backward, False),
        )
        if v != default
    ]
    name = f"rnn({', '.join([layer_name(cell), *flags])})"

    def check_x(x):
        if jnp.ndim(x) != 3:
            raise ValueError(
                f"{name}: input has shape {tuple(jnp.shape(x))}, expected (batch, time, "
                f"features). For a single sequence add a batch axis, x[None]; for one "
                f"step call the cell."
            )
        check_floating(name, x)

    def check_carry(carry, x):
        expected = jax.eval_shape(lambda: impl.initial_carry((x.shape[0],), x.dtype))
        same_tree = jax.tree_util.tree_structure(carry) == jax.tree_util.tree_structure(expected)
        if not same_tree or _shapes(carry) != _shapes(expected):
            got = _shapes(carry) if same_tree else carry
            raise ValueError(
                f"{name}: the initial carry has shapes {got!r}, expected {_shapes(expected)} "
                f"for a batch of {x.shape[0]}. Build it with fl.initial_carry(cell, "
                f"({x.shape[0]},))."
            )

    def init(key, x, lengths=None, carry=None):
        check_x(x)
        _time_mask(name, x, lengths)
        if carry is None:
            carry = jax.eval_shape(lambda: impl.initial_carry((x.shape[0],), x.dtype))
        else:
            check_carry(carry, x)
        x_t = jax.ShapeDtypeStruct((x.shape[0], x.shape[2]), x.dtype)
        return _call("rnn", cell.init, key, carry, x_t)

    def checked(new, old):
        if jax.tree_util.tree_structure(new) != jax.tree_util.tree_structure(old) or _spec(
            new
        ) != _spec(old):
            raise ValueError(
                f"{name}: the cell returned a carry {_spec(new)} that does not match the carry "
                f"it was given {_spec(old)} (structure, shapes and dtypes must agree, as "
                f"lax.scan needs). Make the cell return its new carry like the old one, "
                f"e.g. cast it with .astype(carry.dtype)."
            )
        return new

    def apply(params, state, x, lengths=None, carry=None, *, key=None, train=False):
        check_x(x)
        batch, time = x.shape[0], x.shape[1]
        mask = _time_mask(name, x, lengths)
        if carry is None:
            carry = impl.initial_carry((batch,), x.dtype)
        else:
            check_carry(carry, x)
        masks = None if mask is None else jnp.swapaxes(mask, 0, 1)  # [T, B]

        fast = impl.project is not None and isinstance(state, tuple) and not state
        hoisted = fast and (jax.default_backend() != "cpu" if hoist is None else hoist)
        if fast and fused_backward:
            _call("rnn", jax.eval_shape, impl.project, params, x[:, :1])  # shape checks
            xs = jnp.swapaxes(x, 0, 1)  # [T, B, in]
            if hoisted:
                xs = _call("rnn", impl.project, params, xs)  # [T, B, G]
            scan = _fused_scan(impl, checked, hoisted, reverse, unroll)
            carry, ys = scan(params, carry, xs, masks)
        elif hoisted:
            # Hoisted input projection: one (batch * time, in) x (in, G) matmul.
            xs = jnp.swapaxes(_call("rnn", impl.project, params, x), 0, 1)  # [T, B, G]

            def step(c, s, xp_t, t):
                del t
                return impl.step(params, c, xp_t), s

        elif fast:
            xs = jnp.swapaxes(x, 0, 1)  # [T, B, in]
            _call("rnn", jax.eval_shape, impl.project, params, x[:, :1])  # shape checks

            def step(c, s, x_t, t):
                del t
                return impl.step(params, c, impl.project(params, x_t)), s

        else:
            xs = jnp.swapaxes(x, 0, 1)  # [T, B, in]

            def step(c, s, x_t, t):
                k = None if key is None else jax.random.fold_in(key, t)
                return _call("rnn", cell.apply, params, s, c, x_t, key=k, train=train)

        def body(cs, inputs):
            c, s = cs
            x_t, m, t = inputs
            (new_c, y), s = step(c, s, x_t, t)
            new_c = checked(new_c, c)
            if m is not None:
                new_c = _where(m, new_c, c)
                y = jax.tree_util.tree_map(lambda v: _where(m, v, jnp.zeros_like(v)), y)
            return (new_c, s), y

        if not (fast and fused_backward):
            steps = None if fast else jnp.arange(time, dtype=jnp.int32)  # for dropout keys
            (carry, state), ys = jax.lax.scan(
                body, (carry, state), (xs, masks, steps), reverse=reverse, unroll=unroll
            )
        ys = jax.tree_util.tree_map(lambda v: jnp.swapaxes(v, 0, 1), ys)  # [B, T, ...]
        if return_sequences:
            out = ys
        else:
            out = jax.tree_util.tree_map(lambda v: _last(v, mask, reverse), ys)
        return ((out, carry) if return_carry else out), state

    layer = named(Layer(init, apply), name, (("rnn", cell),))
    layer.apply._fundl_rnn_reverse = reverse  # type: ignore[attr-defined]
    layer.apply._fundl_rnn_carry = return_carry  # type: ignore[attr-defined]
    return layer


def _merge_masked(merge: Callable, checked: Callable, c: Carry, args: tuple, m) -> tuple:
    """``merge(c, *args)``, with masked steps keeping the carry and outputting zeros."""
    new_c, y = merge(c, *args)
    new_c = checked(new_c, c)
    if m is not None:
        new_c = _where(m, new_c, c)
        y = jax.tree_util.tree_map(lambda v: _where(m, v, jnp.zeros_like(v)), y)
    return new_c, y


def _fused_scan(impl: _CellImpl, checked: Callable, hoisted: bool, reverse: bool, unroll):
    """``scan(params, carry, xs, masks) -> (carry, ys)`` with the params' gradients fused.

    ``xs`` is ``(T, B, in)``, or ``(T, B, G)`` already projected when ``hoisted``; ``masks``
    ``(T, B)`` or ``None``. The forward loop saves each step's carry and what the merge
    reads (``xp + zr`` for a :class:`_Summed` merge, else both); the backward loop runs the
    merge's VJP and the recurrent projection's VJP in the carry only, stacking the
    cotangents of the projections; the params' gradients then come from two VJPs over all
    steps at once (matmuls over time x batch).
    """
    if isinstance(impl.merge, _Summed):

        def combine(xp, zr):
            return xp + zr.astype(xp.dtype)

        def merge(c, u, m):
            return _merge_masked(impl.merge.of_sum, checked, c, (u,), m)

        def split(du):
            return du, du

    else:

        def combine(xp, zr):
            return xp, zr

        def merge(c, u, m):
            return _merge_masked(impl.merge, checked, c, u, m)

        def split(du):
            return du

    def forward(params, carry, xs, masks):
        def body(c, inputs):
            x_t, m = inputs
            xp = x_t if hoisted else impl.project(params, x_t)
            u = combine(xp, impl.recur(params, c, xp.dtype))
            new_c, y = merge(c, u, m)
            return new_c, (y, (c, u))

        return jax.lax.scan(body, carry, (xs, masks), reverse=reverse, unroll=unroll)

    @jax.custom_vjp
    def scan(params, carry, xs, masks):
        carry, (ys, _) = forward(params, carry, xs, masks)
        return carry, ys

    def fwd(params, carry, xs, masks):
        carry, (ys, saved) = forward(params, carry, xs, masks)
        return (carry, ys), (params, xs, masks, saved)

    def bwd(res, cts):
        params, xs, masks, (cs, us) = res
        d_carry, d_ys = cts

        def body(dc, inputs):
            c, u, m, dy = inputs
            _, merge_vjp = jax.vjp(lambda c, u: merge(c, u, m), c, u)
            dc_merge, du = merge_vjp((dc, dy))
            dzr = split(du)[1]
            _, recur_vjp = jax.vjp(lambda c: impl.recur(params, c, dzr.dtype), c)
            (dc_recur,) = recur_vjp(dzr)
            return jax.tree_util.tree_map(jnp.add, dc_merge, dc_recur), du

        d_carry, dus = jax.lax.scan(
            body, d_carry, (cs, us, masks, d_ys), reverse=not reverse, unroll=unroll
        )
        # The params' gradients over all steps at once: one matmul each, over the steps and
        # the batch flattened to one axis (a 2-D matmul, which XLA runs fastest).
        dxps, dzrs = split(dus)
        cs, dzrs = _flat(cs), _flat(dzrs)
        _, recur_vjp = jax.vjp(lambda p: impl.recur(p, cs, dzrs.dtype), params)
        (d_params,) = recur_vjp(dzrs)
        if hoisted:
            d_xs = dxps
        else:
            _, project_vjp = jax.vjp(impl.project, params, _flat(xs))
            d_project, d_xs = project_vjp(_flat(dxps))
            d_params = jax.tree_util.tree_map(jnp.add, d_params, d_project)
            d_xs = d_xs.reshape(xs.shape)
        return d_params, d_carry, d_xs, None

    scan.defvjp(fwd, bwd)
    return scan


def _flat(tree: Any) -> Any:
    """Each leaf ``(T, B, ...)`` as ``(T * B, ...)``."""
    return jax.tree_util.tree_map(lambda a: a.reshape((-1, *a.shape[2:])), tree)


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


_MERGES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "concat": lambda a, b: jnp.concatenate([a, b], axis=-1),
    "sum": lambda a, b: a + b,
    "mean": lambda a, b: (a + b) / 2,
}


def bidirectional(
    forward: Layer,
    backward: Layer,
    merge: str | Callable[[jax.Array, jax.Array], jax.Array] = "concat",
) -> Layer:
    """Runs ``forward`` and ``backward`` over the same sequences and merges their outputs.

    ``forward`` is an :func:`rnn` layer, ``backward`` one built with ``reverse=True`` (its
    outputs are in input order, so step ``t`` of both directions line up). ``apply(params,
    state, x, lengths=None, carry=None)`` passes ``lengths`` to both, so the backward
    direction starts at each sequence's own last real step; ``carry`` is an optional pair
    ``(forward_carry, backward_carry)``. Params and state are ``{"forward": ...,
    "backward": ...}``. When both layers return their carry, the output is
    ``(merged, (forward_carry, backward_carry))``.

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
    if isinstance(merge, str):
        if merge not in _MERGES:
            raise ValueError(f"{name}: merge must be one of {sorted(_MERGES)} or a function.")
        merge = _MERGES[merge]
    if getattr(forward.apply, "_fundl_rnn_reverse", False):
        raise ValueError(f"{name}: the forward layer runs in reverse; build it with reverse=False.")
    if getattr(backward.apply, "_fundl_rnn_reverse", True) is not True:
        raise ValueError(
            f"{name}: the backward layer runs forward; build it with fl.rnn(cell, reverse=True)."
        )

    with_carry = getattr(forward.apply, "_fundl_rnn_carry", False) and getattr(
        backward.apply, "_fundl_rnn_carry", False
    )

    def split_carry(carry):
        if carry is None:
            return None, None
        if not isinstance(carry, tuple | list) or len(carry) != 2:
            raise ValueError(
                f"{name}: carry must be a pair (forward_carry, backward_carry), got "
                f"{type(carry).__name__}."
            )
        return carry

    def init(key, x, lengths=None, carry=None):
        kf, kb = jax.random.split(key)
        cf, cb = split_carry(carry)
        pf, sf = _call("bidirectional.forward", forward.init, kf, x, lengths, cf)
        pb, sb = _call("bidirectional.backward", backward.init, kb, x, lengths, cb)
        return {"forward": pf, "backward": pb}, {"forward": sf, "backward": sb}

    def apply(params, state, x, lengths=None, carry=None, *, key=None, train=False):
        kf, kb = (None, None) if key is None else jax.random.split(key)
        cf, cb = split_carry(carry)
        of, sf = _call(
            "bidirectional.forward",
            forward.apply,
            params["forward"],
            state["forward"],
            x,
            lengths,
            cf,
            key=kf,
            train=train,
        )
        ob, sb = _call(
            "bidirectional.backward",
            backward.apply,
            params["backward"],
            state["backward"],
            x,
            lengths,
            cb,
            key=kb,
            train=train,
        )
        new_state = {"forward": sf, "backward": sb}
        if with_carry:
            return (merge(of[0], ob[0]), (of[1], ob[1])), new_state
        return merge(of, ob), new_state

    children = (("bidirectional.forward", forward), ("bidirectional.backward", backward))
    return named(Layer(init, apply), name, children)
