"""Property-testing kit: check any layer's contract, with hypothesis strategies to drive it.

:func:`check_layer` asserts what every fundl layer promises: float64 gradients that agree
with finite differences, ``jit`` equal to eager, ``vmap`` equal to a loop, ``eval_shape``
equal to real init, predicted output shapes equal to actual ones, and determinism under a
fixed key. :func:`assert_compiles_once` fails when a step recompiles after its first
call. :class:`LayerCase` bundles a layer with inputs it accepts, :func:`check_case`
checks one, and ``fundl.testing.strategies`` draws sizes, dtypes, keys and arrays for
hypothesis (it needs the test extra: ``pip install "fundl[test]"``).

Example:
    >>> import jax.numpy as jnp, fundl as fl
    >>> from fundl.testing import check_layer
    >>> outputs, state = check_layer(fl.dense(3), jnp.ones((2, 4)))
    >>> outputs.shape
    (2, 3)
"""

from __future__ import annotations

from typing import Any

from fundl.testing._check import LayerCase, assert_trees_close, check_case, check_layer
from fundl.testing._compiles import assert_compiles_once, count_compiles

__all__ = [
    "check_layer",
    "check_case",
    "LayerCase",
    "assert_trees_close",
    "count_compiles",
    "assert_compiles_once",
]


def __getattr__(name: str) -> Any:
    # ``fl.testing.strategies`` imports hypothesis (the test extra): on first use only.
    if name == "strategies":
        import importlib

        return importlib.import_module("fundl.testing.strategies")
    raise AttributeError(f"module 'fundl.testing' has no attribute {name!r}")
