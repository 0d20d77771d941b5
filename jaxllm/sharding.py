"""The device mesh and where arrays live on it.

jaxllm is data-parallel over a 1-D mesh with one axis, `data`: every batch is split along its batch
dimension over the devices and the parameters and optimizer state are replicated. The train step
(jaxllm/step.py) computes each device's gradient on its own rows inside `jax.shard_map` and adds the
gradients up with one all-reduce per optimizer step; the evaluation step is left to XLA's partitioner.
One device is the degenerate case: a mesh of one, no collectives.

Several processes (jaxllm/distributed.py): the mesh spans every process's devices; each process builds only
the rows of a batch its own devices hold (`process_rows`) and `shard_batch` assembles the global array from
the parts; `to_host` reads a sharded result back whole in every process.
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


def process_rows(mesh: Mesh, global_shape: tuple[int, ...], batch_axis: int = 0) -> tuple[int, int]:
    """[start, stop): the rows along `batch_axis` of a batch of `global_shape` that this process's devices
    hold under `batch_sharding(mesh, batch_axis)`, read from the sharding itself (whatever the mesh's axes
    and device order). Every row in one process: (0, global_shape[batch_axis]).

    A process whose devices hold rows that are not side by side gets the span from the first to the last
    (it builds a few rows it does not need); `shard_batch` places the ones each device holds.
    """
    indices = batch_sharding(mesh, batch_axis).addressable_devices_indices_map(tuple(global_shape)).values()
    ranges = [index[batch_axis].indices(global_shape[batch_axis])[:2] for index in indices]
    return min(start for start, _ in ranges), max(stop for _, stop in ranges)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh, batch_axis: int = 0,
                global_rows: int | None = None) -> dict[str, jax.Array]:
    """Put a host batch on the mesh, split along `batch_axis`.

    `global_rows` None: `batch` is the whole (global) batch, the same in every process. Otherwise the
    global batch has `global_rows` rows along `batch_axis` and `batch` holds only this process's rows,
    `process_rows(mesh, ...)`; each process then builds only its part of the batch and the global array is
    assembled from the parts (`jax.make_array_from_callback`, each process filling its own devices).
    One process with the whole batch: a plain `device_put`, as it always was.
    """
    sharding = batch_sharding(mesh, batch_axis)
    whole = global_rows is None or all(a.shape[batch_axis] == global_rows for a in batch.values())
    if whole and sharding.is_fully_addressable:
        return {name: jax.device_put(array, sharding) for name, array in batch.items()}
    out = {}
    for name, array in batch.items():
        shape = list(array.shape)
        shape[batch_axis] = array.shape[batch_axis] if global_rows is None else global_rows
        start = process_rows(mesh, tuple(shape), batch_axis)[0] if global_rows is not None else 0

        def local_part(index, array=array, start=start):  # index: a device's slices of the global array
            index = list(index)
            first, stop, _ = index[batch_axis].indices(shape[batch_axis])
            index[batch_axis] = slice(first - start, stop - start)
            return array[tuple(index)]

        out[name] = jax.make_array_from_callback(tuple(shape), sharding, local_part, dtype=array.dtype)
    return out


def put_replicated(tree, mesh: Mesh):
    """`tree`'s arrays copied whole onto every device of the mesh (`replicated`). Several processes: each
    fills its own devices from its host copy (all processes must hold the same values)."""
    target = replicated(mesh)
    if target.is_fully_addressable:
        return jax.device_put(tree, target)

    def place(leaf):
        host = np.asarray(jax.device_get(leaf))
        return jax.make_array_from_callback(host.shape, target, lambda index: host[index], dtype=host.dtype)

    return jax.tree.map(place, tree)


def to_host(array: jax.Array) -> np.ndarray:
    """The whole of a (possibly sharded) device array as numpy, in every process (several processes: an
    all-gather of the parts the others hold)."""
    if array.is_fully_addressable or array.is_fully_replicated:
        return np.asarray(jax.device_get(array))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
