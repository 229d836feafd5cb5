r"""Recurrent cells: one time step as a value, :class:`Cell`, and the built-in cells.

Gate layouts follow cuDNN and PyTorch, so that weights carry over (see
:mod:`fundl.interop`):

- LSTM, params ``{"wi": (in, 4H), "wh": (H, 4H), "b": (4H,)}``, gates in the order input,
  forget, cell, output.
- GRU, params ``{"wi": (in, 3H), "wh": (H, 3H), "bi": (3H,), "bh": (3H,)}``, gates in the
  order reset, update, new, the reset gate applied after the hidden matmul.

``H`` is the cell's ``features``, the size of its output and of each carry leaf.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.nn import initializers

from fundl.core import (
    ApplyFn,
    InitFn,
    Layer,
    check_floating,
    default_float_dtype,
    flat_matmul,
    layer_name,
    named,
    renamed,
)

__all__ = ["Cell", "simple_rnn_cell", "lstm_cell", "gru_cell", "make_cell", "initial_carry"]

Initializer = Callable[..., jax.Array]
Carry = Any
"""A cell's memory: an array or a pytree of arrays, each of shape ``(batch, features)``."""
default_wi_init: Initializer = initializers.glorot_uniform()
"""Glorot (Xavier) uniform, for the input weights (applied per gate), as Keras."""
default_wh_init: Initializer = initializers.orthogonal()
"""Orthogonal, for the recurrent weights (applied per gate), as Keras."""


class StepParts(NamedTuple):
    """A built-in cell's step in three parts: what :func:`fundl.rnn`'s fast scans need.

    Internal to ``fundl.recurrent`` (not public API); the one place that knows how a step
    splits. One step is ``merge(carry, project(params, x), recur(params, carry, cdtype))``.

    Attributes:
        project: ``(params, x) -> xp``, the input projection :math:`x W_i + b` in the compute
            dtype, ``(..., in) -> (..., G)`` over any leading axes, so that ``rnn`` can
            project every step in one matmul before the scan (``hoist``).
        recur: ``(params, carry, cdtype) -> zr``, the recurrent projection, ``(..., G)`` in
            ``cdtype``, linear in the carry, so that ``rnn(..., fused_backward=True)`` can
            differentiate it for the params once, over every step, after the loop.
        merge: ``(carry, xp, zr) -> (new_carry, y)``, the rest of the step: elementwise, no
            params.
        merge_of_sum: the same merge as a function ``(carry, z) -> (new_carry, y)`` of
            ``z = xp + zr`` alone, for cells whose merge reads only that sum (LSTM, simple
            RNN), else ``None`` (GRU). The fused backward then saves ``z`` for the backward
            loop instead of both ``xp`` and ``zr``.
    """

    project: Callable[[Any, jax.Array], jax.Array]
    recur: Callable[[Any, Carry, Any], jax.Array]
    merge: Callable[[Carry, jax.Array, jax.Array], tuple[Carry, jax.Array]]
    merge_of_sum: Callable[[Carry, jax.Array], tuple[Carry, jax.Array]] | None = None

    def step(self, params: Any, carry: Carry, xp: jax.Array) -> tuple[Carry, jax.Array]:
        """One step from the projected input ``xp``: ``(new_carry, y)``."""
        return self.merge(carry, xp, self.recur(params, carry, xp.dtype))


class Cell(NamedTuple):
    """A recurrent cell: one time step, and the zero memory it starts from.

    ``init`` and ``apply`` follow the layer contract with two inputs, the carry (the memory:
    an array, or a pytree such as the LSTM's ``(h, c)``) and one step's input ``x_t`` of
    shape ``(batch, in)``::

        params, state = cell.init(key, carry, x_t)
        (new_carry, y_t), state = cell.apply(params, state, carry, x_t, key=None, train=False)

    with ``new_carry`` of the same structure, shapes and dtypes as ``carry``.
    ``initial_carry(batch_shape, dtype)`` builds the zero carry (see
    :func:`fundl.initial_carry`). :func:`fundl.rnn` scans a cell over the time axis.

    A cell is not a :class:`~fundl.Layer`: it has a third function, and it maps one step,
    not a sequence. ``cell.layer`` is its step as a Layer, for anything that takes a layer
    (``fl.testing.check_layer``, ``fl.summary``, a one-step ``fl.serial``). Build a custom
    cell with ``fl.Cell(init, apply, initial_carry)`` or :func:`fundl.make_cell`.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> def init(key, h, x):
        ...     return {"w": jnp.ones((x.shape[-1], h.shape[-1]))}, ()
        >>> def apply(params, state, h, x, key=None, train=False):
        ...     h = 0.5 * h + x @ params["w"]
        ...     return (h, h), state
        >>> cell = fl.Cell(init, apply, lambda shape, dtype: jnp.zeros((*shape, 3), dtype))
        >>> y, _ = fl.rnn(cell).apply({"w": jnp.ones((2, 3))}, (), jnp.ones((1, 4, 2)))
        >>> y[0, :, 0]
        Array([2.  , 3.  , 3.5 , 3.75], dtype=float32)

    Attributes:
        init: ``(key, carry, x_t) -> (params, state)``.
        apply: ``(params, state, carry, x_t, key=None, train=False) -> ((new_carry, y_t),
            state)``.
        initial_carry: ``(batch_shape, dtype) -> carry``, zeros.
        parts: for the built-in cells, their step split in parts (internal: they let
            :func:`fundl.rnn` hoist the input projection and fuse the params' gradients);
            ``None`` for custom cells, which ``rnn`` runs through ``apply``.
    """

    init: InitFn
    apply: ApplyFn
    initial_carry: Callable[[tuple[int, ...], Any], Carry]
    parts: StepParts | None = None

    @property
    def layer(self) -> Layer:
        """The step as a :class:`~fundl.Layer`: ``Layer(cell.init, cell.apply)``."""
        return Layer(self.init, self.apply)

    @property
    def name(self) -> str:
        """A short description, e.g. ``"lstm_cell(64)"``, used in errors."""
        return layer_name(self.layer)

    def __repr__(self) -> str:
        return f"Cell({self.name})"


def _bias(b: jax.Array, ndim: int) -> jax.Array:
    """Reshapes a ``(features,)`` bias to broadcast explicitly against ``ndim``-d arrays."""
    return b.reshape((1,) * (ndim - 1) + b.shape)


def _per_gate(init: Initializer, key: jax.Array, rows: int, features: int, gates: int, dtype):
    """``init`` applied to each gate's ``(rows, features)`` block, concatenated on columns."""
    keys = jax.random.split(key, gates)
    return jnp.concatenate([init(k, (rows, features), dtype) for k in keys], axis=1)


def _shapes(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: tuple(jnp.shape(x)), tree)


def _check_features(name: str, features: int) -> None:
    if not isinstance(features, int) or isinstance(features, bool) or features < 1:
        raise ValueError(f"{name}: features must be a positive int, got {features!r}.")


def _check_step(name: str, carry: Carry, x: Any, features: int, carry_names: tuple) -> None:
    """Checks one step's input ``x`` ``(batch, in)`` and ``carry`` (leaves ``(batch, H)``)."""
    if jnp.ndim(x) < 1:
        raise ValueError(
            f"{name}: x_t is a scalar, expected shape (batch, in_features). Add a feature "
            f"axis, e.g. x[..., None]."
        )
    check_floating(name, x)
    pair = len(carry_names) > 1
    leaves = carry if pair else (carry,)
    ok = isinstance(carry, tuple) and len(carry) == len(carry_names) if pair else True
    want = (*jnp.shape(x)[:-1], features)
    ok = ok and all(hasattr(c, "shape") and tuple(jnp.shape(c)) == want for c in leaves)
    if not ok:
        doc = (
            f"a tuple ({', '.join(carry_names)}), each of shape (batch, {features})"
            if pair
            else f"an array of shape (batch, {features})"
        )
        got = _shapes(carry) if hasattr(carry, "shape") or isinstance(carry, tuple) else carry
        raise ValueError(
            f"{name}: carry should be {doc}, here {want}; got {got!r}. Build it with "
            f"fl.initial_carry(cell, {want[:-1]})."
        )
    for c in leaves:
        check_floating(name, c, "The carry must be floating-point, e.g. fl.initial_carry.")


def _builtin_cell(
    name: str,
    features: int,
    carry_names: tuple[str, ...],
    make_params: Callable[[jax.Array, int, Any], dict],
    parts: StepParts,
    dtype: Any,
    param_dtype: Any,
) -> Cell:
    """A :class:`Cell` from ``make_params(key, n_in, pdtype)`` and its step's parts.

    ``parts.project`` here takes ``(params, x, cdtype)``; the cell computes in ``dtype``
    (``None``: ``x``'s dtype) and checks ``x``'s last dimension against ``params["wi"]``.
    """

    def make_carry(batch_shape, carry_dtype):
        zeros = jnp.zeros((*batch_shape, features), carry_dtype)
        return tuple(zeros for _ in carry_names) if len(carry_names) > 1 else zeros

    def init(key, carry, x):
        _check_step(name, carry, x, features, carry_names)
        return make_params(key, x.shape[-1], param_dtype or default_float_dtype()), ()

    def project(params, x):
        w = params["wi"]
        if x.shape[-1] != w.shape[0]:
            raise ValueError(
                f"{name}: input has last dimension {x.shape[-1]}, params expect {w.shape[0]}. "
                f"Feed inputs of shape (..., {w.shape[0]}) or re-init the params on this input."
            )
        return parts.project(params, x, dtype or x.dtype)

    def apply(params, state, carry, x, key=None, train=False):
        del key, train
        _check_step(name, carry, x, features, carry_names)
        xp = project(params, x)
        return parts.merge(carry, xp, parts.recur(params, carry, xp.dtype)), state

    layer = named(Layer(init, apply), name)
    return Cell(layer.init, layer.apply, make_carry, parts._replace(project=project))


def _summed(project: Callable, recur: Callable, merge_of_sum: Callable) -> StepParts:
    """The parts of a cell whose merge reads ``xp + zr`` only (see :class:`StepParts`)."""

    def merge(carry, xp, zr):
        return merge_of_sum(carry, xp + zr.astype(xp.dtype))

    return StepParts(project, recur, merge, merge_of_sum)


def _dense_project(params: dict, x: jax.Array, cdtype: Any, bias: str) -> jax.Array:
    """``x @ wi + b`` in the compute dtype: ``(..., in) -> (..., G)``."""
    y = flat_matmul(x.astype(cdtype), params["wi"].astype(cdtype))
    return y + _bias(params[bias].astype(cdtype), y.ndim)


@renamed(hidden="features")
def simple_rnn_cell(
    features: int,
    *,
    activation: Callable[[jax.Array], jax.Array] = jax.nn.tanh,
    wi_init: Initializer = default_wi_init,
    wh_init: Initializer = default_wh_init,
    b_init: Initializer = initializers.zeros,
    dtype: Any = None,
    param_dtype: Any = None,
) -> Cell:
    r"""The Elman cell (Keras ``SimpleRNN``, PyTorch ``nn.RNN``): one step of

    .. math:: h' = \phi(x W_i + h W_h + b), \qquad y = h'

    Params: ``{"wi": (in, H), "wh": (H, H), "b": (H,)}`` with ``H = features``. Carry:
    ``h``, shape ``(batch, H)``.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> cell = fl.simple_rnn_cell(4)
        >>> h = fl.initial_carry(cell, (2,))
        >>> params, state = cell.init(jax.random.key(0), h, jnp.zeros((2, 3)))
        >>> (h, y), state = cell.apply(params, state, h, jnp.ones((2, 3)))
        >>> h.shape, y.shape
        ((2, 4), (2, 4))

    Args:
        features: the size ``H`` of the output and of the hidden state.
        activation: :math:`\phi`, e.g. ``jax.nn.tanh`` (default) or ``jax.nn.relu``.
        wi_init: initializer of ``wi`` (default glorot uniform).
        wh_init: initializer of ``wh`` (default orthogonal).
        b_init: initializer of ``b`` (default zeros).
        dtype: the compute dtype; ``None`` computes in the input's dtype. The carry keeps
            its own dtype.
        param_dtype: the storage dtype of the params (default float32, or float64 under
            ``jax_enable_x64``).

    Returns:
        A :class:`Cell`: ``apply(params, state, h, x_t) -> ((h', y_t), state)`` with ``x_t``
        ``(batch, in)``, ``h``, ``h'`` and ``y_t`` ``(batch, H)``.
    """
    act_name = getattr(activation, "__name__", "activation")
    name = f"simple_rnn_cell({features}" + ("" if act_name == "tanh" else f", {act_name}") + ")"
    _check_features(name, features)

    def make_params(key, n_in, pdtype):
        ki, kh, kb = jax.random.split(key, 3)
        return {
            "wi": wi_init(ki, (n_in, features), pdtype),
            "wh": wh_init(kh, (features, features), pdtype),
            "b": b_init(kb, (features,), pdtype),
        }

    def project(params, x, cdtype):
        return _dense_project(params, x, cdtype, "b")

    def recur(params, h, cdtype):
        return jnp.matmul(h.astype(cdtype), params["wh"].astype(cdtype))

    def merge_of_sum(h, z):
        h_new = activation(z)
        return h_new.astype(h.dtype), h_new

    parts = _summed(project, recur, merge_of_sum)
    return _builtin_cell(name, features, ("h",), make_params, parts, dtype, param_dtype)


@renamed(hidden="features")
def lstm_cell(
    features: int,
    *,
    forget_bias: float = 1.0,
    wi_init: Initializer = default_wi_init,
    wh_init: Initializer = default_wh_init,
    b_init: Initializer = initializers.zeros,
    dtype: Any = None,
    param_dtype: Any = None,
) -> Cell:
    r"""The long short-term memory cell (Hochreiter and Schmidhuber), cuDNN's gate layout.

    .. math::
        z &= x W_i + h W_h + b, \qquad [z_i, z_f, z_g, z_o] = z \\
        i &= \sigma(z_i), \quad f = \sigma(z_f), \quad g = \tanh(z_g),
            \quad o = \sigma(z_o) \\
        c' &= f \odot c + i \odot g, \qquad h' = o \odot \tanh(c'), \qquad y = h'

    Params: ``{"wi": (in, 4H), "wh": (H, 4H), "b": (4H,)}`` with ``H = features``, the four
    gates side by side in the order input, forget, cell, output (PyTorch's order; its two
    biases sum to ``b``, see :func:`fundl.interop.lstm_from_torch`). Carry: ``(h, c)``,
    each ``(batch, H)``.

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
        features: the size ``H`` of the output, ``h`` and ``c``.
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
        A :class:`Cell`: ``apply(params, state, (h, c), x_t) -> (((h', c'), y_t), state)``
        with ``x_t`` ``(batch, in)`` and the rest ``(batch, H)``.
    """
    name = f"lstm_cell({features})"
    _check_features(name, features)

    def make_params(key, n_in, pdtype):
        ki, kh, kb = jax.random.split(key, 3)
        b = b_init(kb, (4 * features,), pdtype)
        zeros = jnp.zeros((features,), pdtype)
        b = b + jnp.concatenate([zeros, jnp.full((features,), forget_bias, pdtype), zeros, zeros])
        return {
            "wi": _per_gate(wi_init, ki, n_in, features, 4, pdtype),
            "wh": _per_gate(wh_init, kh, features, features, 4, pdtype),
            "b": b,
        }

    def project(params, x, cdtype):
        return _dense_project(params, x, cdtype, "b")

    def recur(params, carry, cdtype):
        return jnp.matmul(carry[0].astype(cdtype), params["wh"].astype(cdtype))  # (..., 4H)

    def merge_of_sum(carry, z):
        h, c = carry
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c_new = jax.nn.sigmoid(f) * c.astype(z.dtype) + jax.nn.sigmoid(i) * jnp.tanh(g)
        h_new = jax.nn.sigmoid(o) * jnp.tanh(c_new)
        return (h_new.astype(h.dtype), c_new.astype(c.dtype)), h_new

    parts = _summed(project, recur, merge_of_sum)
    return _builtin_cell(name, features, ("h", "c"), make_params, parts, dtype, param_dtype)


@renamed(hidden="features")
def gru_cell(
    features: int,
    *,
    wi_init: Initializer = default_wi_init,
    wh_init: Initializer = default_wh_init,
    b_init: Initializer = initializers.zeros,
    dtype: Any = None,
    param_dtype: Any = None,
) -> Cell:
    r"""The gated recurrent unit (Cho et al.), cuDNN's and PyTorch's variant.

    .. math::
        [a_r, a_z, a_n] &= x W_i + b_i, \qquad [u_r, u_z, u_n] = h W_h + b_h \\
        r &= \sigma(a_r + u_r), \qquad z = \sigma(a_z + u_z) \\
        n &= \tanh(a_n + r \odot u_n), \qquad h' = (1 - z) \odot n + z \odot h, \qquad y = h'

    The reset gate multiplies the hidden matmul (``reset_after``, as cuDNN and Keras's
    default), which is why there are two biases.

    Params: ``{"wi": (in, 3H), "wh": (H, 3H), "bi": (3H,), "bh": (3H,)}`` with
    ``H = features``, gates in the order reset, update, new (exactly PyTorch's ``nn.GRU``,
    transposed). Carry: ``h``, ``(batch, H)``.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> cell = fl.gru_cell(4)
        >>> h = fl.initial_carry(cell, (2,))
        >>> params, state = cell.init(jax.random.key(0), h, jnp.zeros((2, 3)))
        >>> (h, y), state = cell.apply(params, state, h, jnp.ones((2, 3)))
        >>> h.shape
        (2, 4)

    Args:
        features: the size ``H`` of the output and of the hidden state.
        wi_init: initializer of each gate's ``(in, H)`` block of ``wi`` (default glorot
            uniform).
        wh_init: initializer of each gate's ``(H, H)`` block of ``wh`` (default orthogonal).
        b_init: initializer of ``bi`` and ``bh`` (default zeros).
        dtype: the compute dtype; ``None`` computes in the input's dtype. The carry keeps
            its own dtype.
        param_dtype: the storage dtype of the params.

    Returns:
        A :class:`Cell`: ``apply(params, state, h, x_t) -> ((h', y_t), state)`` with ``x_t``
        ``(batch, in)`` and ``h``, ``h'``, ``y_t`` ``(batch, H)``.
    """
    name = f"gru_cell({features})"
    _check_features(name, features)

    def make_params(key, n_in, pdtype):
        ki, kh, kbi, kbh = jax.random.split(key, 4)
        return {
            "wi": _per_gate(wi_init, ki, n_in, features, 3, pdtype),
            "wh": _per_gate(wh_init, kh, features, features, 3, pdtype),
            "bi": b_init(kbi, (3 * features,), pdtype),
            "bh": b_init(kbh, (3 * features,), pdtype),
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

    parts = StepParts(project, recur, merge)
    return _builtin_cell(name, features, ("h",), make_params, parts, dtype, param_dtype)


def make_cell(layer: Layer, initial_carry: Callable[[tuple[int, ...], Any], Carry]) -> Cell:
    """A custom :class:`Cell` from a layer with the cell signature and its zero carry.

    ``layer`` must follow the cell signature: ``init(key, carry, x_t)`` and ``apply(params,
    state, carry, x_t, key=None, train=False) -> ((new_carry, y_t), state)``, with
    ``new_carry`` of the same structure, shapes and dtypes as ``carry``. :func:`fundl.rnn`
    threads its state through the steps and folds a key, when given, with the step index.
    ``layer`` is left as it was; the cell keeps its name.

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
        A new :class:`Cell` with ``layer``'s ``init`` and ``apply``.
    """
    if not isinstance(layer, Layer) or not callable(initial_carry):
        raise TypeError(
            "make_cell(layer, initial_carry): expected a fundl Layer and a function "
            f"(batch_shape, dtype) -> carry, got {type(layer).__name__} and "
            f"{type(initial_carry).__name__}."
        )
    return Cell(layer.init, layer.apply, initial_carry)


def as_cell(cell: Any, who: str) -> Cell:
    """``cell`` if it is a :class:`Cell`, else a ``TypeError`` naming ``who`` and the fix."""
    if not isinstance(cell, Cell):
        what = layer_name(cell) if isinstance(cell, Layer) else type(cell).__name__
        raise TypeError(
            f"{who}: {what} is not a recurrent cell. Use fl.lstm_cell(H), fl.gru_cell(H), "
            f"fl.simple_rnn_cell(H), or wrap a custom cell with fl.make_cell(layer, "
            f"initial_carry)."
        )
    return cell


def initial_carry(cell: Cell, batch_shape: tuple[int, ...], dtype: Any = None) -> Carry:
    """The zero carry of ``cell`` for a batch of shape ``batch_shape``.

    Example:
        >>> import fundl as fl
        >>> h, c = fl.initial_carry(fl.lstm_cell(8), (32,))
        >>> h.shape, c.shape
        ((32, 8), (32, 8))

    Args:
        cell: a :class:`Cell` (``fl.lstm_cell(H)``, ...).
        batch_shape: the leading shape, usually ``(batch,)``.
        dtype: the carry's dtype (default float32, or float64 under ``jax_enable_x64``).

    Returns:
        The carry: leaves of shape ``(*batch_shape, features)``, zeros.
    """
    cell = as_cell(cell, "initial_carry")
    return cell.initial_carry(tuple(batch_shape), dtype or default_float_dtype())
