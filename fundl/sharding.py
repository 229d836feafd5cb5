"""Sharding rules: where each param lies on a device mesh, by its path in the param tree.

A param's path is its keys from the root joined by ``/``: dict keys as they are, tuple
positions as numbers, e.g. ``blocks/attn/attn/query/w`` or ``0/w``. A rule is a pair
``(pattern, PartitionSpec)``: the pattern is a glob (:func:`fnmatch.fnmatchcase`, where
``*`` also matches ``/``) matched against the whole path; the first rule that matches a
param decides its spec. A spec names the param's *last* ``len(spec)`` axes, so
``P(None, "model")`` splits a dense layer's output axis whether its ``w`` is ``(in, out)`` or
stacked by :func:`fundl.repeat` as ``(times, in, out)``; leading axes are not split.

Nothing is replicated silently: a rule whose pattern matches no param is an error (a typo, or
a layer renamed since the rules were written), and so, with ``strict=True`` (the default), is
a param no rule covers. Replicate on purpose with ``P()``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "ShardingRules",
    "fsdp_rules",
    "init_sharded",
    "param_paths",
    "shard_like",
    "shard_params",
    "sharding_rules",
    "tensor_parallel_rules",
]

Rule = tuple[str, PartitionSpec]

_SHOWN = 12  # how many available paths an error lists


class ShardingRules(NamedTuple):
    """Rules from param paths to ``PartitionSpec``s: plain data, printable.

    Attributes:
        rules: ``((pattern, spec), ...)``, tried in order; the first match wins.
        strict: a param no rule covers is an error (``True``), or replicated (``False``).
    """

    rules: tuple[Rule, ...]
    strict: bool = True


def sharding_rules(rules: Sequence[Rule], *, strict: bool = True) -> ShardingRules:
    """Checks and bundles ``(pattern, PartitionSpec)`` rules for :func:`shard_params`.

    Example:
        >>> import fundl as fl
        >>> from jax.sharding import PartitionSpec as P
        >>> rules = fl.sharding_rules([("*/query/w", P(None, "model")), ("*", P())])
        >>> rules.rules[0]
        ('*/query/w', P(None, 'model'))

    Args:
        rules: ``(pattern, spec)`` pairs: a glob over param paths (see :mod:`fundl.sharding`)
            and a ``jax.sharding.PartitionSpec`` for the param's last ``len(spec)`` axes.
            The layouts :func:`tensor_parallel_rules` and :func:`fsdp_rules` return such
            pairs; concatenate tuples to combine them with your own.
        strict: with ``True``, a param that no rule covers is an error; with ``False``, it
            is replicated.

    Returns:
        A :class:`ShardingRules`.

    Raises:
        TypeError: a rule is not a ``(str, PartitionSpec)`` pair.
    """
    checked = []
    for i, rule in enumerate(rules):
        if (
            not isinstance(rule, tuple)
            or len(rule) != 2
            or not isinstance(rule[0], str)
            or not isinstance(rule[1], PartitionSpec)
        ):
            raise TypeError(
                f"sharding_rules: rule {i} must be a (pattern, PartitionSpec) pair such as "
                f'("*/query/w", P(None, "model")), got {rule!r}.'
            )
        checked.append((rule[0], rule[1]))
    return ShardingRules(tuple(checked), bool(strict))


def tensor_parallel_rules(
    axis: str = "model", *, embedding: str | None = "vocab"
) -> tuple[Rule, ...]:
    """Megatron-style tensor parallelism for fundl's transformer blocks, as rules.

    Each block's matmuls split so that one all-reduce per branch joins them (Shoeybi et al.
    2019): query, key, value and the MLP's ``up`` are column-parallel (their output axis and
    bias split over ``axis``, so each device holds whole heads); the attention's ``out`` and the
    MLP's ``down`` are row-parallel (their input axis split, their bias replicated); norms are
    replicated. ``embedding`` splits ``embedding`` tables (the ``table`` param) over the
    vocabulary (``"vocab"``) or the width (``"width"``); ``None`` adds no rule for them.

    Other params (a final norm, an output head) need rules of their own: add them, e.g.
    ``("head/*", P("model"))`` for a head split over the vocabulary, or ``("*", P())``.

    Example:
        >>> import fundl as fl
        >>> rules = fl.tensor_parallel_rules("model")
        >>> rules[0]
        ('*/query/*', P('model',))

    Args:
        axis: the mesh axis to split over.
        embedding: ``"vocab"``, ``"width"`` or ``None``.

    Returns:
        A tuple of ``(pattern, PartitionSpec)`` rules for :func:`sharding_rules`.

    Raises:
        ValueError: ``embedding`` is not one of those.
    """
    column, row, replicated = PartitionSpec(axis), PartitionSpec(axis, None), PartitionSpec()
    rules = [(f"*/{part}/*", column) for part in ("query", "key", "value", "up")]
    rules += [(f"*/{part}/w", row) for part in ("out", "down")]
    rules += [(f"*/{part}/*", replicated) for part in ("out", "down", "norm")]
    tables = {"vocab": PartitionSpec(axis, None), "width": PartitionSpec(axis), None: None}
    if embedding not in tables:
        raise ValueError(
            f'tensor_parallel_rules: embedding must be "vocab", "width" or None, got {embedding!r}.'
        )
    if embedding is not None:
        rules.append(("*table", tables[embedding]))
    return tuple(rules)


def fsdp_rules(params_or_shapes: Any, mesh: Mesh, axis: str = "data") -> tuple[Rule, ...]:
    """Fully-sharded data parallel as rules: each param split over ``axis`` on its largest axis.

    The axis split is the param's largest one that the size of ``axis`` divides (the first
    of equal ones); a param with none (a scalar, an odd-sized bias) gets an explicit
    all-``None`` spec (replicated). One rule per param, its exact path as the pattern:
    print them to see the layout.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> mesh = jax.make_mesh((1,), ("data",))
        >>> params = {"w": jnp.zeros((3, 8)), "b": jnp.zeros(8)}
        >>> fl.fsdp_rules(params, mesh)
        (('b', P('data',)), ('w', P(None, 'data')))

    Args:
        params_or_shapes: the params, or their shapes (``jax.eval_shape(model.init, ...)``).
        mesh: the device mesh.
        axis: the mesh axis to split params over (the one batches are split over).

    Returns:
        A tuple of ``(path, PartitionSpec)`` rules, one per param, for :func:`sharding_rules`.

    Raises:
        ValueError: ``axis`` is not an axis of ``mesh``.
    """
    size = _axis_size(mesh, axis, "fsdp_rules")
    rules = []
    for path, x in _flatten(params_or_shapes):
        shape = np.shape(x)
        fits = [(-n, i) for i, n in enumerate(shape) if n % size == 0 and n >= size]
        spec = [None] * len(shape)
        if fits:
            spec[min(fits)[1]] = axis
        rules.append((_escape(path), PartitionSpec(*spec)))
    return tuple(rules)


def param_paths(params_or_shapes: Any) -> list[str]:
    """The paths rules match, one per param in the tree's order.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> model = fl.serial(fl.dense(4), fl.dense(2))
        >>> params, _ = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3)))
        >>> fl.param_paths(params)
        ['0/b', '0/w', '1/b', '1/w']

    Args:
        params_or_shapes: a param tree (arrays or ``jax.ShapeDtypeStruct``s).

    Returns:
        The ``/``-joined paths.
    """
    return [path for path, _ in _flatten(params_or_shapes)]


def shard_params(params_or_shapes: Any, mesh: Mesh, rules: ShardingRules | Sequence[Rule]) -> Any:
    """The ``NamedSharding`` of each param on ``mesh``, by ``rules``.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> from jax.sharding import PartitionSpec as P
        >>> mesh = jax.make_mesh((1,), ("model",))
        >>> params = {"w": jnp.zeros((4, 8)), "scale": jnp.ones(4)}
        >>> rules = fl.sharding_rules([("w", P(None, "model")), ("scale", P())])
        >>> shardings = fl.shard_params(params, mesh, rules)
        >>> shardings["w"].spec
        P(None, 'model')

    Args:
        params_or_shapes: the params, or their shapes (``jax.eval_shape(model.init, ...)``).
        mesh: the device mesh.
        rules: a :class:`ShardingRules`, or a sequence of ``(pattern, spec)`` pairs (then
            strict).

    Returns:
        A tree shaped like the params with a ``jax.sharding.NamedSharding`` per param.

    Raises:
        ValueError: a rule matches no param; with strict rules, a param matches no rule; a
            spec names an axis ``mesh`` lacks, has more entries than its param has axes, or
            splits an axis its mesh axes do not divide. Each message lists the paths.
    """
    if not isinstance(rules, ShardingRules):
        rules = sharding_rules(rules)
    leaves = _flatten(params_or_shapes)
    paths = [path for path, _ in leaves]
    _check_every_rule_matches(rules, paths)
    specs = [_spec_of(path, np.shape(x), rules, mesh) for path, x in leaves]
    uncovered = [path for path, spec in zip(paths, specs, strict=True) if spec is None]
    if uncovered and rules.strict:
        raise ValueError(
            f"shard_params: no rule covers {len(uncovered)} param(s): {_listing(uncovered)}. "
            f'Add rules for them (("*", P()) replicates the rest), or pass strict=False to '
            f"sharding_rules to replicate them."
        )
    treedef = jax.tree_util.tree_structure(params_or_shapes)
    return jax.tree_util.tree_unflatten(
        treedef, [NamedSharding(mesh, spec or PartitionSpec()) for spec in specs]
    )


def shard_like(tree: Any, params: Any, param_shardings: Any) -> Any:
    """Shardings for ``tree`` (an optimizer state, a whole train state) that follow the params'.

    An optax state mirrors the param tree (adam's ``mu`` and ``nu`` hold one array per
    param), so each leaf of ``tree`` whose path ends with a param's path and has that param's
    shape gets that param's sharding (the longest such path wins); every other leaf (step
    counts, keys, factored statistics) is replicated on the params' mesh.

    Example:
        >>> import jax, jax.numpy as jnp, optax, fundl as fl
        >>> from jax.sharding import PartitionSpec as P
        >>> mesh = jax.make_mesh((1,), ("data",))
        >>> params = {"w": jnp.zeros((4, 8))}
        >>> shardings = fl.shard_params(params, mesh, [("w", P("data", None))])
        >>> opt = fl.shard_like(optax.adam(0.1).init(params), params, shardings)
        >>> opt[0].mu["w"].spec, opt[0].count.spec
        (P('data', None), P())

    Args:
        tree: a pytree of arrays or shapes.
        params: the param tree (arrays or shapes).
        param_shardings: the params' ``NamedSharding``s (from :func:`shard_params`).

    Returns:
        A tree shaped like ``tree`` with a ``NamedSharding`` per leaf.

    Raises:
        ValueError: ``param_shardings`` holds no ``NamedSharding`` (no mesh to replicate on).
    """
    shardings = jax.tree_util.tree_leaves(param_shardings)
    if not shardings:
        raise ValueError("shard_like: param_shardings holds no NamedSharding, so no mesh.")
    replicated = NamedSharding(shardings[0].mesh, PartitionSpec())
    by_path = {
        path: (np.shape(x), sharding)
        for (path, x), sharding in zip(_flatten(params), shardings, strict=True)
    }

    def leaf_sharding(path, x):
        segments = _path_str(path).split("/")
        for start in range(len(segments)):  # the longest param path that ends this one
            found = by_path.get("/".join(segments[start:]))
            if found is not None and found[0] == np.shape(x):
                return found[1]
        return replicated

    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def init_sharded(
    init: Any, key: jax.Array, *inputs: Any, mesh: Mesh, rules: ShardingRules | Sequence[Rule]
) -> Any:
    """Runs ``init(key, *inputs)`` under ``jit`` with each param born on its shard.

    The output shardings come from ``rules`` (the shapes from ``jax.eval_shape``), so XLA
    computes on each device only that device's part of each param: a model too big for one
    device initialises, and none holds the whole. Any other output (a layer's state) follows
    the params' shardings where its paths end with theirs (see :func:`shard_like`), else is
    replicated. The values are those of ``init(key, *inputs)``.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> from jax.sharding import PartitionSpec as P
        >>> mesh = jax.make_mesh((1,), ("model",))
        >>> layer = fl.dense(8)
        >>> params, state = fl.init_sharded(layer.init, jax.random.key(0), jnp.zeros((2, 4)),
        ...                                 mesh=mesh, rules=[("w", P(None, "model")),
        ...                                                   ("b", P("model"))])
        >>> params["w"].sharding.spec
        P(None, 'model')

    Args:
        init: ``init(key, *inputs) -> (params, state)``: a layer's ``init``; any function
            whose output's first element is the param tree.
        key: a PRNG key.
        *inputs: example inputs (arrays or ``jax.ShapeDtypeStruct``); only their shapes and
            dtypes are read.
        mesh: the device mesh.
        rules: the params' rules (see :func:`shard_params`).

    Returns:
        ``init``'s output, each array on its sharding.

    Raises:
        ValueError: from :func:`shard_params`.
    """
    shapes = jax.eval_shape(init, key, *inputs)
    param_shardings = shard_params(shapes[0], mesh, rules)
    return init_on_shards(init, key, inputs, shard_like(shapes, shapes[0], param_shardings))


def init_on_shards(init: Any, key: jax.Array, inputs: tuple, out_shardings: Any) -> Any:
    """``init(key, *inputs)`` jitted with ``out_shardings``: each device computes its shards."""
    key_data = np.asarray(jax.random.key_data(key))  # host data: every host may pass it
    return jit_init(init, inputs, out_shardings, jax.random.key_impl(key))(key_data)


def jit_init(init: Any, inputs: tuple, out_shardings: Any, impl: Any) -> Any:
    """``init`` as a jitted function of a key's data (``jax.random.key_data``), with
    ``out_shardings``.

    The inputs enter as shapes only, so every host runs the same program, compiled once for
    any key; ``.lower(key_data).compile().memory_analysis()`` shows what one device holds.
    """
    specs = jax.tree_util.tree_map(shape_of, inputs)

    def run(key_data):
        return init(jax.random.wrap_key_data(key_data, impl=impl), *specs)

    return jax.jit(run, out_shardings=out_shardings)


def _check_every_rule_matches(rules: ShardingRules, paths: list[str]) -> None:
    unmatched = [
        pattern
        for pattern, _ in rules.rules
        if not any(fnmatch.fnmatchcase(path, pattern) for path in paths)
    ]
    if unmatched:
        raise ValueError(
            f"shard_params: {len(unmatched)} rule(s) match no param: {unmatched}. The params' "
            f"paths are {_listing(paths)}. Fix the patterns (a layer renamed?) or drop the "
            f"rules."
        )


def _spec_of(path: str, shape: tuple, rules: ShardingRules, mesh: Mesh) -> PartitionSpec | None:
    """The first matching rule's spec, widened to the param's rank; ``None`` if none matches."""
    for pattern, spec in rules.rules:
        if fnmatch.fnmatchcase(path, pattern):
            return _fitted(path, shape, pattern, spec, mesh)
    return None


def _fitted(path: str, shape: tuple, pattern: str, spec: PartitionSpec, mesh: Mesh):
    """``spec`` as one entry per axis of ``shape`` (``None`` in front), checked on ``mesh``."""
    where = f"shard_params: rule ({pattern!r}, {spec}) on param {path!r} of shape {shape}"
    if len(spec) > len(shape):
        raise ValueError(
            f"{where}: the spec has {len(spec)} entries, the param {len(shape)} axes. Give at "
            f"most {len(shape)} entries (they name the last axes)."
        )
    full = (None,) * (len(shape) - len(spec)) + tuple(spec)
    for size, entry in zip(shape, full, strict=True):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        missing = [name for name in names if name not in mesh.axis_names]
        if missing:
            raise ValueError(
                f"{where}: the mesh has axes {mesh.axis_names}, not {missing}. Name mesh axes."
            )
        devices = int(np.prod([mesh.shape[name] for name in names]))
        if size % devices:
            raise ValueError(
                f"{where}: axis of size {size} does not split over {names} ({devices} "
                f"devices). Split another axis or replicate it with None."
            )
    return PartitionSpec(*full)


def _axis_size(mesh: Mesh, axis: str, what: str) -> int:
    if axis not in mesh.axis_names:
        raise ValueError(f"{what}: the mesh has axes {mesh.axis_names}, not {axis!r}.")
    return mesh.shape[axis]


def _flatten(tree: Any) -> list[tuple[str, Any]]:
    return [(_path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _path_str(path: tuple) -> str:
    """``('blocks', 'attn', 0, 'w')`` as ``"blocks/attn/0/w"``."""
    parts = []
    for entry in path:
        for attr in ("key", "idx", "name"):  # DictKey, SequenceKey/FlattenedIndexKey, GetAttrKey
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def _escape(path: str) -> str:
    """A glob that matches exactly ``path``."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in path)


def _listing(paths: list[str]) -> str:
    shown = ", ".join(paths[:_SHOWN])
    return shown + (f", ... ({len(paths) - _SHOWN} more)" if len(paths) > _SHOWN else "")


def shape_of(x: Any) -> Any:
    """``x`` as a ``jax.ShapeDtypeStruct`` (its shape and dtype, no data); a Python number
    gets the dtype JAX would give it."""
    dtype = x.dtype if hasattr(x, "dtype") else jax.dtypes.result_type(x)
    return jax.ShapeDtypeStruct(np.shape(x), dtype)
