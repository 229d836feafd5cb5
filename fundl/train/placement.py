"""Placement: where a run puts its data and its train state (one device, or a mesh).

With a mesh, each batch is split over the mesh axis ``data_axis`` and the train state is
replicated; or, with ``shard_params``, each leaf is split along its first axis the devices
divide (FSDP-style); or, with sharding rules (:mod:`fundl.sharding`), each param lies as its
rule says, on any mesh axes, and the optimizer state follows its param. XLA partitions the
step. Across hosts, every process builds its own devices' shards from the same full value.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from fundl.sharding import ShardingRules, shard_like
from fundl.sharding import shard_params as rule_shardings

__all__: list[str] = []


class Placement(NamedTuple):
    """Where a run's values live; all ``None`` (and ``shards=1``) on the default device.

    Attributes:
        batch: a batch's sharding: its leading axis split over the data axis.
        replicated: the same value on every device.
        state: a tree of shardings shaped like the train state, one per leaf.
        shards: the number of devices a batch is split over.
    """

    batch: jax.sharding.Sharding | None = None
    replicated: jax.sharding.Sharding | None = None
    state: Any = None
    shards: int = 1

    def put(self, tree: Any) -> Any:
        """Puts ``tree`` on every device (default: the default device)."""
        return put(tree, self.replicated)

    def put_batch(self, tree: Any) -> Any:
        """Puts a batch on the devices, split along its leading axis."""
        return put(tree, self.batch)

    def put_state(self, train_state: Any) -> Any:
        """Puts a train state on the devices, each leaf on its sharding."""
        if self.state is None:
            return jax.device_put(train_state)
        return jax.tree_util.tree_map(put, train_state, self.state)

    def constrain(self, tree: Any) -> Any:
        """Inside a step: keeps a batch split over the data axis."""
        if self.batch is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, self.batch)

    def constrain_carry(self, carry: Any) -> Any:
        """Inside a step: keeps each leaf of the carried train state (without its key) on
        its sharding from step to step."""
        if self.state is None:
            return carry
        return jax.lax.with_sharding_constraint(carry, self.state._replace(key=None))


NO_MESH = Placement()
"""The default device, for runs without a mesh."""


def placement(
    mesh: jax.sharding.Mesh | None,
    data_axis: str,
    shard_params: bool,
    batch_size: int,
    train_state: Any,
    rules: ShardingRules | None = None,
) -> Placement:
    """The :class:`Placement` of a run on ``mesh`` (``NO_MESH`` when it is ``None``).

    ``train_state`` may hold arrays or their shapes (``jax.eval_shape``).

    Raises:
        ValueError: ``data_axis`` is not an axis of ``mesh``, ``batch_size`` is not a
            multiple of its devices, ``rules`` without a mesh or with ``shard_params``, or
            from :func:`fundl.shard_params`.
    """
    if mesh is None:
        if rules is not None:
            raise ValueError(
                "fit: rules place params on a mesh; pass mesh= too (e.g. "
                'jax.make_mesh((2, 4), ("data", "model"))).'
            )
        return NO_MESH
    if rules is not None and shard_params:
        raise ValueError(
            "fit: pass rules or shard_params=True, not both; for FSDP by rules use "
            "fl.fsdp_rules(params, mesh)."
        )
    if data_axis not in mesh.axis_names:
        raise ValueError(f"fit: mesh has axes {mesh.axis_names}, not {data_axis!r}.")
    shards = mesh.shape[data_axis]
    if batch_size % shards:
        raise ValueError(
            f"fit: batch_size={batch_size} must be a multiple of the {shards} devices on "
            f"mesh axis {data_axis!r}."
        )
    # fit places data and state itself and lets XLA partition the step, so it uses the
    # mesh's devices with automatic axes (jax.make_mesh defaults to explicit axes).
    auto = jax.sharding.Mesh(
        mesh.devices,
        mesh.axis_names,
        axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names),
    )
    replicated = NamedSharding(auto, PartitionSpec())

    def leaf_sharding(x):
        # FSDP-style: split a param (and its optimizer moments) along its first axis that
        # the devices divide; scalars, keys and small leaves stay replicated.
        if shard_params and not _is_key(x):
            for axis, size in enumerate(np.shape(x)):
                if size % shards == 0 and size >= shards:
                    spec = [None] * np.ndim(x)
                    spec[axis] = data_axis
                    return NamedSharding(auto, PartitionSpec(*spec))
        return replicated

    if rules is None:
        state = jax.tree_util.tree_map(leaf_sharding, train_state)
    else:
        params = train_state.params
        state = shard_like(train_state, params, rule_shardings(params, auto, rules))
    return Placement(
        batch=NamedSharding(auto, PartitionSpec(data_axis)),
        replicated=replicated,
        state=state,
        shards=shards,
    )


def put(tree: Any, sharding: jax.sharding.Sharding | None) -> Any:
    """Puts ``tree`` on ``sharding``'s devices (default: the default device) once, so steps
    that take it do not copy it from the host on every call; across hosts, each process
    builds its shards from the same full value."""
    if sharding is None:
        return jax.device_put(tree)
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def put_leaf(x):  # several processes: each builds its own shards from the full value
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x  # already there (initialised on its shards)
        if _is_key(x):
            return jax.random.wrap_key_data(
                put_leaf(jax.random.key_data(x)), impl=jax.random.key_impl(x)
            )
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(put_leaf, tree)


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
