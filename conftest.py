"""Strict test configuration for the whole suite (tests/ and the doctests in fundl/).

- Strict dtype promotion and rank promotion that raises, so no layer relies on implicit
  casts or broadcasting (Equinox's conftest does the same).
- Warnings are errors (``filterwarnings = error`` in pyproject.toml).
- Hypothesis profiles: ``fast`` (the default: 5 derandomized examples, so every run draws
  the same cases) and ``thorough`` (``HYPOTHESIS_PROFILE=thorough``: 200 random examples).
  ``deadline=None`` because a first call compiles.
- Tests marked ``slow`` run only with ``FUNDL_SLOW=1`` (``.ci/run`` sets it).
"""

import importlib.util
import os

import jax
import pytest
from hypothesis import HealthCheck, settings

# fit turns on JAX's persistent compilation cache in ~/.cache; the suite writes nothing there
# and compiles afresh (tests/test_compile_cache.py uses its own temporary directories).
os.environ.setdefault("FUNDL_COMPILATION_CACHE", "0")

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

_common = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("fast", max_examples=5, derandomize=True, database=None, **_common)
settings.register_profile("thorough", max_examples=200, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("matplotlib") is None:  # an optional extra: fundl[plot]
        no_plot = pytest.mark.skip(reason='matplotlib is not installed (pip install "fundl[plot]")')
        for item in items:
            if item.name.startswith("fundl.plot."):
                item.add_marker(no_plot)
    if importlib.util.find_spec("orbax") is None:  # an optional extra: fundl[orbax]
        reason = 'orbax-checkpoint is not installed (pip install "fundl[orbax]")'
        for item in items:
            if item.name.startswith("fundl.sharded_checkpoint."):
                item.add_marker(pytest.mark.skip(reason=reason))
    onnx = all(importlib.util.find_spec(m) for m in ("jax2onnx", "onnxruntime"))
    for item in items:  # an optional extra: fundl[onnx]; its doctest imports jax2onnx (15 s)
        if item.name.startswith("fundl.onnx."):
            item.add_marker(pytest.mark.slow)
            if not onnx:
                reason = 'jax2onnx or onnxruntime is not installed (pip install "fundl[onnx]")'
                item.add_marker(pytest.mark.skip(reason=reason))
    if os.environ.get("FUNDL_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with FUNDL_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
