"""The device mesh, the logical-axis rules, and where every array lives on the mesh.

The mesh has three named axes, sized by `train.mesh` (e.g. "data:-1,fsdp:1,tensor:1"; -1 takes the devices
the others leave; an axis not named has size 1):
- `data`: the batch only. Parameters and optimizer state are replicated over it.
- `fsdp`: the batch too, and parameters, gradients and optimizer state are sharded over it (ZeRO-3): each
  device stores 1/N of every matrix; XLA all-gathers a layer's weights where the step uses them and
  reduce-scatters their gradients.
- `tensor`: Megatron-style splits: attention heads and MLP hidden units (column-parallel q/k/v/w1/w3,
  row-parallel o/w2) and the vocabulary of the embedding and LM head.

Every parameter dimension has a logical name (jaxllm/models/axes.py: embed, vocab, heads, kv_heads, mlp,
experts, norm); `RULES` below, the one table of this mapping, turns logical names into mesh axes. A mesh
axis serves one dimension per array, the first that asks for it: the embedding table [vocab, embed] splits
its rows over tensor x fsdp (its gradient, a scatter of batch-split rows, then stays local; split by columns,
XLA would have to gather the activations), the LM head [embed, vocab] its rows over fsdp, columns over tensor.
Mixture-of-experts kernels [E, D, F] shard like dense MLP kernels (embed over fsdp, mlp over tensor) and keep
every expert on every device (experts are not an axis of the mesh: expert parallelism is not implemented).

The train step (jaxllm/step.py) has two forms: on a mesh whose only axis of size > 1 is `data`, it runs
inside `jax.shard_map` (one gradient all-reduce per optimizer step); on any mesh with `fsdp` or `tensor`
it is one program that XLA's SPMD partitioner splits from the shardings here, with the activations
constrained to the batch split (`constrain`) so that each device computes its own rows.

One device is the degenerate case: a mesh of one, no collectives.

Several processes (jaxllm/distributed.py): the mesh spans every process's devices (device order puts each
process's devices together along the batch axes); each process builds only the rows of a batch its own
devices hold (`process_rows`) and `shard_batch` assembles the global array from the parts; `put_global`
places host values with any sharding, and `to_host` reads a sharded result back whole in every process.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxllm.config import MESH_AXES as AXES, parse_mesh  # noqa: F401 (parse_mesh: part of this module's API)

DATA_AXIS = "data"
BATCH_AXES = ("data", "fsdp")  # the batch is split over both; their product is the number of batch shards

# Logical axis -> mesh axis (None: replicated). The only place where this mapping lives.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,   # activations' and batches' rows
    "embed": "fsdp",       # the model width in parameters (ZeRO-3)
    "vocab": ("tensor", "fsdp"),  # embedding rows, LM head columns (fsdp only where embed has not taken it)
    "heads": "tensor",     # query heads x head size (heads-major): whole heads per device
    "kv_heads": "tensor",  # key/value heads x head size
    "mlp": "tensor",       # MLP hidden units
    "experts": None,       # MoE experts: every device holds all of them (sharded like dense MLPs inside)
    "norm": None,          # norm scales: small, replicated
    "length": None,        # sequence positions
    "act_embed": None,     # the model width in activations (never split: each device has whole rows)
}


def make_mesh(num_devices: int = 0, spec: str = "data:-1") -> Mesh:
    """The (data, fsdp, tensor) mesh of `spec` over the first `num_devices` devices (0 = all of them, over
    every process). Axes are Auto: XLA partitions what the shardings below leave open."""
    devices = jax.devices()
    if num_devices > len(devices):
        raise ValueError(f"train.num_devices is {num_devices} but only {len(devices)} devices are visible; "
                         f"lower it or set it to 0 to use them all")
    if num_devices and num_devices != len(devices) and jax.process_count() > 1:
        raise ValueError(f"train.num_devices is {num_devices}, but a run of {jax.process_count()} processes uses "
                         f"every process's devices ({len(devices)}); set train.num_devices=0")
    chosen = devices[:num_devices] if num_devices else devices
    sizes = parse_mesh(spec, len(chosen))
    shape = tuple(sizes[name] for name in AXES)
    return Mesh(np.asarray(chosen).reshape(shape), AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch is split (the product of the batch axes)."""
    return math.prod(mesh.shape.get(name, 1) for name in BATCH_AXES)


def is_data_parallel(mesh: Mesh) -> bool:
    """True when every mesh axis other than `data` has size 1: parameters are replicated everywhere."""
    return all(size == 1 for name, size in mesh.shape.items() if name != DATA_AXIS)


def spec(logical: tuple[str | None, ...], mesh: Mesh | None = None, shape: tuple[int, ...] | None = None) -> P:
    """The PartitionSpec of an array whose dimensions have the `logical` names, by `RULES`.

    A mesh axis is used once per array (the first dimension that asks for it keeps it). With `mesh` and
    `shape`, mesh axes of size 1 are left out and a dimension that the axis does not divide raises ValueError.
    """
    used: set[str] = set()
    out = []
    for i, name in enumerate(logical):
        target = RULES[name] if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape.get(a, 1) > 1))
        if mesh is not None and shape is not None and axes:
            ways = math.prod(mesh.shape[a] for a in axes)
            if shape[i] % ways:
                raise ValueError(f"dimension {i} ({name}, size {shape[i]}) does not split over mesh axes "
                                 f"{'x'.join(axes)} ({ways} devices)")
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def logical_shardings(logical_tree, abstract_tree, mesh: Mesh):
    """NamedShardings for the arrays of `abstract_tree` (shapes), their dimensions named by `logical_tree`
    (a tree of tuples of the same structure)."""
    return jax.tree.map(lambda names, leaf: NamedSharding(mesh, spec(tuple(names), mesh, tuple(leaf.shape))),
                        logical_tree, abstract_tree, is_leaf=lambda x: isinstance(x, tuple))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device (scalars, metrics; parameters on a data-parallel mesh)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    """Sharding of a batch array: its `batch_axis` dimension split over the batch axes (`data` x `fsdp`)."""
    return NamedSharding(mesh, P(*([None] * batch_axis), batch_axes(mesh)))


def batch_axes(mesh: Mesh) -> str | tuple[str, ...] | None:
    """The mesh axes the batch is split over, as a PartitionSpec entry (size-1 axes left out)."""
    axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
    return None if not axes else axes[0] if len(axes) == 1 else axes


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


def put_global(tree, shardings):
    """`tree`'s arrays placed by `shardings` (a tree of the same structure, or one sharding for all). Several
    processes: each fills its own devices from its host copy (all processes must hold the same values)."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    if all(s.is_fully_addressable for s in jax.tree.leaves(shardings)):
        return jax.device_put(tree, shardings)

    def place(leaf, target):
        host = np.asarray(jax.device_get(leaf))
        return jax.make_array_from_callback(host.shape, target, lambda index: host[index], dtype=host.dtype)

    return jax.tree.map(place, tree, shardings)


def to_host(array: jax.Array) -> np.ndarray:
    """The whole of a (possibly sharded) device array as numpy, in every process (several processes: an
    all-gather of the parts the others hold)."""
    if not isinstance(array, jax.Array) or array.is_fully_addressable or array.is_fully_replicated:
        return np.asarray(jax.device_get(array))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


# --- activation constraints -------------------------------------------------------------------------------
# The model calls `constrain` on its hidden states; it does something only while a step is traced for an
# SPMD-partitioned mesh (`partitioned(mesh)`), so the model itself never needs to know about meshes.

_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("jaxllm_partitioned_mesh", default=None)


@contextlib.contextmanager
def partitioned(mesh: Mesh | None):
    """While tracing inside this context, `constrain` pins activations to `mesh` (None: a no-op context)."""
    token = _MESH.set(mesh if mesh is not None and mesh.size > 1 else None)
    try:
        yield
    finally:
        _MESH.reset(token)


def constrain(x: jax.Array, logical: tuple[str | None, ...]) -> jax.Array:
    """`x` with its dimensions pinned to the mesh axes of their `logical` names (inside `partitioned`)."""
    mesh = _MESH.get()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(logical, mesh)))


def describe(mesh: Mesh) -> str:
    """"data:2,fsdp:4,tensor:1" for messages and metadata."""
    return ",".join(f"{name}:{mesh.shape[name]}" for name in AXES)


def tree_bytes_per_device(tree: Any) -> int:
    """Bytes of `tree`'s arrays held by one device (the first addressable one's shards)."""
    device = None
    total = 0
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            device = device or shard.device
            if shard.device == device:
                total += shard.data.nbytes
    return total
