"""Combinators: build models out of layers (serial, parallel, fan-out/fan-in, residual).

Each combinator passes the side inputs its ``apply`` gets by keyword (``lengths=``,
``mask=``) to the children that declare them (:func:`fundl.core.route_side_inputs`), and
records in its :class:`~fundl.core.LayerInfo` how to rebuild it over new children (for
:func:`fundl.capture`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from fundl.core import Layer, call_at, layer_name, named, renamed, route_side_inputs, side_inputs

__all__ = [
    "as_layer",
    "function",
    "serial",
    "parallel",
    "fan_out",
    "fan_in_sum",
    "fan_in_concat",
    "branch",
    "residual",
    "shared",
    "repeat",
    "identity",
]

LayerLike = Layer | Callable[..., Any]


def function(fn: Callable[..., Any], name: str | None = None) -> Layer:
    """Wraps a plain function of arrays as a stateless, parameter-free layer.

    Any ``array -> array`` function (``jax.nn.relu``, ``jnp.tanh``, a ``lambda``) becomes a
    layer with params ``()`` and state ``()``; :func:`serial` does this for you when you pass
    the function itself.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> square = fl.function(lambda x: x**2, name="square")
        >>> square.apply((), (), jnp.arange(3.0))[0]
        Array([0., 1., 4.], dtype=float32)

    Args:
        fn: called as ``fn(*inputs)``; must return arrays (or a pytree of arrays).
        name: the name shown in errors and summaries (default: ``fn.__name__``).

    Returns:
        A :class:`~fundl.Layer`.
    """
    if isinstance(fn, Layer) or not callable(fn):
        raise TypeError(
            f"function() takes a plain callable such as jax.nn.relu, got {type(fn).__name__}."
        )
    label = name or getattr(fn, "__name__", type(fn).__name__)

    def init(key, *inputs):
        del key, inputs
        return (), ()

    def apply(params, state, *inputs, key=None, train=False):
        del params, key, train
        out = fn(*inputs)
        if isinstance(out, Layer) or callable(out):
            raise TypeError(
                f"{label}: returned a {type(out).__name__}, not arrays. A layer constructor "
                f"was passed uncalled; call it with its arguments, e.g. fl.{label}(64)."
            )
        return out, state

    return named(Layer(init, apply), label)


def as_layer(layer: LayerLike) -> Layer:
    """Returns ``layer`` if it is a :class:`~fundl.Layer`, else wraps it with :func:`function`.

    Args:
        layer: a layer, or a plain function of arrays.

    Raises:
        TypeError: if ``layer`` is neither a layer nor callable.
    """
    if isinstance(layer, Layer):
        return layer
    if getattr(layer, "__annotations__", {}).get("return") in ("Layer", Layer):
        name = getattr(layer, "__name__", "layer")
        raise TypeError(
            f"got the layer constructor {name} itself, not a layer. Call it with its "
            f"arguments, e.g. fl.{name}(...) instead of fl.{name}."
        )
    if callable(layer):
        return function(layer)
    raise TypeError(
        f"expected a fundl Layer or a function of arrays, got {type(layer).__name__} "
        f"({layer!r}). Build layers with their constructors, e.g. fl.dense(64)."
    )


def _children(layers: Sequence[LayerLike], named_layers: dict[str, LayerLike], who: str):
    if layers and named_layers:
        raise TypeError(
            f"{who}: pass layers either positionally or by keyword, not both "
            f"(got {len(layers)} positional and {sorted(named_layers)})."
        )
    if not layers and not named_layers:
        raise ValueError(
            f"{who}() needs at least one layer, got none. Pass layers, e.g. "
            f"fl.{who}(fl.dense(64), jax.nn.relu)."
        )
    names = tuple(named_layers) if named_layers else None
    given = tuple(named_layers.values()) if named_layers else layers
    children = []
    for segment, layer in zip(_segments(who, names, len(given)), given, strict=True):
        children.append(call_at(segment, as_layer, layer))
    return names, tuple(children)


def _segments(who: str, names: tuple[str, ...] | None, n: int) -> list[str]:
    return [f"{who}[{name}]" for name in (names if names is not None else range(n))]


def _pack(names: tuple[str, ...] | None, values: list[Any]) -> Any:
    return dict(zip(names, values, strict=True)) if names is not None else tuple(values)


def _unpack(names: tuple[str, ...] | None, tree: Any, n: int, what: str, who: str) -> list[Any]:
    if names is not None:
        if not isinstance(tree, dict) or set(tree) != set(names):
            got = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
            raise ValueError(f"{who}: {what} should be a dict with keys {list(names)}, got {got}.")
        return [tree[name] for name in names]
    if not isinstance(tree, tuple | list) or len(tree) != n:
        got = f"length {len(tree)}" if isinstance(tree, tuple | list) else type(tree).__name__
        raise ValueError(f"{who}: {what} should be a tuple of {n} entries, got {got}.")
    return list(tree)


def _combinator(layer: Layer, name: str, children, rebuild: Callable, **meta: Any) -> Layer:
    """``named`` for a combinator: it takes the side inputs its children take."""
    taken = sorted({n for _, child in children for n in side_inputs(child)})
    return named(layer, name, tuple(children), side_inputs=tuple(taken), rebuild=rebuild, **meta)


def _rebuild(names: tuple[str, ...] | None, combine: Callable[..., Layer]) -> Callable:
    """``children -> combine(*children)``, by keyword when the layers were named."""
    if names is None:
        return lambda children: combine(*children)
    return lambda children: combine(**dict(zip(names, children, strict=True)))


def _split(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    return [None] * n if key is None else list(jax.random.split(key, n))


def _shape_of(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), tree)


def serial(*layers: LayerLike, **named_layers: LayerLike) -> Layer:
    """Chains layers: the output of each is the input of the next.

    Plain functions (``jax.nn.relu``) are wrapped with :func:`function`. The first layer
    receives all of ``apply``'s inputs; each later layer receives the previous output.
    Params and state are a tuple with one entry per layer, or a dict when the layers are
    passed by keyword (``serial(body=..., head=...)``), which makes surgery and transfer
    learning read well: ``params["head"]``. ``init`` and ``apply`` split their key into one
    key per layer, so two dropout layers never share a mask.

    Side inputs, keyword arguments of ``apply`` such as ``lengths=`` or ``mask=``, go
    unchanged to every layer that declares them (:func:`fundl.core.side_inputs`), and to no
    other; one that no layer takes is a ``TypeError``. Every combinator here does the same,
    so ``serial(rnn_a, rnn_b).apply(params, state, x, lengths=lengths)`` masks both layers.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> model = fl.serial(fl.flatten(), fl.dense(16), jax.nn.relu, fl.dense(10))
        >>> params, state = model.init(jax.random.key(0), jnp.zeros((1, 8, 8)))
        >>> logits, state = model.apply(params, state, jnp.ones((4, 8, 8)))
        >>> logits.shape
        (4, 10)

    Args:
        *layers: layers or functions, applied in order.
        **named_layers: the same, by name (use one form or the other).

    Returns:
        A :class:`~fundl.Layer`.
    """
    names, children = _children(layers, named_layers, "serial")
    segments = _segments("serial", names, len(children))

    def init(key, *inputs):
        params, states = [], []
        for segment, child, k in zip(segments, children, _split(key, len(children)), strict=True):
            p, s = call_at(segment, child.init, k, *inputs)
            out, _ = call_at(segment, jax.eval_shape, partial(child.apply, key=k), p, s, *inputs)
            inputs = (out,)
            params.append(p)
            states.append(s)
        return _pack(names, params), _pack(names, states)

    pairs = tuple(zip(segments, children, strict=True))

    def apply(params, state, *inputs, key=None, train=False, **side):
        n = len(children)
        params = _unpack(names, params, n, "params", "serial")
        state = _unpack(names, state, n, "state", "serial")
        sides = route_side_inputs("serial", pairs, side)
        new_states = []
        for (segment, child), p, s, k, sd in zip(pairs, params, state, _split(key, n), sides,
                                                  strict=True):  # fmt: skip
            out, s = call_at(segment, child.apply, p, s, *inputs, key=k, train=train, **sd)
            inputs = (out,)
            new_states.append(s)
        return inputs[0], _pack(names, new_states)

    return _combinator(Layer(init, apply), "serial", pairs, _rebuild(names, serial),
                       sequential=True)  # fmt: skip


def parallel(*layers: LayerLike, **named_layers: LayerLike) -> Layer:
    """Applies layer ``i`` to input ``i`` and returns the tuple of outputs (stax's parallel).

    Takes one input per layer, either as separate arguments or as one tuple (the output of
    :func:`fan_out` or of an earlier ``parallel``), and returns a tuple of outputs in the
    same order. Params and state are a tuple (or dict, for keyword layers) as in
    :func:`serial`.

    Args:
        *layers: layers or functions, one per input.
        **named_layers: the same, by name.

    Returns:
        A :class:`~fundl.Layer`.
    """
    names, children = _children(layers, named_layers, "parallel")
    segments = _segments("parallel", names, len(children))
    n = len(children)

    def split_inputs(inputs):
        if len(inputs) == 1 and isinstance(inputs[0], tuple | list) and len(inputs[0]) == n:
            inputs = tuple(inputs[0])
        if len(inputs) != n:
            raise ValueError(
                f"parallel: expected {n} inputs (one per layer), got {len(inputs)}. "
                f"Feed it a tuple of {n} arrays, e.g. with fl.fan_out({n}) before it."
            )
        return inputs

    def init(key, *inputs):
        inputs = split_inputs(inputs)
        pairs = [
            call_at(seg, child.init, k, x)
            for seg, child, k, x in zip(segments, children, _split(key, n), inputs, strict=True)
        ]
        return _pack(names, [p for p, _ in pairs]), _pack(names, [s for _, s in pairs])

    pairs = tuple(zip(segments, children, strict=True))

    def apply(params, state, *inputs, key=None, train=False, **side):
        inputs = split_inputs(inputs)
        params = _unpack(names, params, n, "params", "parallel")
        state = _unpack(names, state, n, "state", "parallel")
        sides = route_side_inputs("parallel", pairs, side)
        outs, new_states = [], []
        for (seg, child), p, s, k, x, sd in zip(
            pairs, params, state, _split(key, n), inputs, sides, strict=False
        ):
            out, s = call_at(seg, child.apply, p, s, x, key=k, train=train, **sd)
            outs.append(out)
            new_states.append(s)
        return tuple(outs), _pack(names, new_states)

    return _combinator(Layer(init, apply), "parallel", pairs, _rebuild(names, parallel))


@renamed(n="times")
def fan_out(times: int) -> Layer:
    """Copies its input ``times`` times: ``x -> (x, x, ..., x)``.

    Example:
        >>> import jax.numpy as jnp, fundl as fl
        >>> fl.fan_out(2).apply((), (), jnp.ones(3))[0]
        (Array([1., 1., 1.], dtype=float32), Array([1., 1., 1.], dtype=float32))

    Args:
        times: the number of copies, at least 1.
    """
    if not isinstance(times, int) or isinstance(times, bool) or times < 1:
        raise ValueError(f"fan_out(times): times must be a positive int, got {times!r}.")
    return function(lambda x: (x,) * times, name=f"fan_out({times})")


def fan_in_sum() -> Layer:
    """Sums a tuple of arrays of the same shape: ``(a, b, ...) -> a + b + ...``."""

    def fan_in_sum(xs):
        shapes = {jnp.shape(x) for x in xs}
        if len(shapes) != 1:
            raise ValueError(
                f"fan_in_sum: inputs must have one shape, got {[jnp.shape(x) for x in xs]}."
            )
        return sum(xs[1:], start=xs[0])

    return function(fan_in_sum, name="fan_in_sum")


def fan_in_concat(axis: int = -1) -> Layer:
    """Concatenates a tuple of arrays along ``axis``: ``(a, b, ...) -> concat([a, b, ...])``.

    Args:
        axis: the axis to join along (default ``-1``, the feature axis); the other axes of
            the inputs must agree.
    """
    return function(lambda xs: jnp.concatenate(xs, axis=axis), name=f"fan_in_concat({axis})")


def branch(*layers: LayerLike, **named_layers: LayerLike) -> Layer:
    """Feeds one input to every layer and returns the tuple of outputs (fan-out).

    ``branch(a, b)`` is ``serial(fan_out(2), parallel(a, b))`` with flatter params: a tuple
    (or dict) with one entry per branch. Follow it with :func:`fan_in_sum` or
    :func:`fan_in_concat` to merge.

    Args:
        *layers: layers or functions, each applied to the same input.
        **named_layers: the same, by name.

    Returns:
        A :class:`~fundl.Layer` whose output is a tuple.
    """
    names, children = _children(layers, named_layers, "branch")
    inner = parallel(**dict(zip(names, children, strict=True))) if names else parallel(*children)
    n = len(children)

    def init(key, *inputs):
        return inner.init(key, *(inputs * n))

    pairs = tuple(zip(_segments("branch", names, n), children, strict=True))

    def apply(params, state, *inputs, key=None, train=False, **side):
        route_side_inputs("branch", pairs, side)  # a name no branch takes fails as "branch"
        return inner.apply(params, state, *(inputs * n), key=key, train=train, **side)

    return _combinator(Layer(init, apply), "branch", pairs, _rebuild(names, branch))


def residual(layer: LayerLike) -> Layer:
    """A skip connection: ``x -> x + layer(x)``.

    The wrapped layer's output must have the input's shape. Params and state are those of
    the wrapped layer.

    Args:
        layer: the layer (or function) on the residual branch.
    """
    child = as_layer(layer)
    label = f"residual({layer_name(child)})"

    def apply(params, state, x, key=None, train=False, **side):
        (side,) = route_side_inputs(label, (("residual", child),), side)
        y, state = call_at("residual", child.apply, params, state, x, key=key, train=train,
                           **side)  # fmt: skip
        if jnp.shape(y) != jnp.shape(x):
            raise ValueError(
                f"{label}: the branch maps shape {jnp.shape(x)} to {jnp.shape(y)}; a residual "
                f"needs equal shapes. Make the branch's last layer output {jnp.shape(x)[-1]} "
                f"features."
            )
        return x + y, state

    def init(key, x):
        return call_at("residual", child.init, key, x)

    return _combinator(Layer(init, apply), label, (("residual", child),), lambda c: residual(*c))


def shared(layer: LayerLike, times: int) -> Layer:
    """Applies one layer ``times`` times in a row with the same params (weight sharing).

    ``shared(dense(64), 3)`` is ``x -> d(d(d(x)))`` with a single set of ``dense`` params, as
    in weight-tied stacks (ALBERT) or unrolled recurrences. The layer must map its output
    shape to itself after the first application. Each application gets its own key.

    Args:
        layer: the layer (or function) to repeat.
        times: how many applications, at least 1.
    """
    child = as_layer(layer)
    if not isinstance(times, int) or times < 1:
        raise ValueError(f"shared(layer, times): times must be a positive int, got {times!r}.")
    label = f"shared({layer_name(child)}, {times})"

    def init(key, *inputs):
        return call_at("shared", child.init, key, *inputs)

    def apply(params, state, *inputs, key=None, train=False, **side):
        (side,) = route_side_inputs(label, (("shared", child),), side)
        for k in _split(key, times):
            out, state = call_at("shared", child.apply, params, state, *inputs, key=k,
                                 train=train, **side)  # fmt: skip
            inputs = (out,)
        return inputs[0], state

    return _combinator(Layer(init, apply), label, (("shared", child),),
                       lambda c: shared(c[0], times))  # fmt: skip


def identity() -> Layer:
    """The identity layer: returns its input unchanged."""
    return function(lambda x: x, name="identity")


@renamed(n="times")
def repeat(layer: LayerLike, times: int, *, unroll: int = 1, remat: bool = False) -> Layer:
    """``times`` copies of a layer, each with its own params, applied one after another by a scan.

    The copies' params (and state) are stacked on a new leading axis of size ``times`` and the
    stack runs under ``jax.lax.scan``, so XLA compiles the layer once: a 24-block transformer
    compiles about as fast as a 1-block one (unlike ``serial(block, block, ...)``). The output
    of each copy is the input of the next, so the layer must map its first input to the same
    shape and dtype; further inputs (e.g. an attention mask), and side inputs by keyword
    (``mask=``, see :func:`serial`), are passed unchanged to every copy. ``init`` and
    ``apply`` split their key into one key per copy.

    Block ``i``'s params are ``jax.tree.map(lambda p: p[i], params)``; to replace them,
    ``jax.tree.map(lambda p, q: p.at[i].set(q), params, new_block_params)``.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> stack = fl.repeat(fl.serial(fl.dense(8), jnp.tanh), 3)
        >>> params, state = stack.init(jax.random.key(0), jnp.zeros((2, 8)))
        >>> jax.tree.map(jnp.shape, params)  # three (8, 8) weights, stacked
        ({'b': (3, 8), 'w': (3, 8, 8)}, ())
        >>> y, state = stack.apply(params, state, jnp.ones((2, 8)))
        >>> y.shape
        (2, 8)

    Args:
        layer: the layer (or function) to copy.
        times: the number of copies, at least 1.
        unroll: passed to ``jax.lax.scan``: copies per loop iteration (more can run faster
            and compiles slower). ``unroll=times`` removes the loop (params stay stacked),
            which lets XLA fuse across blocks; ``benchmarks/RESULTS.md`` has measurements.
        remat: recompute each copy's activations in the backward pass (``jax.checkpoint``
            on the scan's body): the gradient then keeps only each copy's input, not its
            intermediates, for about one more forward pass of compute. The usual memory
            lever of a deep stack. To save some intermediates (a policy), repeat a
            :func:`fundl.remat` layer instead: ``repeat(fl.remat(block, policy), times)``.

    Returns:
        A :class:`~fundl.Layer` whose params and state are the layer's, with a leading axis
        of size ``times`` on every leaf.
    """
    child = as_layer(layer)
    if not isinstance(times, int) or isinstance(times, bool) or times < 1:
        raise ValueError(f"repeat(layer, times): times must be a positive int, got {times!r}.")
    label = f"repeat({layer_name(child)}, {times})"
    if not isinstance(remat, bool):
        raise TypeError(
            f"{label}: remat must be True or False, got {type(remat).__name__}. For a "
            f"checkpoint policy, repeat a remat layer: fl.repeat(fl.remat(layer, policy), "
            f"{times})."
        )

    def check_carry(x, y):
        xs, ys = _shape_of(x), _shape_of(y)
        if jax.tree_util.tree_structure(xs) != jax.tree_util.tree_structure(ys) or any(
            (a.shape, a.dtype) != (b.shape, b.dtype)
            for a, b in zip(
                jax.tree_util.tree_leaves(xs), jax.tree_util.tree_leaves(ys), strict=True
            )
        ):
            raise ValueError(
                f"{label}: the layer maps {_describe(xs)} to {_describe(ys)}; repeat feeds each "
                f"copy's output to the next, so they must match. Make the layer keep its "
                f"input's shape and dtype."
            )

    def init(key, x, *rest):
        keys = jax.random.split(key, times)
        params, state = call_at("repeat", jax.vmap(lambda k: child.init(k, x, *rest)), keys)
        first = jax.tree_util.tree_map(lambda a: a[0], (params, state))
        y, _ = call_at("repeat", jax.eval_shape,
                     partial(child.apply, key=keys[0]), *first, x, *rest)  # fmt: skip
        check_carry(x, y)
        return params, state

    def apply(params, state, x, *rest, key=None, train=False, **side):
        for leaf in jax.tree_util.tree_leaves((params, state)):
            if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != times:
                raise ValueError(
                    f"{label}: params and state need a leading axis of size {times} (one entry "
                    f"per copy), found a leaf of shape {jnp.shape(leaf)}. Build them with "
                    f"this layer's init."
                )
        keys = None if key is None else jax.random.split(key, times)
        (side,) = route_side_inputs(label, (("repeat", child),), side)

        def body(h, xs):
            p, s, k = xs
            y, s = call_at("repeat", child.apply, p, s, h, *rest, key=k, train=train, **side)
            check_carry(h, y)
            return y, s

        if remat:  # prevent_cse is not needed inside a scan, which keeps the passes apart
            body = jax.checkpoint(body, prevent_cse=False)
        return jax.lax.scan(body, x, (params, state, keys), length=times, unroll=unroll)

    return _combinator(Layer(init, apply), label, (("repeat", child),),
                       lambda c: repeat(c[0], times, unroll=unroll, remat=remat))  # fmt: skip


def _describe(specs: Any) -> str:
    leaves = jax.tree_util.tree_leaves(specs)
    if len(leaves) == 1:
        return f"shape {tuple(leaves[0].shape)} {leaves[0].dtype}"
    return str([(tuple(a.shape), str(a.dtype)) for a in leaves])
