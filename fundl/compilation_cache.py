"""Re-runs that do not recompile: JAX's persistent compilation cache, on for ``fit``.

XLA compiles every jitted program on its first call; on a small model that is most of a
short run (``fit`` on the digits compiles for longer than it trains). JAX can keep the
compiled programs on disk and load them in the next process instead of compiling again: its
[persistent compilation cache](https://docs.jax.dev/en/latest/persistent_compilation_cache.html),
keyed by the program's StableHLO, the jaxlib version, the backend, the devices, the compile
options and ``XLA_FLAGS`` (a changed flag or an upgrade compiles afresh, never loads a stale
program). The options name the cache directory itself (XLA's autotuning cache lives inside
it), so a cache copied or moved to another path starts empty.

:func:`fundl.fit` turns it on at its start, for the rest of the process (JAX's setting is
global: every later compilation, inside ``fit`` or not, reads and writes it), unless:

- the environment variable ``FUNDL_COMPILATION_CACHE`` is ``0`` (or ``off``, ``false``,
  ``no``); set it to a path to use that directory instead of the default;
- :func:`cache_compilations` was called (its choice holds for the process);
- JAX's own ``jax_compilation_cache_dir`` is set (``JAX_COMPILATION_CACHE_DIR`` or
  ``jax.config.update``): that cache is yours, fundl leaves it and its thresholds alone;
- ``jax_enable_compilation_cache`` is false.

The default directory is ``$XDG_CACHE_HOME/fundl/jax/<cpu>`` (``~/.cache/fundl/jax/<cpu>``
without ``XDG_CACHE_HOME``), where ``<cpu>`` is a short hash of the CPU's architecture,
model and instruction-set flags: XLA:CPU programs are native code for the CPU that compiled
them, so machines sharing a home directory keep separate caches. It is created readable
only by you (``0o700``): JAX runs what it loads from there, so never point the cache at a
directory others can write. It grows by the programs you compile (a few KB to a few hundred
KB each for small models) and is never pruned: delete it to free the space. ``import fundl``
changes nothing; only ``fit`` and :func:`cache_compilations` do.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
from pathlib import Path

import jax

__all__ = ["cache_compilations"]

ENV_VAR = "FUNDL_COMPILATION_CACHE"
"""Unset or ``1``/``on``: the default directory; ``0``/``off``/``false``/``no``: off; a path."""

MIN_COMPILE_TIME_S = 0.0
"""Programs that compiled for at least this long are written (JAX's default, 1 s, would keep
none of a small CPU model's: its train step compiles in a few tenths of a second)."""

_THRESHOLDS = {  # name: (JAX's default, fundl's value); a value the user changed is kept
    "jax_persistent_cache_min_compile_time_secs": (1.0, MIN_COMPILE_TIME_S),
    "jax_persistent_cache_min_entry_size_bytes": (0, -1),  # -1: no size limit
}
_OFF = {"0", "off", "false", "no"}
_ON = {"", "1", "on", "true", "yes"}

_chosen = False
"""Whether :func:`cache_compilations` was called (then ``fit`` changes nothing)."""
_set_by_fundl: str | None = None
"""The directory fundl put in ``jax_compilation_cache_dir`` (any other value is the user's)."""


def cache_compilations(where: bool | str | os.PathLike[str] = True) -> Path | None:
    """Turns JAX's persistent compilation cache on in ``where``, or off, for this process.

    :func:`fundl.fit` turns the cache on by itself (see :mod:`fundl.compilation_cache` for
    the directory and the environment variable ``FUNDL_COMPILATION_CACHE``); call this to
    choose the directory, to turn it on for your own jitted loops before any ``fit``, or to
    keep ``fit`` from turning it on. The choice holds for the rest of the process and wins
    over the environment variable. A cache directory you set in JAX yourself
    (``jax_compilation_cache_dir``) is left alone.

    Example:
        >>> import tempfile, fundl as fl
        >>> where = fl.cache_compilations(tempfile.mkdtemp())  # compiled programs go here
        >>> where.is_dir()
        True
        >>> fl.cache_compilations(False) is None  # off again, and fit leaves it off
        True

    Args:
        where: ``True``: on, in the directory ``FUNDL_COMPILATION_CACHE`` names or else the
            default one; a path: on, in that directory (created if missing); ``False``: off.

    Returns:
        The cache directory now in use, or ``None`` when the cache is off.

    Raises:
        TypeError: ``where`` is neither a bool nor a path.
        ValueError: ``where`` names a directory other than the one you set in JAX's
            ``jax_compilation_cache_dir``, or JAX's cache is disabled
            (``jax_enable_compilation_cache=False``).
        OSError: the directory cannot be created.
    """
    global _chosen
    if not isinstance(where, bool | str | os.PathLike):
        raise TypeError(f"cache_compilations: where must be True, False or a directory (a str "
                        f"or path), got {type(where).__name__} {where!r}.")  # fmt: skip
    if where is False:
        _turn_off()
        _chosen = True
        return None
    target = (_env_dir() or _default_dir()) if where is True else _absolute(where)
    users = _users_dir()
    if users is not None and (where is True or Path(users) == target):
        _chosen = True
        return Path(users)
    if users is not None:
        raise ValueError(
            f"cache_compilations: JAX's cache is already set to {users!r} "
            f"(jax_compilation_cache_dir), not {str(target)!r}; fundl leaves it alone: change "
            "it with jax.config.update('jax_compilation_cache_dir', path) instead."
        )
    if not jax.config.jax_enable_compilation_cache:
        raise ValueError(
            "cache_compilations: JAX's compilation cache is disabled "
            "(jax_enable_compilation_cache=False); enable it with "
            "jax.config.update('jax_enable_compilation_cache', True) first."
        )
    _turn_on(target)
    _chosen = True
    return target


def cache_by_default() -> Path | None:
    """What ``fit`` calls at its start: the cache on, unless anything said otherwise.

    Nothing changes if :func:`cache_compilations` was called, if ``FUNDL_COMPILATION_CACHE``
    is off, if JAX's cache directory is already set (by the user or an earlier call) or
    disabled, or if the directory cannot be created (e.g. a read-only home): training then
    compiles as without a cache. Returns the directory fundl set, or ``None``.
    """
    settled = _chosen or jax.config.jax_compilation_cache_dir is not None
    target = None if settled or not jax.config.jax_enable_compilation_cache else _env_dir()
    if target is not None:
        with contextlib.suppress(OSError):  # e.g. a read-only home: compile as before
            _turn_on(target)
    return Path(_set_by_fundl) if _set_by_fundl else None


def _env_dir() -> Path | None:
    """The directory ``FUNDL_COMPILATION_CACHE`` asks for (``None``: off)."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value.lower() in _ON:
        return _default_dir()
    return None if value.lower() in _OFF else _absolute(value)


def _absolute(path: str | os.PathLike[str]) -> Path:
    return Path(path).expanduser().absolute()


def _default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fundl" / "jax" / _host_tag()


def _host_tag() -> str:
    """12 hex digits naming this CPU: its architecture, model and instruction-set flags."""
    facts = [platform.machine(), platform.processor()]
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:  # Linux
        for line in f:
            if not line.strip():  # the end of the first CPU's block
                break
            if line.startswith(("model name", "flags", "Features", "CPU part")):
                facts.append(line.strip())
    return hashlib.sha256("\n".join(facts).encode()).hexdigest()[:12]


def _users_dir() -> str | None:
    """JAX's cache directory when someone other than fundl set it, else ``None``."""
    current = jax.config.jax_compilation_cache_dir
    return current if current and current != _set_by_fundl else None


def _turn_on(target: Path) -> None:
    global _set_by_fundl
    from jax.experimental.compilation_cache import compilation_cache as cc

    if _set_by_fundl == str(target):
        return
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, (default, ours) in _THRESHOLDS.items():
        if jax.config.values[name] == default:
            jax.config.update(name, ours)
    cc.set_cache_dir(str(target))
    cc.reset_cache()  # JAX opens its cache once: forget any earlier directory
    _set_by_fundl = str(target)


def _turn_off() -> None:
    global _set_by_fundl
    from jax.experimental.compilation_cache import compilation_cache as cc

    if _set_by_fundl is not None and _users_dir() is None:
        cc.set_cache_dir(None)
        cc.reset_cache()
    _set_by_fundl = None
