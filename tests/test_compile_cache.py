"""The persistent compilation cache: on for ``fit``, off or moved on request, never the user's.

Every test keeps its cache in its own temporary directory and leaves JAX's settings as it
found them (the ``isolated`` fixture), so nothing is written to the home directory.
"""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache

import fundl as fl
from fundl import compilation_cache

ROOT = Path(__file__).resolve().parent.parent
DIR = "jax_compilation_cache_dir"
MIN_TIME = "jax_persistent_cache_min_compile_time_secs"
ENABLE = "jax_enable_compilation_cache"


@pytest.fixture
def isolated(monkeypatch):
    """fundl's choice unmade, no ``FUNDL_COMPILATION_CACHE``; JAX's settings restored after."""
    saved = {
        name: jax.config.values[name] for name in (DIR, ENABLE, *compilation_cache._THRESHOLDS)
    }
    monkeypatch.setattr(compilation_cache, "_chosen", False)
    monkeypatch.setattr(compilation_cache, "_set_by_fundl", None)
    monkeypatch.delenv(compilation_cache.ENV_VAR, raising=False)
    jax.config.update(DIR, None)
    yield monkeypatch
    for name, value in saved.items():
        jax.config.update(name, value)
    jax_cache.reset_cache()  # JAX forgets the temporary directory


def _tiny_fit(features: int) -> None:
    """A one-epoch ``fit`` whose programs no other test compiles (``features`` wide)."""
    x = np.random.default_rng(0).normal(size=(12, features)).astype(np.float32)
    y = np.zeros(12, np.int32)
    model = fl.serial(fl.dense(features + 2), jax.nn.relu, fl.dense(3))
    fl.fit(model, optax.softmax_cross_entropy_with_integer_labels, optax.sgd(0.1), (x, y),
           epochs=1, batch_size=4, progress=False)  # fmt: skip


def test_fit_turns_the_cache_on_and_fills_it(isolated, tmp_path):
    isolated.setenv(compilation_cache.ENV_VAR, str(tmp_path / "cache"))
    _tiny_fit(features=13)
    assert jax.config.values[DIR] == str(tmp_path / "cache")
    assert jax.config.values[MIN_TIME] == compilation_cache.MIN_COMPILE_TIME_S
    assert list((tmp_path / "cache").glob("jit_*-cache"))  # the step, written at any size


def test_default_directory_is_private_and_per_cpu(isolated, tmp_path):
    isolated.setenv("XDG_CACHE_HOME", str(tmp_path))
    where = compilation_cache.cache_by_default()
    assert where is not None and where.parent == tmp_path / "fundl" / "jax"
    assert len(where.name) == 12 and int(where.name, 16) >= 0  # the CPU's hash
    assert jax.config.values[DIR] == str(where)
    assert stat.S_IMODE(where.stat().st_mode) == 0o700


@pytest.mark.parametrize("value", ["0", "off", "False", "no"])
def test_environment_variable_turns_it_off(isolated, value):
    isolated.setenv(compilation_cache.ENV_VAR, value)
    assert compilation_cache.cache_by_default() is None
    assert jax.config.values[DIR] is None


def test_cache_compilations_off_wins_over_the_environment_and_undoes_fit(isolated, tmp_path):
    isolated.setenv(compilation_cache.ENV_VAR, str(tmp_path))
    assert compilation_cache.cache_by_default() == tmp_path
    assert fl.cache_compilations(False) is None
    assert jax.config.values[DIR] is None
    assert compilation_cache.cache_by_default() is None  # what fit calls: stays off
    assert jax.config.values[DIR] is None


def test_cache_compilations_moves_the_cache(isolated, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert fl.cache_compilations(first) == first
    assert fl.cache_compilations(second) == second
    assert jax.config.values[DIR] == str(second) and second.is_dir()


def test_a_directory_the_user_set_in_jax_is_left_alone(isolated, tmp_path):
    mine = str(tmp_path / "mine")
    jax.config.update(DIR, mine)
    jax.config.update(MIN_TIME, 2.0)
    assert compilation_cache.cache_by_default() is None
    assert fl.cache_compilations(True) == Path(mine)
    assert fl.cache_compilations(False) is None
    assert jax.config.values[DIR] == mine and jax.config.values[MIN_TIME] == 2.0
    with pytest.raises(ValueError, match=r"already set to '.*mine'.*jax.config.update"):
        fl.cache_compilations(tmp_path / "other")


def test_users_thresholds_are_kept(isolated, tmp_path):
    jax.config.update(MIN_TIME, 0.5)
    fl.cache_compilations(tmp_path)
    assert jax.config.values[MIN_TIME] == 0.5


def test_disabled_jax_cache_stays_disabled(isolated, tmp_path):
    jax.config.update(ENABLE, False)
    assert compilation_cache.cache_by_default() is None
    with pytest.raises(ValueError, match="jax_enable_compilation_cache=False"):
        fl.cache_compilations(tmp_path)


def test_cache_compilations_names_what_it_takes(isolated):
    with pytest.raises(TypeError, match=r"where must be True, False or a directory.*NoneType"):
        fl.cache_compilations(None)
    assert jax.config.values[DIR] is None


def test_a_directory_that_cannot_be_made_leaves_the_cache_off(isolated, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    isolated.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    assert compilation_cache.cache_by_default() is None
    assert jax.config.values[DIR] is None
    with pytest.raises(OSError):  # asked for by name: the error is the caller's to see
        fl.cache_compilations(tmp_path / "file" / "cache")


_FIT_AND_COUNT = """
import collections, json, jax, numpy as np, optax, fundl as fl
events = collections.Counter()
jax.monitoring.register_event_listener(lambda name, **kw: events.update([name.split("/")[-1]]))
x = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32)
model = fl.serial(fl.dense(6), jax.nn.relu, fl.dense(3))
fl.fit(model, optax.softmax_cross_entropy_with_integer_labels, optax.sgd(0.1),
       (x, np.zeros(12, np.int32)), epochs=1, batch_size=4, progress=False)
print(json.dumps({"dir": jax.config.values["jax_compilation_cache_dir"], **events}))
"""


def _fresh_fit(env) -> dict:
    out = subprocess.run([sys.executable, "-c", _FIT_AND_COUNT], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=False, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def test_import_changes_nothing():
    code = "import fundl, jax; print(jax.config.values['jax_compilation_cache_dir'])"
    env = {**os.environ, "PYTHONPATH": str(ROOT), compilation_cache.ENV_VAR: "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True, timeout=120)  # fmt: skip
    assert out.stdout.strip() == "None"


@pytest.mark.slow
def test_a_second_process_compiles_nothing_new(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), compilation_cache.ENV_VAR: str(tmp_path)}
    first = _fresh_fit(env)
    entries = sorted(p.name for p in tmp_path.iterdir())
    second = _fresh_fit(env)
    assert first["dir"] == second["dir"] == str(tmp_path)
    assert first.get("cache_misses", 0) > 0 and first.get("cache_hits", 0) == 0
    assert second.get("cache_misses", 0) == 0 and second["cache_hits"] == first["cache_misses"]
    assert sorted(p.name for p in tmp_path.iterdir()) == entries  # nothing new written
