"""The device mesh and where arrays live on it.

jaxllm is data-parallel over a 1-D mesh with one axis, `data`: every batch is split along its batch
dimension over the devices and the parameters and optimizer state are replicated. The train step
(jaxllm/step.py) computes each device's gradient on its own rows inside `jax.shard_map` and adds the
gradients up with one all-reduce per optimizer step; the evaluation step is left to XLA's partitioner.
One device is the degenerate case: a mesh of one, no collectives.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D mesh over the first `num_devices` devices (0 = all of them)."""
    devices = jax.devices()
    if num_devices > len(devices):
        raise ValueError(f"train.num_devices is {num_devices} but only {len(devices)} devices are visible; "
                         f"lower it or set it to 0 to use them all")
    chosen = devices[:num_devices] if num_devices else devices
    return Mesh(np.asarray(chosen), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of parameters and optimizer state: a full copy on every device."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    """Sharding of a batch array: its `batch_axis` dimension split over the `data` axis."""
    spec = [None] * batch_axis + [DATA_AXIS]
    return NamedSharding(mesh, P(*spec))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh, batch_axis: int = 0) -> dict[str, jax.Array]:
    """Put a host batch on the mesh, split along `batch_axis`."""
    sharding = batch_sharding(mesh, batch_axis)
    return {name: jax.device_put(array, sharding) for name, array in batch.items()}
