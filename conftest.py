"""Strict test configuration for the whole suite (tests/ and the doctests in fundl/).

- Strict dtype promotion and rank promotion that raises, so no layer relies on implicit
  casts or broadcasting (Equinox's conftest does the same).
- Warnings are errors (``filterwarnings = error`` in pyproject.toml).
- Hypothesis profiles: ``ci`` (small, derandomized: picked when ``CI`` is set), ``dev``
  (the default) and ``thorough`` (``HYPOTHESIS_PROFILE=thorough``). ``deadline=None``
  because a first call compiles.
"""

import os

import jax
from hypothesis import HealthCheck, settings

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

_common = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("ci", max_examples=6, derandomize=True, **_common)
settings.register_profile("dev", max_examples=15, **_common)
settings.register_profile("thorough", max_examples=200, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
