"""Export a model's inference function to ONNX, through jax2onnx (the ``fundl[onnx]`` extra).

:func:`to_onnx` traces ``model.apply(params, state, *inputs)`` (inference mode) with a
symbolic batch dimension, so the graph only holds JAX primitives and the weights as
constants, then hands that program to `jax2onnx <https://github.com/enpasos/jax2onnx>`_.
Tracing first keeps jax2onnx's tracing-time patches of ``jax.numpy`` (its ``jnp.shape``
returns an array) away from fundl's Python shape checks.

Two primitives are rewritten on the way, with the same numbers:

- ``reduce_window_max`` on an input of rank 4 or more (``fl.max_pool`` on images): jax2onnx
  emits an ONNX ``MaxPool`` with one kernel axis per input axis, which onnxruntime refuses
  (it pools 1 to 3 spatial axes). fundl writes it as the maximum of the window's strided
  slices of the padded input, an exact rewrite.
- ``pjit`` (a nested ``jax.jit``) is inlined.

(Only the top level of the program and nested jits are rewritten, not the body of a
``lax.scan``: a max pooling inside a scanned block is left to jax2onnx as it is.)

A primitive jax2onnx has no converter for raises a ``ValueError`` naming the layer that
uses it (its path in the model, as fundl's other errors), never a different graph.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator, Sequence
from os import PathLike
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from fundl.core import Layer, Params, State, layer_info, layer_name

__all__ = ["to_onnx"]

WHO = "to_onnx"
BATCH = "batch"
INSTALL = 'ONNX export needs jax2onnx and onnx: pip install "fundl[onnx]".'


def _converter() -> Any:
    """``jax2onnx`` and ``onnx``, imported on first use; an ImportError says how to install."""
    try:
        import jax2onnx
        import onnx
    except ImportError as err:
        raise ImportError(f"{WHO}: {INSTALL} ({err})") from err
    return jax2onnx, onnx


def _specs(example_inputs: Any) -> tuple[jax.ShapeDtypeStruct, ...]:
    """One ``ShapeDtypeStruct`` per input, axis 0 the shared symbolic dimension ``batch``."""
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    scope = jax.export.SymbolicScope()
    specs = []
    for i, x in enumerate(inputs):
        shape = tuple(jnp.shape(x))
        if not shape:
            raise ValueError(
                f"{WHO}: example input {i} is a scalar; every input needs a batch axis "
                f"(axis 0), e.g. x[None]."
            )
        dims = ", ".join([BATCH, *map(str, shape[1:])])
        specs.append(jax.ShapeDtypeStruct(jax.export.symbolic_shape(dims, scope=scope), x.dtype))
    return tuple(specs)


def _inference(model: Layer, params: Params, state: State) -> Callable[..., Any]:
    def run(*inputs):
        return model.apply(params, state, *inputs)[0]

    return run


# --- the program jax2onnx sees --------------------------------------------------------------


def _pad_with_lowest(x: jax.Array, padding: Sequence[tuple[int, int]]) -> jax.Array:
    """``x`` padded by ``-inf`` (padding never wins a max), as concatenations.

    jax2onnx's ``pad`` needs every dimension known, and the batch is symbolic.
    """
    for axis, (lo, hi) in enumerate(padding):
        if lo or hi:
            parts = []
            for size in (lo, x, hi):
                if isinstance(size, int) and size:
                    shape = (*x.shape[:axis], size, *x.shape[axis + 1 :])
                    parts.append(lax.full(shape, -jnp.inf, x.dtype))
                elif not isinstance(size, int):
                    parts.append(size)
            x = lax.concatenate(parts, axis)
    return x


def _window_max(x, window_dimensions, window_strides, padding, base_dilation, window_dilation):
    """``reduce_window_max`` as the maximum of strided slices of the padded input (exact)."""
    if any(d != 1 for d in (*base_dilation, *window_dilation)):
        raise ValueError(
            f"{WHO}: max pooling with dilation has no ONNX form onnxruntime runs on inputs "
            f"of rank {x.ndim}."
        )
    xp = _pad_with_lowest(x, padding)
    sizes = [
        (n - w) // s + 1
        for n, w, s in zip(xp.shape, window_dimensions, window_strides, strict=True)
    ]
    out = None
    for start in itertools.product(*(range(w) for w in window_dimensions)):
        limit = [b + (n - 1) * s + 1 for b, n, s in zip(start, sizes, window_strides, strict=True)]
        part = lax.slice(xp, start, limit, window_strides)
        out = part if out is None else lax.max(out, part)
    return out


def _evaluate(jaxpr: Any, consts: Sequence[Any], *args: Any) -> list[Any]:
    """Evaluates ``jaxpr`` as ``jax.core.eval_jaxpr`` does, with the rewrites above."""
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jax.extend.core.Literal) else env[v]

    for v, x in itertools.chain(
        zip(jaxpr.constvars, consts, strict=True), zip(jaxpr.invars, args, strict=True)
    ):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name == "reduce_window_max" and invals[0].ndim > 3:
            outs = [_window_max(*invals, **eqn.params)]
        elif name in ("pjit", "jit"):
            inner = eqn.params["jaxpr"]
            outs = _evaluate(inner.jaxpr, inner.consts, *invals)
        else:
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            outs = outs if eqn.primitive.multiple_results else [outs]
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


# --- which layer uses a primitive the converter lacks ----------------------------------------


def _primitives(jaxpr: Any) -> Iterator[Any]:
    """Every primitive ``jaxpr`` binds, nested jaxprs (scan bodies, branches) included."""
    for eqn in jaxpr.eqns:
        yield eqn.primitive
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(item, "jaxpr", item)
                if hasattr(inner, "eqns"):
                    yield from _primitives(inner)


class _Found(ValueError):
    """Raised by a patched primitive while re-tracing; fundl's combinators add the path."""


def _paths(layer: Layer, prefix: str = "") -> Iterator[tuple[str, Layer]]:
    """``(path, layer)`` for ``layer`` and every layer under it, paths joined as errors do."""
    yield prefix, layer
    for segment, child in layer_info(layer).children:
        if not prefix:
            path = segment
        else:
            path = prefix + (segment if segment.startswith("[") else "." + segment)
        yield from _paths(child, path)


def _locate(run: Callable[..., Any], model: Layer, specs: Sequence[Any], primitive: Any) -> str:
    """The path and name of the layer that binds ``primitive``, e.g. ``serial[1] (min_pool)``."""

    def refuse(*args, **kwargs):
        raise _Found("")

    primitive.bind = refuse  # an instance attribute, removed below
    try:
        with jax.disable_jit():  # re-trace nested jits too
            jax.make_jaxpr(run)(*specs)
    except _Found as err:
        path = err.args[0].strip()
    else:  # pragma: no cover - a primitive bound outside Python (e.g. by a cached trace)
        return f"{layer_name(model)} (a layer inside it)"
    finally:
        del primitive.bind
    names = dict(_paths(model))
    return f"{path} ({layer_name(names[path])})" if path and path in names else layer_name(model)


def _check_supported(run, model: Layer, specs, jaxpr: Any, registry: Any) -> None:
    missing = {}
    for prim in _primitives(jaxpr):
        if prim.name not in registry and prim.name not in ("pjit", "jit"):
            missing.setdefault(prim.name, prim)
    if missing:
        name, prim = sorted(missing.items())[0]
        where = _locate(run, model, specs, prim)
        raise ValueError(
            f"{WHO}: the layer at {where} uses the JAX primitive '{name}', which jax2onnx "
            f"cannot convert to ONNX (all unsupported primitives: {sorted(missing)}). "
            f"Replace that layer with one built from supported operations, or export with "
            f"fl.export (jax.export) instead."
        )


def _blame(run, model: Layer, specs, jaxpr: Any, message: str) -> str:
    """The layer binding the primitive a converter's error ``message`` names (longest match)."""
    named = {p.name: p for p in _primitives(jaxpr) if re.search(rf"\b{p.name}\b", message)}
    if not named:
        return layer_name(model)
    return _locate(run, model, specs, named[max(named, key=len)])


def _registry(jax2onnx: Any) -> Any:
    """jax2onnx's primitive converters by name (its internal registry; ``None`` if moved)."""
    try:
        from jax2onnx.plugins import plugin_system
    except ImportError:  # pragma: no cover - a later jax2onnx layout
        return None
    plugin_system.import_all_plugins()
    return plugin_system.PLUGIN_REGISTRY


def to_onnx(
    model: Layer,
    params: Params,
    state: State,
    example_inputs: Any,
    path: str | PathLike[str] | None = None,
    *,
    opset: int = 23,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> Any:
    """Exports ``model``'s inference function (``train=False``) with its weights to ONNX.

    The ONNX graph computes ``model.apply(params, state, *inputs)[0]`` with ``params`` and
    ``state`` stored as initializers; axis 0 of every input (and of the outputs that
    follow it) is the symbolic dimension ``batch``, so one file serves every batch size.
    Needs the optional packages ``jax2onnx`` and ``onnx`` (``pip install "fundl[onnx]"``);
    run the file with onnxruntime or any ONNX runtime.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, fundl as fl
        >>> import onnxruntime
        >>> model = fl.serial(fl.dense(8), jax.nn.relu, fl.dense(2))
        >>> x = jnp.ones((4, 3))
        >>> params, state = model.init(jax.random.key(0), x)
        >>> proto = fl.to_onnx(model, params, state, x)
        >>> session = onnxruntime.InferenceSession(proto.SerializeToString())
        >>> dims = proto.graph.input[0].type.tensor_type.shape.dim
        >>> tuple(d.dim_param or d.dim_value for d in dims)
        ('batch', 3)
        >>> y = session.run(None, {"in_0": np.ones((5, 3), np.float32)})[0]
        >>> bool(np.allclose(y, model.apply(params, state, jnp.ones((5, 3)))[0], atol=1e-6))
        True

    Args:
        model: the layer to export.
        params: its params.
        state: its state (e.g. batch norm's running statistics, used as in inference).
        example_inputs: one array (or ``jax.ShapeDtypeStruct``) or a tuple of them, each
            ``(batch, ...)``; their shapes after axis 0 and their dtypes are fixed in the
            graph, the batch size is not.
        path: where to write the ``.onnx`` file; ``None`` writes nothing.
        opset: the ONNX opset to target.
        input_names: names of the graph's inputs (default jax2onnx's ``in_0``, ``in_1``...).
        output_names: names of the graph's outputs (default ``out_0``...).

    Returns:
        The ``onnx.ModelProto``.

    Raises:
        ImportError: jax2onnx or onnx is not installed.
        ValueError: a layer uses a JAX primitive jax2onnx cannot convert; the message names
            the layer's path in the model and the primitive.
    """
    specs = _specs(example_inputs)
    jax2onnx, onnx = _converter()
    run = _inference(model, params, state)
    closed = jax.make_jaxpr(run)(*specs)
    registry = _registry(jax2onnx)
    if registry is not None:
        _check_supported(run, model, specs, closed.jaxpr, registry)

    def program(*inputs):
        return _evaluate(closed.jaxpr, closed.consts, *inputs)

    try:
        proto = jax2onnx.to_onnx(
            program,
            list(specs),
            model_name=layer_name(model).split("(")[0],
            opset=opset,
            input_names=input_names,
            output_names=output_names,
        )
    except Exception as err:  # the converter's own refusals, whatever their type
        where = _blame(run, model, specs, closed.jaxpr, str(err))
        raise ValueError(
            f"{WHO}: jax2onnx could not convert the layer at {where}: {type(err).__name__}: {err}"
        ) from err
    if path is not None:
        onnx.save(proto, str(path))
    return proto
