"""Checkpoints without pickle: one ``.npz`` file per checkpoint, with a JSON description inside.

Why ``npz`` + JSON and not orbax-checkpoint or safetensors: NumPy is already a dependency,
so checkpoints cost nothing to install (orbax-checkpoint pulls in tensorstore, etc., tens of
MB, on every CI run); ``np.load(..., allow_pickle=False)`` runs no code; zip stores a CRC-32
per array, so a corrupted file is detected; and one file per checkpoint makes the write
atomic with ``os.replace``. For arrays sharded over devices or hosts,
:mod:`fundl.sharded_checkpoint` writes each process's shards with orbax-checkpoint (an
optional extra).

A checkpoint file ``ckpt-<step>.npz`` holds the leaves ``leaf_0 ... leaf_N`` of a pytree
(PRNG keys as their raw key data; bfloat16 and other non-NumPy dtypes as unsigned-integer
views) and ``__meta__``, UTF-8 JSON with each leaf's path, shape and dtype, and user
metadata. Loading needs a template tree with the expected structure (for example a freshly
initialized train state); every path, shape and dtype is checked against it, and every
path that differs is reported at once (:class:`fundl.LoadReport`).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from fundl.load_report import LoadReport, compare_leaves

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointManager", "CheckpointError"]

_FORMAT = "fundl-checkpoint-1"
_NAME = re.compile(r"^ckpt-(\d+)\.npz$")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or that does not match the model."""


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def describe(x: Any) -> dict[str, Any]:
    """A leaf's description in a checkpoint's header: its shape and dtype (``"key"`` and the
    key's implementation for a PRNG key array), read without copying its data."""
    if _is_key(x):
        return {"shape": list(np.shape(x)), "dtype": "key", "impl": str(jax.random.key_impl(x))}
    dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
    return {"shape": list(np.shape(x)), "dtype": np.dtype(dtype).name}


def _encode(x: Any) -> tuple[np.ndarray, dict[str, Any]]:
    if _is_key(x):
        data = np.asarray(jax.random.key_data(x))
        impl = str(jax.random.key_impl(x))
        return data, {"shape": list(np.shape(x)), "dtype": "key", "impl": impl}
    arr = np.asarray(x)
    info = {"shape": list(arr.shape), "dtype": arr.dtype.name}
    if arr.dtype.kind not in "biufc":  # bfloat16, float8...: store the raw bits
        arr = arr.view(np.dtype(f"u{arr.dtype.itemsize}"))
    return arr, info


def _decode(arr: np.ndarray, info: dict[str, Any], like: Any) -> Any:
    if info["dtype"] == "key":
        return jax.random.wrap_key_data(arr, impl=info["impl"])
    dtype = np.dtype(like.dtype) if hasattr(like, "dtype") else np.dtype(info["dtype"])
    if arr.dtype != dtype:
        arr = arr.view(dtype)
    return arr


def save_checkpoint(path: str | os.PathLike[str], tree: Any, meta: Any = None) -> Path:
    """Writes ``tree`` (a pytree of arrays) and JSON-able ``meta`` to ``path`` atomically.

    The file is written next to ``path`` under a temporary name, flushed to disk, then renamed
    over ``path`` (``os.replace``), so a crash mid-write leaves any previous file intact.

    Example:
        >>> import tempfile, os, jax.numpy as jnp
        >>> from fundl.checkpoint import save_checkpoint, load_checkpoint
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt-0.npz")
        >>> _ = save_checkpoint(path, {"w": jnp.ones(2)}, meta={"epoch": 1})
        >>> tree, meta = load_checkpoint(path, {"w": jnp.zeros(2)})
        >>> tree["w"].tolist(), meta
        ([1.0, 1.0], {'epoch': 1})

    Args:
        path: the file to write (``.npz``).
        tree: a pytree of arrays (PRNG key arrays allowed).
        meta: JSON-serializable metadata stored with it.

    Returns:
        The path written.
    """
    path = Path(path)
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    arrays, infos = {}, []
    for i, (p, x) in enumerate(leaves):
        arr, info = _encode(x)
        info["path"] = jax.tree_util.keystr(p)
        arrays[f"leaf_{i}"] = arr
        infos.append(info)
    header = {"format": _FORMAT, "leaves": infos, "meta": meta}
    arrays["__meta__"] = np.frombuffer(json.dumps(header).encode("utf-8"), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(
    path: str | os.PathLike[str], like: Any, *, strict: bool = True
) -> tuple[Any, Any] | tuple[Any, Any, LoadReport]:
    """Reads a checkpoint written by :func:`save_checkpoint` into the structure of ``like``.

    Every path, shape and dtype is compared with ``like`` (:func:`fundl.compare_trees`):
    the error lists every missing, unexpected and mismatched path at once. With
    ``strict=False`` the leaves that match are loaded, the others keep ``like``'s leaf, and
    the :class:`fundl.LoadReport` of the rest is returned.

    Example:
        >>> import tempfile, os, jax.numpy as jnp
        >>> from fundl.checkpoint import save_checkpoint, load_checkpoint
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt-0.npz")
        >>> _ = save_checkpoint(path, {"w": jnp.ones(2), "b": jnp.ones(3)})
        >>> tree, meta, report = load_checkpoint(path, {"w": jnp.zeros(2)}, strict=False)
        >>> tree["w"].tolist(), report.unexpected
        ([1.0, 1.0], ("['b']",))

    Args:
        path: the checkpoint file.
        like: a template pytree with the expected structure, shapes and dtypes (e.g. a freshly
            initialized train state, or ``jax.eval_shape`` of one; with ``strict=False``,
            arrays, since the paths that do not match keep ``like``'s leaf).
        strict: ``True`` raises on any difference; ``False`` loads what matches and returns
            the report too.

    Returns:
        ``(tree, meta)``: the restored tree (NumPy arrays, PRNG keys as key arrays) and the
        metadata; with ``strict=False``, ``(tree, meta, report)``.

    Raises:
        CheckpointError: the file is missing, truncated or corrupted (a CRC mismatch), not a
            fundl checkpoint, or (with ``strict=True``) its tree differs from ``like``,
            listing every path that does.
    """
    path = Path(path)
    header, arrays = _read(path)
    stored = {info["path"]: (arr, info) for arr, info in zip(arrays, header["leaves"], strict=True)}
    like_leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    expected = {jax.tree_util.keystr(p): x for p, x in like_leaves}
    specs = {p: _Stored(tuple(info["shape"]), info["dtype"]) for p, (_, info) in stored.items()}
    report = compare_leaves({p: _spec(x) for p, x in expected.items()}, specs)
    if strict and not report.ok:
        raise CheckpointError(
            f"checkpoint {path} does not match the model: {report}\nWas it written for "
            f"another model or configuration? load_checkpoint(..., strict=False) loads the "
            f"paths that match and returns this report."
        )
    unfit = {m.path for m in report.mismatched}
    leaves = [
        _decode(*stored[p], x) if p in stored and p not in unfit else x for p, x in expected.items()
    ]
    tree = jax.tree_util.tree_unflatten(treedef, leaves)
    return (tree, header["meta"]) if strict else (tree, header["meta"], report)


class _Stored(NamedTuple):
    """A stored leaf's shape and dtype name (``"key"`` for PRNG keys), as the header has it."""

    shape: tuple[int, ...]
    dtype: str


def _spec(x: Any) -> _Stored:
    """``x``'s shape and dtype as a checkpoint header writes them."""
    return _Stored(tuple(np.shape(x)), "key" if _is_key(x) else np.dtype(x.dtype).name)


def _read(path: Path) -> tuple[dict[str, Any], list[np.ndarray]]:
    """The header and the arrays of the checkpoint file at ``path``, checked for damage."""
    try:
        with open(path, "rb") as f:
            data = np.load(f, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            header = json.loads(bytes(data["__meta__"]).decode("utf-8"))
            arrays = [data[f"leaf_{i}"] for i in range(len(header["leaves"]))]
            data.close()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist.") from None
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupted ({type(err).__name__}: {err}). "
            f"Delete it to fall back to the previous checkpoint in its directory."
        ) from None
    if header.get("format") != _FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {_FORMAT} file.")
    return header, arrays


def check_leaves(path: Any, infos: list[dict[str, Any]], like_leaves: list[Any]) -> dict[str, Any]:
    """Checks a checkpoint's leaf descriptions against a template's ``(path, leaf)`` pairs.

    Returns:
        ``{path: template leaf}`` in the template's order.

    Raises:
        CheckpointError: listing every missing, unexpected and mismatched path at once
            (:func:`fundl.compare_leaves`).
    """
    expected = {jax.tree_util.keystr(p): x for p, x in like_leaves}
    specs = {info["path"]: _Stored(tuple(info["shape"]), info["dtype"]) for info in infos}
    report = compare_leaves({p: _spec(x) for p, x in expected.items()}, specs)
    if not report.ok:
        raise CheckpointError(
            f"checkpoint {path} does not match the model: {report}\nWas it written for "
            f"another model or configuration?"
        )
    return expected


class CheckpointManager:
    """A directory of numbered checkpoints ``ckpt-<step>.npz``, keeping the newest ``keep``.

    Args:
        directory: where the checkpoints live (created on the first save).
        keep: how many of the newest checkpoints to keep (older ones are deleted after a
            successful save).
    """

    def __init__(self, directory: str | os.PathLike[str], keep: int = 3):
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"CheckpointManager: keep must be an int >= 1, got {keep!r}.")
        self.directory = Path(directory)
        self.keep = keep

    def steps(self) -> list[int]:
        """The steps of the checkpoints on disk, oldest first (temporary files ignored)."""
        if not self.directory.is_dir():
            return []
        found = (_NAME.match(name) for name in os.listdir(self.directory))
        return sorted(int(m.group(1)) for m in found if m)

    def path(self, step: int) -> Path:
        """The file of the checkpoint at ``step``."""
        return self.directory / f"ckpt-{step:010d}.npz"

    def latest(self) -> int | None:
        """The newest checkpoint's step, or ``None``."""
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, tree: Any, meta: Any = None) -> Path:
        """Writes the checkpoint of ``step`` atomically, then prunes to the newest ``keep``."""
        path = save_checkpoint(self.path(step), tree, meta)
        for old in self.steps()[: -self.keep]:
            self.path(old).unlink(missing_ok=True)
        return path

    def restore(self, like: Any, step: int | None = None) -> tuple[Any, Any]:
        """Loads the checkpoint of ``step`` (default: the newest) into ``like``'s structure.

        Raises:
            CheckpointError: no checkpoint, or see :func:`load_checkpoint`.
        """
        step = self.latest() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}.")
        return load_checkpoint(self.path(step), like)
