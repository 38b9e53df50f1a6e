"""The one place that decides how arrays are laid out over devices.

A 1-D mesh with a ``data`` axis spans every device of every host. Batches are split along it and
parameters are replicated, so under ``jax.jit`` BatchNorm statistics are reduced over the global
batch: the cross-replica BatchNorm of the paper, with no ``pmap`` and no explicit collectives.
"""

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with one ``data`` axis over ``devices`` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,),
                axis_types=(jax.sharding.AxisType.Auto,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the ``data`` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Host-local batch (this process's rows) -> global ``jax.Array``s sharded over ``data``."""
    sharding = data_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf on every device of the mesh (parameters, optimizer state, statistics)."""
    return jax.device_put(tree, replicated_sharding(mesh))
