"""Load reports: every path where a tree of weights differs from the tree a model expects.

Grafting pretrained params (:func:`fundl.graft`), loading a checkpoint
(:func:`fundl.checkpoint.load_checkpoint`) and importing weights from another library all
put a tree of arrays into a model's tree. :func:`compare_trees` lists, in one value, every
path that is missing, unexpected, or of another shape or dtype, instead of stopping at the
first; the loaders raise it as one error, or return it with ``strict=False``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

__all__ = ["LoadReport", "Mismatch", "compare_trees", "compare_leaves", "describe_leaf"]


class Mismatch(NamedTuple):
    """A path present in both trees with another shape or dtype.

    Attributes:
        path: the leaf's path, e.g. ``"['body'][1]['w']"`` (``jax.tree_util.keystr``).
        expected: what the model expects there, e.g. ``"float32[128, 10]"``.
        actual: what was given, e.g. ``"float32[64, 10]"``.
    """

    path: str
    expected: str
    actual: str


class LoadReport(NamedTuple):
    """Where a tree of weights differs from the tree a model expects: one frozen value.

    ``str(report)`` lists every difference, one a line; ``report.ok`` is true when there is
    none. Paths are ``jax.tree_util.keystr`` paths, as in ``params["body"][1]["w"]``.

    Example:
        >>> import jax.numpy as jnp, fundl as fl
        >>> expected = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}
        >>> report = fl.compare_trees(expected, {"w": jnp.zeros((2, 4)), "scale": jnp.ones(3)})
        >>> report.missing, report.unexpected
        (("['b']",), ("['scale']",))
        >>> print(report)
        1 missing, 1 unexpected, 1 mismatched:
          missing ['b']
          unexpected ['scale']
          mismatched ['w']: expected float32[2, 3], got float32[2, 4]

    Attributes:
        missing: paths the model expects that were not given, sorted.
        unexpected: paths given that the model does not have, sorted.
        mismatched: paths in both with another shape or dtype, as :class:`Mismatch`, sorted.
    """

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[Mismatch, ...] = ()

    @property
    def ok(self) -> bool:
        """``True`` when nothing is missing, unexpected or mismatched."""
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        if self.ok:
            return "no differences"
        counts = (
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.mismatched)} mismatched:"
        )
        lines = [f"  missing {p}" for p in self.missing]
        lines += [f"  unexpected {p}" for p in self.unexpected]
        lines += [
            f"  mismatched {m.path}: expected {m.expected}, got {m.actual}" for m in self.mismatched
        ]
        return "\n".join([counts, *lines])


def describe_leaf(x: Any) -> str:
    """``"float32[2, 3]"`` for an array (or anything with ``shape`` and ``dtype``).

    PRNG key arrays read ``"key[...]"``; a ``dtype`` given as a string is used as it is.
    """
    dtype = x.dtype
    if isinstance(dtype, str):
        name = dtype
    elif jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        name = "key"
    else:
        name = np.dtype(dtype).name
    return f"{name}{list(x.shape)}"


def compare_leaves(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> LoadReport:
    """The :class:`LoadReport` of two flat ``path -> leaf`` mappings.

    For loaders whose weights come flat (a checkpoint's index, a PyTorch ``state_dict``
    mapped to fundl paths) rather than as a tree.

    Args:
        expected: ``path -> leaf`` of what the model expects; a leaf is an array, a
            ``jax.ShapeDtypeStruct``, or anything with ``shape`` and ``dtype``.
        actual: ``path -> leaf`` of what was given.

    Returns:
        The paths missing from ``actual``, unexpected in it, and of another shape or dtype.
    """
    want = {p: describe_leaf(x) for p, x in expected.items()}
    got = {p: describe_leaf(x) for p, x in actual.items()}
    mismatched = [Mismatch(p, want[p], got[p]) for p in sorted(want.keys() & got.keys())]
    return LoadReport(
        missing=tuple(sorted(want.keys() - got.keys())),
        unexpected=tuple(sorted(got.keys() - want.keys())),
        mismatched=tuple(m for m in mismatched if m.expected != m.actual),
    )


def flat_paths(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{prefix + keystr(path): leaf}`` for every leaf of ``tree``, in the tree's order."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {prefix + jax.tree_util.keystr(p): x for p, x in leaves}


def compare_trees(expected: Any, actual: Any, prefix: str = "") -> LoadReport:
    """Every path where ``actual`` differs from ``expected``: missing, unexpected, mismatched.

    Leaves are compared by path (``jax.tree_util.keystr``), shape and dtype, never by value,
    so ``expected`` may be ``jax.eval_shape`` of a model's init. A list and a tuple with the
    same items give the same paths, and so match.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> model = fl.serial(body=fl.dense(4), head=fl.dense(2))
        >>> params, _ = model.init(jax.random.key(0), jnp.zeros((1, 3)))
        >>> fl.compare_trees(params, params).ok
        True

    Args:
        expected: the tree the model expects (arrays or ``jax.ShapeDtypeStruct``).
        actual: the tree given.
        prefix: put before every path in the report, e.g. ``"['body']"`` when the trees are
            a subtree of a model's params.

    Returns:
        A :class:`LoadReport`.
    """
    return compare_leaves(flat_paths(expected, prefix), flat_paths(actual, prefix))
