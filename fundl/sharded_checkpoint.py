"""Sharded checkpoints: each process writes only its own shards, restorable onto any mesh.

:mod:`fundl.checkpoint` gathers a tree into one ``.npz`` file, which needs every value on one
host. A train state sharded over a mesh (FSDP, tensor parallel, several hosts) is written
here instead, with orbax-checkpoint (an optional extra: ``pip install "fundl[orbax]"``),
the checkpointer Flax and MaxText use: every process writes the shards its devices hold
(a replicated value once) through TensorStore, in parallel, and reads back only the shards
its devices need, so a checkpoint written on one mesh restores onto another (a ``(2, 4)``
mesh onto ``(4, 2)``, or onto one device) with the same bits.

A checkpoint is a directory ``ckpt_<step>`` holding ``arrays`` (the leaves ``leaf_0 ...
leaf_N`` of the tree; PRNG keys as their raw key data) and ``meta``, JSON with each leaf's
path, shape and dtype and the user's metadata, as in :mod:`fundl.checkpoint`. orbax writes
it under a temporary name and renames it when every process is done, so a crash mid-write
leaves the previous checkpoints intact (and the next manager removes the partial one).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import jax

from fundl.checkpoint import CheckpointError, check_leaves, describe

__all__ = ["ShardedCheckpointManager"]

_FORMAT = "fundl-sharded-checkpoint-1"
_PREFIX = "ckpt"
_NAME = re.compile(r"^ckpt_(\d+)$")


def _orbax() -> Any:
    """``orbax.checkpoint``, imported on first use; a clear error where it is missing."""
    try:
        import orbax.checkpoint as ocp
    except ImportError as err:
        raise ImportError(
            f"fundl's sharded checkpoints need orbax-checkpoint ({err}). Install it with: "
            f'pip install "fundl[orbax]"'
        ) from None
    return ocp


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _stored(x: Any) -> Any:
    """The array written for a leaf: a PRNG key's raw data, any other leaf as it is."""
    return jax.random.key_data(x) if _is_key(x) else x


def _target(x: Any) -> jax.ShapeDtypeStruct:
    """What to read for a template leaf: its stored shape and dtype on its sharding (the
    default device where it has none)."""
    sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(
        jax.local_devices()[0]
    )
    spec = jax.eval_shape(_stored, x)
    return jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=sharding)


def sharded_steps(directory: str | os.PathLike[str]) -> list[int]:
    """The steps of the finished sharded checkpoints in ``directory``, oldest first (orbax's
    temporary directories of unfinished ones ignored); reads the listing only, without orbax.
    """
    if not os.path.isdir(directory):
        return []
    found = (_NAME.match(name) for name in os.listdir(directory))
    return sorted(int(m.group(1)) for m in found if m)


class ShardedCheckpointManager:
    """A directory of numbered sharded checkpoints ``ckpt_<step>``, keeping the newest ``keep``.

    The same methods as :class:`fundl.checkpoint.CheckpointManager`. Across several
    processes (``jax.distributed``) every process calls :meth:`save` and :meth:`restore`
    with the same step, and ``directory`` must be one directory all of them see (a shared
    file system).

    Example:
        >>> import tempfile, jax, jax.numpy as jnp
        >>> from fundl.sharded_checkpoint import ShardedCheckpointManager
        >>> manager = ShardedCheckpointManager(tempfile.mkdtemp())
        >>> _ = manager.save(5, {"w": jnp.ones(2), "key": jax.random.key(0)}, meta={"epoch": 1})
        >>> like = {"w": jax.ShapeDtypeStruct((2,), jnp.float32),
        ...         "key": jax.ShapeDtypeStruct((), jax.random.key(0).dtype)}
        >>> tree, meta = manager.restore(like)
        >>> manager.latest(), tree["w"].tolist(), meta
        (5, [1.0, 1.0], {'epoch': 1})

    Args:
        directory: where the checkpoints live (created on the first save).
        keep: how many of the newest checkpoints to keep (older ones are deleted after a
            successful save).

    Raises:
        ValueError: ``keep`` is not an int >= 1.
        ImportError: orbax-checkpoint is not installed.
    """

    def __init__(self, directory: str | os.PathLike[str], keep: int = 3):
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"ShardedCheckpointManager: keep must be an int >= 1, got {keep!r}.")
        _orbax()  # fail here, before a run, where orbax-checkpoint is missing
        self.directory = Path(directory)
        self.keep = keep

    def steps(self) -> list[int]:
        """The steps of the finished checkpoints on disk, oldest first (see
        :func:`sharded_steps`)."""
        return sharded_steps(self.directory)

    def path(self, step: int) -> Path:
        """The directory of the checkpoint at ``step``."""
        return self.directory / f"{_PREFIX}_{step}"

    def latest(self) -> int | None:
        """The newest checkpoint's step, or ``None``."""
        steps = self.steps()
        return steps[-1] if steps else None

    def _orbax_manager(self) -> Any:
        ocp = _orbax()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep,
            step_prefix=_PREFIX,
            enable_async_checkpointing=False,  # a checkpoint is on disk when save returns
            cleanup_tmp_directories=True,  # remove what a killed run left half-written
        )
        return ocp.CheckpointManager(
            self.directory.absolute(), options=options, item_names=("arrays", "meta")
        )

    def save(self, step: int, tree: Any, meta: Any = None) -> Path:
        """Writes ``tree`` (a pytree of arrays, sharded or not) and JSON-able ``meta`` as the
        checkpoint of ``step`` (replacing one of the same step), then prunes to the newest
        ``keep``. Each process writes the shards on its own devices.
        """
        ocp = _orbax()
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        arrays = {f"leaf_{i}": _stored(x) for i, (_, x) in enumerate(leaves)}
        infos = [{**describe(x), "path": jax.tree_util.keystr(p)} for p, x in leaves]
        header = {"format": _FORMAT, "leaves": infos, "meta": meta}
        with self._orbax_manager() as manager:
            if step in manager.all_steps():
                manager.delete(step)
            manager.save(
                step,
                args=ocp.args.Composite(
                    arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(header)
                ),
            )
            manager.wait_until_finished()
        return self.path(step)

    def restore(self, like: Any, step: int | None = None) -> tuple[Any, Any]:
        """Loads the checkpoint of ``step`` (default: the newest) onto ``like``'s shardings.

        Args:
            like: a template pytree with the expected structure, shapes and dtypes, whose
                leaves carry the shardings to restore onto: arrays, or
                ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` (a leaf without a
                sharding goes to the default device). The mesh may differ from the one
                the checkpoint was written on.
            step: the checkpoint's step; ``None`` for the newest.

        Returns:
            ``(tree, meta)``: the restored tree (``jax.Array`` s on ``like``'s shardings, PRNG
            keys as key arrays) and the metadata.

        Raises:
            CheckpointError: no checkpoint, or its tree differs from ``like`` (naming the
                paths).
        """
        ocp = _orbax()
        step = self.latest() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}.")
        if step not in self.steps():
            raise CheckpointError(
                f"no checkpoint of step {step} in {self.directory}; it holds {self.steps()}."
            )
        like_leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
        with self._orbax_manager() as manager:
            args = ocp.args.Composite(meta=ocp.args.JsonRestore())
            header = manager.restore(step, args=args)["meta"]
            if header.get("format") != _FORMAT:
                raise CheckpointError(f"checkpoint {self.path(step)} is not a {_FORMAT} one.")
            expected = check_leaves(self.path(step), header["leaves"], like_leaves)
            index = {info["path"]: i for i, info in enumerate(header["leaves"])}
            targets = {f"leaf_{index[p]}": _target(x) for p, x in expected.items()}
            args = ocp.args.Composite(arrays=ocp.args.StandardRestore(targets))
            arrays = manager.restore(step, args=args)["arrays"]
        infos = {info["path"]: info for info in header["leaves"]}
        leaves = [_restored(arrays[f"leaf_{index[p]}"], infos[p]) for p in expected]
        return jax.tree_util.tree_unflatten(treedef, leaves), header["meta"]


def _restored(arr: jax.Array, info: dict[str, Any]) -> jax.Array:
    if info["dtype"] == "key":
        return jax.random.wrap_key_data(arr, impl=info["impl"])
    return arr
