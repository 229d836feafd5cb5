"""Param tools: freezing part of a model, and grafting pretrained params into a tree."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fundl.core import renamed
from fundl.load_report import compare_trees, flat_paths

__all__ = ["freeze", "graft"]


@renamed(
    trainable="frozen",
    note_="True now marks the params to freeze (trainable= marked the params to train): "
    "fl.freeze(optimizer, frozen={'body': True, 'head': False}).",
)
def freeze(optimizer: optax.GradientTransformation, frozen: Any) -> optax.GradientTransformation:
    """Freezes the params where ``frozen`` is true: they keep their values; the rest train.

    Built on ``optax.multi_transform``: frozen leaves get ``optax.set_to_zero()`` (no update
    and no optimizer state for them), the others ``optimizer``.

    Example:
        >>> import jax, jax.numpy as jnp, optax, fundl as fl
        >>> model = fl.serial(body=fl.dense(4), head=fl.dense(2))
        >>> params, _ = model.init(jax.random.key(0), jnp.zeros((1, 3)))
        >>> opt = fl.freeze(optax.sgd(0.1), {"body": True, "head": False})
        >>> state = opt.init(params)
        >>> updates, _ = opt.update(jax.tree_util.tree_map(jnp.ones_like, params), state, params)
        >>> body, head = updates["body"], updates["head"]
        >>> float(jnp.abs(body["w"]).max()), bool(jnp.all(head["w"] != 0))
        (0.0, True)

    Args:
        optimizer: the optimizer for the params that train.
        frozen: a pytree of booleans with the params' structure, or a prefix of it (e.g.
            ``{"body": True, "head": False}``: ``True`` freezes), or a function
            ``params -> such a tree``.

    Returns:
        An optax ``GradientTransformation``.

    Raises:
        TypeError: the old keyword ``trainable=`` was given (its mask meant the opposite).
    """

    def labels(params):
        mask = frozen(params) if callable(frozen) else frozen
        try:
            return jax.tree_util.tree_map(
                lambda m, sub: jax.tree_util.tree_map(lambda _: "freeze" if m else "train", sub),
                mask,
                params,
            )
        except ValueError as err:
            raise ValueError(
                f"freeze: the frozen mask does not match the params' tree: {err}. Give a tree "
                f"of booleans with the params' structure or a prefix of it."
            ) from None

    return optax.multi_transform({"train": optimizer, "freeze": optax.set_to_zero()}, labels)


def graft(params: Any, pretrained: Any, at: Sequence[Any] = (), *, strict: bool = True) -> Any:
    """Puts ``pretrained`` into ``params`` at the subtree ``at``, checking every path.

    Transfer learning: build the new model, init it, then graft the pretrained body into it.
    Every path of the subtree is compared with ``pretrained`` (:func:`fundl.compare_trees`):
    the error lists every missing, unexpected and shape- or dtype-mismatched path at once.
    With ``strict=False`` the leaves that match are grafted, the others keep their values
    in ``params``, and the :class:`fundl.LoadReport` of the rest is returned with them.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> old = fl.serial(body=fl.dense(4), head=fl.dense(3))
        >>> new = fl.serial(body=fl.dense(4), head=fl.dense(5))
        >>> p_old, _ = old.init(jax.random.key(0), jnp.zeros((1, 2)))
        >>> p_new, _ = new.init(jax.random.key(1), jnp.zeros((1, 2)))
        >>> old_body = p_old["body"]
        >>> params = fl.graft(p_new, old_body, at=("body",))
        >>> body, head = params["body"], params["head"]
        >>> bool(jnp.all(body["w"] == old_body["w"])), head["w"].shape
        (True, (4, 5))
        >>> params, report = fl.graft(p_new, p_old, strict=False)  # the head does not fit
        >>> len(report.mismatched), report.mismatched[0].expected, report.mismatched[0].actual
        (2, 'float32[5]', 'float32[3]')

    Args:
        params: the new model's params.
        pretrained: the params to put in; same paths, shapes and dtypes as the subtree at
            ``at``.
        at: the path of the subtree (dict keys or tuple indices); ``()`` is the whole tree.
        strict: ``True`` raises on any difference; ``False`` grafts what matches and returns
            the report with the params.

    Returns:
        A new params tree (``params`` is not modified); with ``strict=False``, the pair
        ``(params, report)``.

    Raises:
        ValueError: ``at`` is not a path of ``params``; or, with ``strict=True``, the
            subtree differs from ``pretrained``, listing every path that does.
    """
    at = tuple(at)
    prefix = "".join(f"[{k!r}]" for k in at)
    report = compare_trees(_subtree(params, at), pretrained, prefix)
    if strict and not report.ok:
        raise ValueError(
            f"graft: pretrained at {at!r} does not fit params{prefix}: {report}\nGraft params "
            f"of the same model configuration, or pass strict=False to graft the paths that "
            f"match and get this report."
        )
    given = flat_paths(pretrained, prefix)
    unfit = {m.path for m in report.mismatched}

    def fitted(subtree):
        leaves, treedef = jax.tree_util.tree_flatten_with_path(subtree)
        paths = [prefix + jax.tree_util.keystr(p) for p, _ in leaves]
        new = [
            jnp.asarray(given[p]) if p in given and p not in unfit else x
            for p, (_, x) in zip(paths, leaves, strict=True)
        ]
        return jax.tree_util.tree_unflatten(treedef, new)

    grafted = _replace(params, at, fitted)
    return grafted if strict else (grafted, report)


def _subtree(tree: Any, at: tuple[Any, ...]) -> Any:
    """The subtree of ``tree`` at the path ``at``."""
    for key in at:
        tree = _child(tree, key)
    return tree


def _replace(tree: Any, at: tuple[Any, ...], fn: Any) -> Any:
    """A copy of ``tree`` whose subtree at ``at`` is ``fn(subtree)``; the rest is shared."""
    if not at:
        return fn(tree)
    head, rest = at[0], at[1:]
    new = _replace(_child(tree, head), rest, fn)
    if isinstance(tree, dict):
        return {**tree, head: new}
    items = list(tree)
    items[head] = new
    return type(tree)(items)


def _child(tree: Any, key: Any) -> Any:
    """``tree[key]`` for a dict key or a tuple/list index; a ``ValueError`` naming the keys."""
    if isinstance(tree, dict):
        if key not in tree:
            raise ValueError(f"graft: no key {key!r} in params (keys {list(tree)}).")
        return tree[key]
    if isinstance(tree, tuple | list) and isinstance(key, int) and -len(tree) <= key < len(tree):
        return tree[key]
    raise ValueError(f"graft: cannot index {type(tree).__name__} with {key!r}.")


def check_same_tree(expected: Any, actual: Any, what: str, where: str) -> None:
    """Raises a ``ValueError`` listing every path whose structure, shape or dtype differs.

    The message is ``"{what} {where} differs: "`` and the :class:`fundl.LoadReport`, ending
    with a period so that callers can append the fix.
    """
    report = compare_trees(expected, actual)
    if not report.ok:
        raise ValueError(f"{what} {where} differs: {report}.")
    e_def, a_def = jax.tree_util.tree_structure(expected), jax.tree_util.tree_structure(actual)
    if e_def != a_def:  # the same paths in other containers, e.g. a dict for a NamedTuple
        raise ValueError(f"{what} {where} has a different tree structure: {a_def} vs {e_def}.")
