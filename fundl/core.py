"""The layer contract: a ``Layer`` is a pair of pure functions, ``init`` and ``apply``.

Everything else in fundl (dense, conv, recurrent and attention layers, the combinators that
compose them, the training loop and the testing kit) is written against this one contract.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol, TypeVar

import jax
import jax.numpy as jnp

__all__ = [
    "Layer",
    "InitFn",
    "ApplyFn",
    "Params",
    "State",
    "LayerInfo",
    "layer_info",
    "layer_name",
    "named",
    "default_float_dtype",
    "check_floating",
    "with_path",
    "call_at",
    "join_path",
    "renamed",
    "side_inputs",
    "route_side_inputs",
]

Params = Any
"""A pytree of arrays: the trainable weights of a layer (``()`` when it has none)."""

State = Any
"""A pytree of arrays: the non-trained state of a layer (``()`` when it has none)."""


class InitFn(Protocol):
    """Creates a layer's params and state from example inputs."""

    def __call__(self, key: jax.Array, *inputs: Any) -> tuple[Params, State]:
        """Returns ``(params, state)`` for inputs shaped like ``inputs``.

        Args:
            key: a PRNG key (``jax.random.key``) for random initializers.
            *inputs: example inputs, arrays or ``jax.ShapeDtypeStruct``; only their shapes and
                dtypes are read, so ``jax.eval_shape(layer.init, key, spec)`` allocates
                nothing.

        Returns:
            ``(params, state)``: two pytrees of arrays; either may be empty (``()``).
        """


class ApplyFn(Protocol):
    """Runs a layer: a pure function of its params, state, inputs, key and mode."""

    def __call__(
        self,
        params: Params,
        state: State,
        *inputs: Any,
        key: jax.Array | None = None,
        train: bool = False,
        **side_inputs: Any,
    ) -> tuple[Any, State]:
        """Returns ``(outputs, new_state)``.

        Args:
            params: the pytree ``init`` returned (or a trained copy of it).
            state: the state pytree ``init`` returned, or the one a previous call returned.
            *inputs: the layer's inputs (arrays or pytrees of arrays).
            key: a PRNG key for stochastic layers (dropout); may be ``None`` when no layer
                draws random numbers. A stochastic layer in training mode without a key
                raises a ``ValueError``.
            train: ``True`` in training mode (dropout active, batch statistics updated).
            **side_inputs: per-call inputs by keyword, such as ``lengths=`` or ``mask=``,
                only those the layer declares (:func:`side_inputs`); combinators pass each
                child the ones it declares (see ``docs/design.md``).

        Returns:
            ``(outputs, new_state)``. Stateless layers return the state they were given.
        """


class Layer(NamedTuple):
    """A neural-network layer: two pure functions, like optax's ``GradientTransformation``.

    ``init(key, *inputs) -> (params, state)`` builds the parameters and the state from
    example inputs (arrays or ``jax.ShapeDtypeStruct``); ``apply(params, state, *inputs,
    key=None, train=False) -> (outputs, state)`` runs the layer. Both are pure, so both can
    be wrapped in ``jax.jit``, ``jax.grad``, ``jax.vmap`` and ``jax.eval_shape``; params
    and state are plain pytrees that optax, ``jax.tree_util`` and checkpoint libraries use
    as they are. A ``Layer`` unpacks like a tuple: ``init, apply = fl.dense(10)``.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> layer = fl.dense(3)
        >>> params, state = layer.init(jax.random.key(0), jnp.zeros((2, 4)))
        >>> y, state = layer.apply(params, state, jnp.ones((2, 4)))
        >>> y.shape
        (2, 3)
        >>> fl.serial(body=fl.dense(8), head=fl.dense(3))
        Layer(serial(body=dense(8), head=dense(3)))

    Attributes:
        init: an :class:`InitFn`.
        apply: an :class:`ApplyFn`.
    """

    init: InitFn
    apply: ApplyFn

    @property
    def name(self) -> str:
        """A short description of the layer, e.g. ``"dense(64)"``, used in errors."""
        return layer_name(self)

    @property
    def children(self) -> tuple[tuple[str, Layer], ...]:
        """``(path_segment, layer)`` pairs of the layers a combinator holds (else ``()``)."""
        return layer_info(self).children

    def __repr__(self) -> str:
        return f"Layer({_describe(self)})"


def _describe(layer: Layer) -> str:
    """``dense(8)``, or for a combinator its children: ``serial(body=dense(8), head=...)``."""
    name = layer_name(layer)
    if "(" in name or not layer.children:
        return name
    parts = []
    for segment, child in layer.children:
        key = segment[segment.rfind("[") + 1 : -1] if segment.endswith("]") else ""
        prefix = "" if key.isdigit() or not key else f"{key}="
        parts.append(prefix + _describe(child))
    return f"{name}({', '.join(parts)})"


class LayerInfo(NamedTuple):
    """What fundl knows about a layer beyond its two functions: the one place for metadata.

    It is read by :func:`layer_info` and attached by :func:`named`, which returns a new
    layer whose ``apply`` carries it; nothing else in fundl stores facts about a layer.

    Attributes:
        name: a short description, e.g. ``"dense(64)"``, shown in errors and summaries.
        children: for combinators, ``(path_segment, child)`` pairs, e.g. ``(("[0]", a),)``.
        meta: facts other parts of fundl read about this kind of layer, by key (e.g.
            ``fl.rnn`` records its direction under ``"rnn"`` for ``fl.bidirectional``).
            Keys fundl reads everywhere: ``"side_inputs"``, the names of the keyword inputs
            ``apply`` takes per call (see :func:`side_inputs`); ``"rebuild"``, for
            combinators, a function from new children (in ``children``'s order) to the same
            combinator over them, which :func:`fundl.capture` uses; ``"sequential"``,
            ``True`` for ``serial``, whose output is its last child's.
    """

    name: str
    children: tuple[tuple[str, Layer], ...] = ()
    meta: Mapping[str, Any] = MappingProxyType({})


def named(
    layer: Layer,
    name: str,
    children: tuple[tuple[str, Layer], ...] = (),
    **meta: Any,
) -> Layer:
    """A copy of ``layer`` described by a :class:`LayerInfo` (name, children, meta).

    The name appears in error messages and in :func:`fundl.summary`; nothing here changes
    the computation, and ``layer`` itself is left as it was.

    Example:
        >>> import fundl as fl
        >>> from fundl.core import named
        >>> named(fl.dense(3), "head")
        Layer(head)

    Args:
        layer: the layer to describe.
        name: a short description, e.g. ``"dense(64)"``.
        children: for combinators, ``(path_segment, child)`` pairs, e.g. ``(("[0]", a),)``.
        **meta: facts for other parts of fundl to read through :func:`layer_info`.

    Returns:
        A new :class:`Layer` with the same ``init`` and an ``apply`` that calls ``layer``'s.
    """
    apply = layer.apply
    inner = getattr(apply, "__fundl_inner__", apply)

    def described_apply(params, state, *inputs, **options):  # key, train and side inputs
        return inner(params, state, *inputs, **options)

    described_apply.__fundl_inner__ = inner  # type: ignore[attr-defined]
    described_apply.__fundl_info__ = LayerInfo(  # type: ignore[attr-defined]
        name, tuple(children), MappingProxyType(dict(meta))
    )
    described_apply.__name__ = described_apply.__qualname__ = name
    return Layer(layer.init, described_apply)


def layer_info(layer: Layer) -> LayerInfo:
    """The :class:`LayerInfo` of ``layer``; an undescribed layer gets its function's name."""
    info = getattr(layer.apply, "__fundl_info__", None)
    if info is not None:
        return info
    apply = layer.apply
    return LayerInfo(getattr(apply, "__name__", type(apply).__name__))


def layer_name(layer: Layer) -> str:
    """The display name of ``layer`` (see :func:`named`), or its apply function's name."""
    return layer_info(layer).name


def default_float_dtype() -> jnp.dtype:
    """``float64`` when ``jax_enable_x64`` is on, else ``float32`` (the default param dtype)."""
    return jnp.dtype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)


def check_floating(name: str, x: Any, hint: str = "") -> None:
    """Raises a ``TypeError`` naming layer ``name`` if ``x`` is not a floating-point array.

    Args:
        name: the layer's display name, e.g. ``"dense(64)"``.
        x: an array or ``jax.ShapeDtypeStruct``.
        hint: a sentence on how to fix it, appended to the message.
    """
    dtype = jnp.dtype(x.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        fix = hint or "Cast it first, e.g. x.astype(jnp.float32)."
        raise TypeError(f"{name}: input dtype is {dtype}, expected a floating-point dtype. {fix}")


def with_path(err: Exception, segment: str) -> Exception:
    """Prefixes ``err``'s message with the path ``segment`` of the layer that raised it.

    Combinators call this when a child raises ``ValueError`` or ``TypeError`` so that the
    message names the layer's position in the model, e.g. ``serial[2] dense(64): ...``.
    The exception keeps its type and traceback. ``err`` is edited in place, as
    ``BaseException.add_note`` does: it is an exception in flight, owned by the ``except``
    clause that re-raises it, and rebuilding it would lose its type's constructor arguments.

    Args:
        err: the exception a child layer raised.
        segment: the child's position, e.g. ``"serial[2]"`` or ``"serial[head]"``.

    Returns:
        ``err`` with its message rewritten, ready to re-raise.
    """
    if not err.args or not isinstance(err.args[0], str):
        return err
    path = getattr(err, "_fundl_path", [])
    message = getattr(err, "_fundl_message", err.args[0])
    err._fundl_path = [segment, *path]  # type: ignore[attr-defined]
    err._fundl_message = message  # type: ignore[attr-defined]
    err.args = (f"{join_path(*err._fundl_path)} {message}", *err.args[1:])
    return err


def join_path(*segments: str) -> str:
    """The path of a layer from its segments: ``join_path("serial[1]", "residual")``.

    Segments are joined with ``"."``, except one that starts with ``"["``, which is an index
    of the one before: ``"serial[1].residual"``. Errors print these paths, and
    :func:`fundl.capture` takes them.
    """
    parts = [s for s in segments if s]  # "" is the model itself
    return "".join(s if i == 0 or s.startswith("[") else "." + s for i, s in enumerate(parts))


F = TypeVar("F", bound=Callable[..., Any])


def renamed(*, note_: str = "", **new_names: str) -> Callable[[F], F]:
    """Makes a function reject keywords that were renamed, with a ``TypeError`` naming the new one.

    The API is unreleased, so a renamed argument has no alias (``CHANGELOG.md`` lists the
    renames); this turns Python's "unexpected keyword argument" into a message with the fix.
    Only the old names listed are checked: any other unknown keyword fails as usual.

    Example:
        >>> from fundl.core import renamed
        >>> @renamed(n="times")
        ... def copies(x, times):
        ...     return [x] * times
        >>> copies(1, n=2)
        Traceback (most recent call last):
        ...
        TypeError: copies() got the keyword n=, renamed to times= in fundl 0.2.

    Args:
        note_: a sentence appended to the message, for a rename that also changed meaning.
        **new_names: ``old="new"``, one per renamed keyword; for a keyword that was removed,
            ``old="a sentence on what to do instead"``.

    Returns:
        A decorator; the function it returns has the wrapped function's name and signature.
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def checked(*args: Any, **kwargs: Any) -> Any:
            stale = sorted(kwargs.keys() & new_names.keys())
            if stale:
                old, new = stale[0], new_names[stale[0]]
                if new.isidentifier():
                    change = f"renamed to {new}= in fundl 0.2"
                else:
                    change = f"removed in fundl 0.2: {new}"
                extra = f" {note_}" if note_ else ""
                raise TypeError(f"{fn.__name__}() got the keyword {old}=, {change}.{extra}")
            return fn(*args, **kwargs)

        return checked  # type: ignore[return-value]

    return decorate


def side_inputs(layer: Layer) -> tuple[str, ...]:
    """The side inputs ``layer.apply`` takes by keyword, e.g. ``("lengths",)``; else ``()``.

    A side input is a per-call input other than the data that flows from layer to layer:
    ``fl.rnn``'s ``lengths``, ``fl.multi_head_attention``'s ``mask``. A layer declares them
    with ``named(layer, name, side_inputs=("mask",))``; a combinator declares those its
    children take and passes each child only the ones it declares (:func:`route_side_inputs`).

    Example:
        >>> import fundl as fl
        >>> from fundl.core import side_inputs
        >>> side_inputs(fl.serial(fl.dense(8), fl.encoder_block(8, 2)))
        ('mask',)
    """
    return tuple(layer_info(layer).meta.get("side_inputs", ()))


def route_side_inputs(
    name: str, children: tuple[tuple[str, Layer], ...], given: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """For each child, the side inputs in ``given`` that it takes (:func:`side_inputs`).

    How combinators pass side inputs on: a child gets only the names it declares, so layers
    that take none are called as before.

    Args:
        name: the combinator's display name, for the error.
        children: its ``(path_segment, child)`` pairs.
        given: the side inputs its ``apply`` got, by name.

    Returns:
        One dict per child, in order.

    Raises:
        TypeError: a name in ``given`` that no child takes; the message lists which
            children take which names.
    """
    taken = [side_inputs(child) for _, child in children]
    unknown = sorted(set(given) - {n for names in taken for n in names})
    if unknown:
        takers = "; ".join(
            f"{segment} {layer_name(child)} takes {', '.join(n + '=' for n in names)}"
            for (segment, child), names in zip(children, taken, strict=True)
            if names
        )
        where = (
            f"Its layers that take side inputs: {takers}."
            if takers
            else ("None of its layers takes side inputs.")
        )
        raise TypeError(f"{name}: no layer in it takes the side input {unknown[0]}=. {where}")
    return [{n: v for n, v in given.items() if n in names} for names in taken]


def call_at(segment: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``; a ``ValueError`` or ``TypeError`` it raises gets ``segment``.

    How combinators call their children: an error names the child's place in the model
    (see :func:`with_path`).

    Args:
        segment: the child's position, e.g. ``"serial[2]"``.
        fn: the function to call, e.g. ``child.apply``.
        *args: its positional arguments.
        **kwargs: its keyword arguments.
    """
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError) as err:
        raise with_path(err, segment) from None


def flat_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` for ``x`` of shape ``(..., in)`` and ``w`` ``(in, out)``, as one 2-D matmul.

    The leading axes are flattened into one (a free reshape) before the product and restored
    after. Same numbers as ``jnp.matmul``; on CPU, XLA runs the 2-D form of the weight's
    gradient, a contraction over every leading axis, faster than the batched form (see
    ``benchmarks/RESULTS.md``).
    """
    if x.ndim <= 2:
        return jnp.matmul(x, w)
    y = jnp.matmul(x.reshape(-1, x.shape[-1]), w)
    return y.reshape(*x.shape[:-1], w.shape[-1])
