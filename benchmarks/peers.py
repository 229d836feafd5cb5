"""The peer libraries, imported in one place: a missing peer is a note, written here once.

:data:`PEERS` names each peer and where it comes from. A case lists its peer
implementations as ``{label: (peer, make)}``, where ``make(module)`` builds one from the
peer's imported module; :func:`build` imports each peer once, calls ``make`` for those that
load, and gives one note per peer that does not (not installed, Keras on another backend,
or a compute dtype it does not take from a cast in the loss).

This module imports no benchmark.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import NamedTuple

import jax.numpy as jnp


class Peer(NamedTuple):
    """How to import a peer library.

    Attributes:
        module: the module to import, e.g. ``"flax.linen"``.
        package: its distribution on PyPI, for the note of a missing peer.
        env: environment variables set (unless already set) before the import.
        backend: ``check(module)``: why it cannot run here (``None``: it can).
        dtype_note: why a cast in the loss does not set its compute dtype (``None``: it does).
    """

    module: str
    package: str
    env: tuple[tuple[str, str], ...] = ()
    backend: Callable[[ModuleType], str | None] | None = None
    dtype_note: str | None = None


def _keras_backend(keras: ModuleType) -> str | None:
    backend = keras.backend.backend()
    return None if backend == "jax" else f"Keras runs on {backend}, not JAX"


PEERS = {
    "stax": Peer("jax.example_libraries.stax", "jax"),
    "flax linen": Peer("flax.linen", "flax"),
    "flax nnx": Peer("flax.nnx", "flax"),
    "haiku": Peer("haiku", "dm-haiku"),
    "equinox": Peer("equinox", "equinox"),
    "keras 3": Peer("keras", "keras", env=(("KERAS_BACKEND", "jax"),), backend=_keras_backend,
                    dtype_note="Keras sets precision by a global dtype policy"),
}  # fmt: skip
"""The peers by name. Keras 3 runs on its JAX backend (``KERAS_BACKEND=jax`` unless set)."""

INSTALL = "pip install -e '.[bench]'"


def find(name: str, dtype=None) -> tuple[ModuleType | None, str | None]:
    """``(module, None)`` of peer ``name``, or ``(None, why it is skipped)``.

    Args:
        name: a key of :data:`PEERS`.
        dtype: the compute dtype of the run (``None``: the inputs'); a peer with a
            ``dtype_note`` is skipped when it is set.
    """
    peer = PEERS[name]
    if dtype is not None and peer.dtype_note:
        return None, f"{name} skipped in {jnp.dtype(dtype).name}: {peer.dtype_note}"
    for key, value in peer.env:
        os.environ.setdefault(key, value)
    try:
        module = importlib.import_module(peer.module)
    except ImportError:
        return None, f"{peer.package} not installed: {name} skipped ({INSTALL})"
    why = peer.backend(module) if peer.backend else None
    return (None, f"{why}: {name} skipped") if why else (module, None)


def build(
    makers: Mapping[str, tuple[str, Callable[[ModuleType], object]]],
    dtype=None,
    skips: Mapping[str, str] | None = None,
) -> tuple[dict[str, object], list[str]]:
    """The peer implementations that can run here, and a note per peer that cannot.

    Args:
        makers: ordered ``{label: (peer name, make(module) -> implementation)}``.
        dtype: the compute dtype of the run (see :func:`find`).
        skips: ``{peer name: why}`` of peers this case skips when ``dtype`` is set.

    Returns:
        ``({label: implementation}, notes)``, in the order of ``makers``.
    """
    impls, notes, found = {}, [], {}
    for label, (name, make) in makers.items():
        if name not in found:
            skip = (skips or {}).get(name) if dtype is not None else None
            note = f"{name} skipped in {jnp.dtype(dtype).name}: {skip}" if skip else None
            found[name] = (None, note) if skip else find(name, dtype)
            if found[name][1]:
                notes.append(found[name][1])
        module = found[name][0]
        if module is not None:
            impls[label] = make(module)
    return impls, notes
