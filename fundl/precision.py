r"""Precision policies: one call sets the dtypes of a whole model.

A :class:`Policy` says in which dtype params are stored (``param_dtype``), in which the
model computes (``dtype``) and in which it returns its outputs (``output_dtype``), as
``dtype`` and ``param_dtype`` do for one layer. :func:`with_policy` applies it to a model
and returns a new :class:`~fundl.Layer`:

- ``init`` stores every floating param in ``param_dtype``;
- ``apply`` casts the floating params (except those ``keep`` names) and the floating inputs
  to ``dtype``, runs the model and casts its floating outputs to ``output_dtype``.

The usual mixed-precision policy keeps float32 master weights and computes in bfloat16:
the casts sit inside ``apply``, so ``jax.grad`` gives float32 gradients for the float32
params and the optimizer updates float32 weights. What must stay in float32 does so
whatever the compute dtype: the norms compute their statistics in float32
(:func:`fundl.layer_norm` and the others), attention's softmax runs in float32, and with
``output_dtype=float32`` the loss gets float32 logits.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fundl.core import Layer, call_at, default_float_dtype, layer_name, named

__all__ = ["Policy", "with_policy", "policy_paths"]


class Policy(NamedTuple):
    """The dtypes of a model: storage, compute and output, with per-path exceptions.

    Example:
        >>> import jax.numpy as jnp, fundl as fl
        >>> policy = fl.Policy(jnp.float32, jnp.bfloat16, jnp.float32, keep=("*norm*",))
        >>> policy.cast_to_compute({"w": jnp.ones(2), "ids": jnp.arange(2)})["w"].dtype
        dtype(bfloat16)

    Attributes:
        param_dtype: the storage dtype of the params, what the optimizer updates (``None``:
            float32, or float64 when ``jax_enable_x64`` is on).
        dtype: the compute dtype: the params and the floating inputs are cast to it at
            ``apply`` (``None``: the same default float dtype).
        output_dtype: the dtype of the floating outputs (``None``: the same default), the
            dtype the loss sees.
        keep: patterns of the param paths (see :func:`policy_paths`) that are not cast to
            ``dtype`` and stay in ``param_dtype``, e.g. ``("*norm*",)`` for every norm's
            ``scale`` and ``bias``. ``*`` matches any characters, ``?`` one character; every
            other character, brackets included, matches itself. Every pattern must match at
            least one path.
    """

    param_dtype: Any = None
    dtype: Any = None
    output_dtype: Any = None
    keep: tuple[str, ...] = ()

    def cast_to_param(self, tree: Any) -> Any:
        """``tree`` with its floating leaves in ``param_dtype`` (others unchanged)."""
        return _cast(tree, _resolve(self.param_dtype))

    def cast_to_compute(self, tree: Any) -> Any:
        """``tree`` with its floating leaves in ``dtype`` (others unchanged)."""
        return _cast(tree, _resolve(self.dtype))

    def cast_to_output(self, tree: Any) -> Any:
        """``tree`` with its floating leaves in ``output_dtype`` (others unchanged)."""
        return _cast(tree, _resolve(self.output_dtype))


def _resolve(dtype: Any) -> jnp.dtype:
    return default_float_dtype() if dtype is None else jnp.dtype(dtype)


def _cast(tree: Any, dtype: jnp.dtype) -> Any:
    def cast(x):
        floating = hasattr(x, "dtype") and jnp.issubdtype(jnp.dtype(x.dtype), jnp.floating)
        return x.astype(dtype) if floating else x

    return jax.tree_util.tree_map(cast, tree)


def _check_policy(policy: Any) -> None:
    if not isinstance(policy, Policy):
        raise TypeError(
            f"with_policy(model, policy): policy must be a fl.Policy, got "
            f"{type(policy).__name__}. Build one, e.g. fl.Policy(dtype=jnp.bfloat16)."
        )
    for field in ("param_dtype", "dtype", "output_dtype"):
        dtype = _resolve(getattr(policy, field))
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"Policy: {field} is {dtype}, expected a floating-point dtype such as "
                f"jnp.float32 or jnp.bfloat16."
            )
    keep = policy.keep
    if isinstance(keep, str) or not all(isinstance(p, str) for p in keep):
        raise TypeError(
            f"Policy: keep must be a tuple of pattern strings, got {keep!r}. Write "
            f"keep=('*norm*',) for one pattern (note the comma)."
        )


def _segment_key(segment: str) -> Any:
    """The params key of a child at ``segment``: ``"serial[2]"`` -> 2, ``"serial[body]"``
    -> ``"body"``, ``"bidirectional.forward"`` -> ``"forward"``; ``None`` when the child
    gets its parent's params as they are (``"repeat"``, ``"residual"``, ``"rnn"``)."""
    if segment.endswith("]"):
        key = segment[segment.rfind("[") + 1 : -1]
        return int(key) if key.isdigit() else key
    return segment.rsplit(".", 1)[1] if "." in segment else None


def _join(where: str, segment: str) -> str:
    """A layer path as errors print it: ``serial[blocks]`` then ``.repeat``, ``[0]``..."""
    if not where:
        return segment
    return where + (segment if segment.startswith("[") else "." + segment)


def _subtree(params: Any, key: Any) -> tuple[bool, Any]:
    if isinstance(params, dict) and key in params:
        return True, params[key]
    if isinstance(params, tuple | list) and isinstance(key, int) and key < len(params):
        return True, params[key]
    return False, None


def _with_subtree(params: Any, key: Any, sub: Any) -> Any:
    if isinstance(params, dict):
        return {**params, key: sub}
    return type(params)(sub if i == key else p for i, p in enumerate(params))


def _labels(layer: Layer, params: Any, where: str) -> Any:
    """A tree shaped like ``params`` whose leaves are their param paths (strings)."""
    children = layer.children
    if len(children) == 1 and _segment_key(children[0][0]) is None:
        segment, child = children[0]
        return _labels(child, params, _join(where, segment))
    prefix = f"{where} {layer_name(layer)}" if where else layer_name(layer)
    labels = jax.tree_util.tree_map_with_path(lambda p, _: prefix + jax.tree_util.keystr(p), params)
    for segment, child in children:
        key = _segment_key(segment)
        found, sub = _subtree(params, key)
        if found:
            labels = _with_subtree(labels, key, _labels(child, sub, _join(where, segment)))
    return labels


def policy_paths(model: Layer, params: Any) -> list[str]:
    """The path of every param leaf of ``model``, the strings :class:`Policy` ``keep`` matches.

    A path is the layer's place in the model as errors print it, the layer's name and the
    key of the leaf in that layer's params: ``serial[1] batch_norm()['scale']``.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> model = fl.serial(fl.dense(4), fl.layer_norm(), fl.dense(2))
        >>> params, _ = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3)))
        >>> fl.policy_paths(model, params)  # doctest: +NORMALIZE_WHITESPACE
        ["serial[0] dense(4)['b']", "serial[0] dense(4)['w']",
         "serial[1] layer_norm()['bias']", "serial[1] layer_norm()['scale']",
         "serial[2] dense(2)['b']", "serial[2] dense(2)['w']"]

    Args:
        model: the model.
        params: its params (arrays or ``jax.ShapeDtypeStruct``, e.g. from
            ``jax.eval_shape(model.init, key, x)``).

    Returns:
        The paths, in the order of ``jax.tree_util.tree_leaves(params)``.
    """
    return jax.tree_util.tree_leaves(_labels(model, params, ""))


def _matches(pattern: str, path: str) -> bool:
    regex = re.escape(pattern).replace(r"\*", ".*").replace(r"\?", ".")
    return re.fullmatch(regex, path) is not None


def _kept(name: str, model: Layer, params: Any, keep: tuple[str, ...]) -> Any:
    """A tree of booleans shaped like ``params``: ``True`` where a ``keep`` pattern matches."""
    labels = _labels(model, params, "")
    paths = jax.tree_util.tree_leaves(labels)
    for pattern in keep:
        if not any(_matches(pattern, p) for p in paths):
            listing = "".join(f"\n  {p}" for p in paths) or " (none: the model has no params)"
            raise ValueError(
                f"{name}: the keep pattern {pattern!r} matches no param path. Use '*' for any "
                f"characters (brackets match themselves); the paths are:{listing}"
            )
    return jax.tree_util.tree_map(lambda p: any(_matches(k, p) for k in keep), labels)


def _described(policy: Policy) -> str:
    fields = ("param_dtype", "dtype", "output_dtype")
    shown = [f"{f}={_resolve(getattr(policy, f)).name}" for f in fields]
    if policy.keep:
        shown.append(f"keep={tuple(policy.keep)!r}")
    return f"policy({', '.join(shown)})"


def with_policy(model: Layer, policy: Policy) -> Layer:
    r"""``model`` under a precision :class:`Policy`: a new layer; ``model`` is unchanged.

    ``init`` runs ``model.init`` and stores the floating params in ``param_dtype``. ``apply``
    casts the floating params, except the paths ``keep`` matches, and the floating inputs
    (side inputs such as a float carry included; integer ids, lengths and boolean masks
    stay as they are) to ``dtype``, runs ``model.apply`` and casts the floating outputs to
    ``output_dtype``. The state (batch norm's running statistics, a KV cache) is passed
    as the model makes it. The casts are inside ``apply``, so gradients come back in the
    params' dtype: float32 master weights get float32 gradients. float16 compute needs
    loss scaling: ``fl.fit(..., loss_scale=2.0**10)`` or ``make_train_step``'s.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> model = fl.serial(fl.dense(8), fl.layer_norm(), fl.dense(2))
        >>> policy = fl.Policy(jnp.float32, jnp.bfloat16, jnp.float32, keep=("*norm*",))
        >>> mixed = fl.with_policy(model, policy)
        >>> params, state = mixed.init(jax.random.key(0), jnp.zeros((1, 3)))
        >>> y, _ = jax.jit(mixed.apply)(params, state, jnp.ones((1, 3)))
        >>> first = params[0]  # the dense layer's params: float32 master weights
        >>> first["w"].dtype, y.dtype
        (dtype('float32'), dtype('float32'))

    Args:
        model: the model, any :class:`~fundl.Layer`.
        policy: the :class:`Policy`.

    Returns:
        A :class:`~fundl.Layer` with ``model``'s params tree and inputs, named
        ``policy(...)`` with ``model`` as its one child.

    Raises:
        TypeError: ``policy`` is not a :class:`Policy`, one of its dtypes is not a
            floating-point dtype, or ``keep`` is not a tuple of strings.
        ValueError: at ``init`` or ``apply``, a ``keep`` pattern matches no param path (the
            message lists the paths).
    """
    _check_policy(policy)
    name = _described(policy)
    keep = tuple(policy.keep)

    def init(key, *inputs):
        params, state = call_at("policy", model.init, key, *inputs)
        _kept(name, model, params, keep)
        return policy.cast_to_param(params), state

    def apply(params, state, *inputs, **options):  # key, train and side inputs
        kept = _kept(name, model, params, keep)
        compute = _resolve(policy.dtype)
        params = jax.tree_util.tree_map(lambda k, p: p if k else _cast(p, compute), kept, params)
        inputs = policy.cast_to_compute(inputs)
        options = {k: v if k == "key" else policy.cast_to_compute(v) for k, v in options.items()}
        outputs, state = call_at("policy", model.apply, params, state, *inputs, **options)
        return policy.cast_to_output(outputs), state

    return named(Layer(init, apply), name, (("policy", model),))
