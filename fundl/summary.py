"""``summary``: a Keras-style table of a model's layers, output shapes, params and FLOPs."""

from __future__ import annotations

import math
import sys
from typing import IO, Any

import jax

from fundl.core import Layer, layer_name

__all__ = ["summary"]


def _count(tree: Any) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def _shapes(tree: Any) -> str:
    leaves = jax.tree_util.tree_leaves(tree)
    text = ", ".join(str(tuple(leaf.shape)) for leaf in leaves)
    return text if len(leaves) == 1 else f"[{text}]"


def _flops(layer: Layer, params: Any, state: Any, inputs: tuple[Any, ...]) -> float | None:
    """XLA's own estimate of the FLOPs of one inference call (None if unavailable)."""
    try:
        cost = jax.jit(layer.apply).lower(params, state, *inputs).cost_analysis()
    except Exception:
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else float(cost["flops"])


def _rows(layer: Layer, params, state, inputs, label: str, depth: int) -> tuple[list, Any]:
    """The rows for ``layer`` (expanding ``serial``) and its output shapes."""
    if layer_name(layer) != "serial":
        out, _ = jax.eval_shape(layer.apply, params, state, *inputs)
        flops = _flops(layer, params, state, inputs)
        return [(depth, label or layer_name(layer), _shapes(out), _count(params), flops)], out
    rows = [(depth, label or "serial", "", _count(params), None)]
    for i, (segment, child) in enumerate(layer.children):
        sub = segment.removeprefix("serial")  # "[2]" or "[head]"
        # keyword children are looked up by name: eval_shape returns dicts key-sorted
        index = sub[1:-1] if isinstance(params, dict) else i
        p, s = params[index], state[index]
        child_rows, out = _rows(child, p, s, inputs, f"{sub} {layer_name(child)}", depth + 1)
        rows += child_rows
        inputs = (out,)
    return rows, inputs[0]


def _fmt_flops(flops: float | None) -> str:
    if flops is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.2f}{unit}"
    return f"{flops:.0f}"


def summary(
    model: Layer, *inputs: Any, key: jax.Array | None = None, file: IO[str] | None = None
) -> str:
    """Prints and returns a table of the model's layers, as Keras's ``model.summary()``.

    One row per layer (``serial`` models are expanded, nested ones indented): its position,
    output shape, parameter count and FLOPs of one inference call as estimated by XLA's own
    cost analysis, then the totals. Nothing is allocated: params are built with
    ``jax.eval_shape``.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> model = fl.serial(fl.flatten(), fl.dense(10))
        >>> table = fl.summary(model, jnp.zeros((1, 8, 8)))
        Layer            Output shape  Params  FLOPs
        --------------------------------------------
        serial                            650      -
          [0] flatten    (1, 64)            0      -
          [1] dense(10)  (1, 10)          650  1.29k
        --------------------------------------------
        Total params: 650 (2.5 KiB)
        Total FLOPs per call: 1.29k

    Args:
        model: the layer to describe.
        *inputs: example inputs, arrays or ``jax.ShapeDtypeStruct`` (a batch of 1 is enough).
        key: the init key (default ``jax.random.key(0)``); only shapes matter.
        file: where to print (default ``sys.stdout``).

    Returns:
        The table as a string.
    """
    key = jax.random.key(0) if key is None else key
    specs = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), inputs)
    params, state = jax.eval_shape(model.init, key, *specs)
    rows, _ = _rows(model, params, state, specs, "", 0)
    total_flops = _flops(model, params, state, specs)
    header = ("Layer", "Output shape", "Params", "FLOPs")
    table = [("  " * d + name, shape, f"{n:,}", _fmt_flops(f)) for d, name, shape, n, f in rows]
    total = _count(params)
    nbytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(params))
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(4)]
    line = "-" * (sum(widths) + 6)

    def fmt(r):
        cells = zip(r, widths, strict=True)
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(cells))

    text = "\n".join(
        [
            fmt(header),
            line,
            *map(fmt, table),
            line,
            f"Total params: {total:,} ({nbytes / 1024:.1f} KiB)",
            f"Total FLOPs per call: {_fmt_flops(total_flops)}",
        ]
    )
    print(text, file=file or sys.stdout)
    return text
