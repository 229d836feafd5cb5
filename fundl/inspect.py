"""Looking inside a model: its layers by path, their outputs (``capture``) and sub-models.

A path names a layer's place in a model, as errors print it: ``"serial[1]"``,
``"serial[body].serial[0]"``, ``"serial[1].repeat"``. :func:`layer_paths` lists them.

:func:`capture` rebuilds the model with each chosen layer wrapped in a *tap*: a layer that
returns its child's output as usual and puts a copy of it, beside the child's new state, in
the state it returns. The combinators above it thread that state back up as they thread any
state (``repeat`` stacks it per copy, as it stacks state), and ``capture`` takes the copies
out of the final state. Nothing global, nothing mutated: the values travel through the same
return values as batch norm's statistics, so ``jit``, ``grad``, ``vmap`` and ``scan`` see
ordinary pytrees; and a model that is not wrapped is not touched at all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax

from fundl.core import Layer, join_path, layer_info, layer_name, named, side_inputs

__all__ = ["layer_paths", "capture", "submodel"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Tapped:
    """A tapped layer's state: its own ``state`` and the ``value`` it output at ``path``."""

    state: Any
    value: Any
    path: str = dataclasses.field(metadata={"static": True})


def _is_tapped(node: Any) -> bool:
    return isinstance(node, _Tapped)


def layer_paths(model: Layer) -> dict[str, Layer]:
    """Every layer inside ``model`` by its path, outermost first, in the model's order.

    The paths are those errors print and :func:`capture` takes. A layer whose parts cannot
    be rebuilt (an ``fl.rnn``'s cell) is listed, its parts are not.

    Example:
        >>> import jax, fundl as fl
        >>> model = fl.serial(body=fl.serial(fl.dense(8), jax.nn.relu), head=fl.dense(2))
        >>> for path, layer in fl.layer_paths(model).items():
        ...     print(path, layer.name)
        serial[body] serial
        serial[body].serial[0] dense(8)
        serial[body].serial[1] relu
        serial[head] dense(2)

    Args:
        model: any layer.

    Returns:
        A dict from path to layer; empty for a layer without children.
    """
    info = layer_info(model)
    if "rebuild" not in info.meta:
        return {}
    found: dict[str, Layer] = {}
    for segment, child in info.children:
        found[segment] = child
        found.update({join_path(segment, p): c for p, c in layer_paths(child).items()})
    return found


def _check_paths(model: Layer, paths: Sequence[str]) -> None:
    if isinstance(paths, str) or not all(isinstance(p, str) for p in paths):
        raise TypeError(
            f"capture({layer_name(model)}, paths): paths must be a list of path strings, got "
            f"{paths!r}. For one layer pass a list of one, e.g. [{paths!r}]."
        )
    known = layer_paths(model)
    for path in paths:
        if path not in known:
            listing = "\n  ".join(f"{p}  {c.name}" for p, c in known.items()) or "(none)"
            raise ValueError(
                f"{layer_name(model)}: no layer at path {path!r}. The layers it has, by path "
                f"(fl.layer_paths(model)):\n  {listing}"
            )


def _inside(path: str, prefix: str) -> bool:
    """Whether ``path`` names a layer inside the one at ``prefix`` (``""``: the model)."""
    rest = path[len(prefix) :]
    return not prefix or (path.startswith(prefix) and rest[:1] in (".", "["))


def _under(path: str, prefix: str) -> bool:
    """Whether ``path`` is ``prefix`` or a layer inside it."""
    return path == prefix or _inside(path, prefix)


def _rewrite(layer: Layer, prefix: str, wrap: Callable[[str, Layer], Layer], targets) -> Layer:
    """``layer`` rebuilt with ``wrap(path, child)`` in place of each child at a target path."""
    info = layer_info(layer)
    if not any(_inside(t, prefix) for t in targets):
        return layer
    children = []
    for segment, child in info.children:
        path = join_path(prefix, segment)
        child = _rewrite(child, path, wrap, targets)
        children.append(wrap(path, child) if path in targets else child)
    rebuilt = info.meta["rebuild"](tuple(children))
    new = layer_info(rebuilt)
    return named(rebuilt, info.name, new.children, **new.meta)  # keep the name for errors


def _tap(path: str, child: Layer) -> Layer:
    """``child``, whose state also carries a copy of its output (a :class:`_Tapped`)."""

    def apply(params, state, *inputs, **options):  # key, train and side inputs
        state = state.state if _is_tapped(state) else state  # shared: its second call
        out, state = child.apply(params, state, *inputs, **options)
        return out, _Tapped(state, out, path)

    info = layer_info(child)
    meta = {k: v for k, v in info.meta.items() if k not in ("rebuild", "sequential")}
    return named(Layer(child.init, apply), info.name, info.children, **meta)


def _untap(state: Any) -> tuple[Any, dict[str, Any]]:
    """``state`` with each :class:`_Tapped` replaced by its own state, and the values by path."""
    captured: dict[str, Any] = {}

    def strip(node):
        if not _is_tapped(node):
            return node
        inner, below = _untap(node.state)
        captured.update({node.path: node.value, **below})
        return inner

    return jax.tree_util.tree_map(strip, state, is_leaf=_is_tapped), captured


def capture(model: Layer, paths: Sequence[str]) -> Layer:
    """``model``, also returning the outputs of the layers at ``paths``.

    The result takes ``model``'s params and state unchanged (its ``init`` is ``model``'s)
    and its ``apply`` returns ``((outputs, captured), state)``, where ``captured`` maps each
    path to that layer's output in this call. It works under ``jax.jit``, ``jax.grad`` and
    ``jax.vmap``; the model itself is not changed, so a train step that does not use
    ``capture`` compiles exactly as before. Inside ``fl.repeat``, the repeated layer's output
    (path ``"...repeat"`` and below) is stacked over the copies, ``(times, ...)``; inside
    ``fl.shared``, it is the last application's. See :func:`layer_paths` for the paths, and
    ``docs/design.md`` for how the values travel.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> model = fl.serial(fl.dense(8), jax.nn.relu, fl.dense(2))
        >>> params, state = model.init(jax.random.key(0), jnp.zeros((1, 3)))
        >>> (y, captured), state = fl.capture(model, ["serial[1]"]).apply(
        ...     params, state, jnp.ones((4, 3)))
        >>> y.shape, captured["serial[1]"].shape
        ((4, 2), (4, 8))

    Args:
        model: the model.
        paths: the paths of the layers to capture, e.g. ``["serial[1]"]``.

    Returns:
        A :class:`~fundl.Layer` mapping ``model``'s inputs to ``(outputs, captured)``.

    Raises:
        ValueError: a path that is not in the model; the message lists those that are.
    """
    _check_paths(model, paths)
    tapped = _rewrite(model, "", _tap, frozenset(paths))

    def apply(params, state, *inputs, **options):  # key, train and side inputs
        out, state = tapped.apply(params, state, *inputs, **options)
        state, captured = _untap(state)
        return (out, captured), state

    name = f"capture({layer_name(model)})"
    return named(Layer(model.init, apply), name, side_inputs=side_inputs(model))


def _pass_through(path: str, child: Layer) -> Layer:
    """A layer with ``child``'s params and state that returns its input: a layer cut off."""

    def apply(params, state, *inputs, **options):
        del params, options
        return (inputs[0] if len(inputs) == 1 else inputs), state

    return named(Layer(child.init, apply), f"cut({layer_name(child)})",
                 side_inputs=side_inputs(child))  # fmt: skip


def _after(model: Layer, path: str) -> list[str]:
    """The paths of the layers ``serial`` runs after ``path``, from the model down."""
    info, prefix, cut = layer_info(model), "", []
    while info.meta.get("sequential"):
        segments = [join_path(prefix, s) for s, _ in info.children]
        here = next(i for i, s in enumerate(segments) if _under(path, s))
        cut += segments[here + 1 :]
        if segments[here] == path:
            break
        prefix, info = segments[here], layer_info(info.children[here][1])
    return cut


def submodel(model: Layer, path: str) -> Layer:
    """The layers of ``model`` up to the one at ``path``, as a layer sharing the params.

    Its ``init`` and ``apply`` take ``model``'s whole params and state trees, and ``apply``
    returns the output of the layer at ``path``: the value :func:`capture` captures there.
    Layers that ``serial`` would run after it (at every level, from the model down) are not
    run; their params are ignored and their state returned unchanged. Inside other
    combinators (a ``residual`` branch, a ``repeat``) the enclosing layer runs whole.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> model = fl.serial(body=fl.serial(fl.dense(8), jax.nn.relu), head=fl.dense(2))
        >>> params, state = model.init(jax.random.key(0), jnp.zeros((1, 3)))
        >>> features = fl.submodel(model, "serial[body]")
        >>> features.apply(params, state, jnp.ones((4, 3)))[0].shape
        (4, 8)

    Args:
        model: the model.
        path: the path of the last layer to run (see :func:`layer_paths`).

    Returns:
        A :class:`~fundl.Layer` with ``model``'s ``init``.

    Raises:
        ValueError: ``path`` is not in the model; the message lists those that are.
    """
    _check_paths(model, [path])
    cut = _rewrite(model, "", _pass_through, frozenset(_after(model, path)))
    captured = capture(cut, [path])

    def apply(params, state, *inputs, **options):  # key, train and side inputs
        (_, value), state = captured.apply(params, state, *inputs, **options)
        return value[path], state

    name = f"submodel({layer_name(model)}, {path!r})"
    return named(Layer(model.init, apply), name, side_inputs=side_inputs(model))
