"""Hypothesis strategies for property tests of layers: sizes, dtypes, keys, arrays, cases.

Arrays are drawn as a seed for NumPy's generator rather than element by element: layer
properties do not hinge on particular values, and it keeps each example cheap.

Example:
    >>> import fundl as fl
    >>> from hypothesis import given, settings, strategies as st
    >>> from fundl.testing import check_case, strategies as fst
    >>> shapes = st.tuples(fst.batch_sizes(), fst.feature_sizes())
    >>> @settings(max_examples=3, deadline=None)
    ... @given(fst.layer_cases(fl.layer_norm(), shapes, output_shapes=lambda shape: shape))
    ... def test_layer_norm(case):
    ...     check_case(case)
    >>> test_layer_norm()
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from fundl.core import Layer
from fundl.testing._check import LayerCase

__all__ = [
    "batch_sizes",
    "feature_sizes",
    "float_dtypes",
    "keys",
    "normal_arrays",
    "layer_cases",
]

Shape = tuple[int, ...]


def batch_sizes(max_size: int = 4) -> st.SearchStrategy[int]:
    """Batch sizes from 1 to ``max_size``.

    Args:
        max_size: the largest batch size drawn.
    """
    return st.integers(1, max_size)


def feature_sizes(max_size: int = 8) -> st.SearchStrategy[int]:
    """Feature sizes from 1 to ``max_size``.

    Args:
        max_size: the largest feature size drawn.
    """
    return st.integers(1, max_size)


def float_dtypes() -> st.SearchStrategy[np.dtype]:
    """The floating dtypes layers compute in: float32, bfloat16 and float16."""
    return st.sampled_from([np.dtype(np.float32), jnp.dtype(jnp.bfloat16), np.dtype(np.float16)])


def keys() -> st.SearchStrategy[jax.Array]:
    """PRNG keys (``jax.random.key``) from drawn 32-bit seeds."""
    return st.integers(0, 2**32 - 1).map(jax.random.key)


def normal_arrays(shape: Shape, dtype: Any = np.float32) -> st.SearchStrategy[np.ndarray]:
    """Standard-normal NumPy arrays, drawn as a seed for NumPy's generator.

    Args:
        shape: the array shape.
        dtype: the array dtype (default float32).
    """
    seeds = st.integers(0, 2**32 - 1)
    return seeds.map(lambda s: np.random.default_rng(s).standard_normal(shape).astype(dtype))


def layer_cases(
    layer: Layer,
    *input_shapes: st.SearchStrategy[Shape],
    output_shapes: Callable[..., Any],
    dtype: Any = np.float32,
    train: bool = False,
) -> st.SearchStrategy[LayerCase]:
    """Cases of one layer on drawn input shapes, filled with standard-normal values.

    Args:
        layer: the layer under test.
        *input_shapes: one strategy of shapes per input of the layer.
        output_shapes: the documented output shape(s) as a function of the drawn input
            shapes (one argument per input).
        dtype: the inputs' dtype (default float32).
        train: apply the layer in training mode.

    Returns:
        A strategy of :class:`fundl.testing.LayerCase` for :func:`fundl.testing.check_case`.
    """

    @st.composite
    def cases(draw: st.DrawFn) -> LayerCase:
        shapes = [draw(s) for s in input_shapes]
        inputs = tuple(draw(normal_arrays(shape, dtype)) for shape in shapes)
        return LayerCase(layer, inputs, output_shapes(*shapes), train=train)

    return cases()
