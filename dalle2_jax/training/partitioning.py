"""The device mesh and the one place where logical axis names map to mesh axes."""

from __future__ import annotations

from typing import Any

import jax
import flax.linen as nn
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dalle2_jax.training.config import mesh_shape

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Params shard their `embed`/`channels_in` dims over fsdp (FSDP) and their
# heads/mlp/vocab/channels_out dims over tensor (tensor parallelism); the batch goes over data and fsdp.
# flax skips a mesh axis already used by an earlier dim of the same array, so activations
# [batch, length, embed] become (('data', 'fsdp'), None, None).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("channels_in", "fsdp"),
    ("channels_out", "tensor"),
    ("height", None),
    ("width", None),
    ("layers", None),
)


def make_mesh(config, devices: list | None = None) -> Mesh:
    """Builds the ('data', 'fsdp', 'tensor') mesh from config.mesh with Auto axis types."""
    devices = devices if devices is not None else jax.devices()
    shape = mesh_shape(config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def data_parallel_mesh(devices: list | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with every device on `data` (for sharded sampling)."""
    devices = devices if devices is not None else jax.devices()
    return jax.make_mesh((len(devices), 1, 1), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drops mesh axes from dims they do not divide evenly (e.g. a 3-channel conv input on fsdp=4)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        size = int(np.prod([mesh.shape[a] for a in names]))
        out.append(axes if dim % size == 0 else None)
    return P(*out)


def strip_boxes(tree: Any) -> Any:
    """Removes flax partitioning boxes without applying sharding constraints (for abstract trees)."""
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x, tree,
                        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def logical_shardings(abstract_boxed: Any, mesh: Mesh) -> Any:
    """Shardings for a tree of (possibly logically boxed) abstract arrays, fitted to their shapes."""
    specs = nn.get_partition_spec(abstract_boxed)
    unboxed = strip_boxes(abstract_boxed)
    mesh_specs = nn.logical_to_mesh(specs, LOGICAL_RULES)

    def one(spec, leaf):
        spec = spec if isinstance(spec, P) else P()
        return NamedSharding(mesh, _fit_spec(spec, tuple(leaf.shape), mesh))

    return jax.tree.map(one, mesh_specs, unboxed, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a global batch array of rank `ndim`: leading dim over ('data', 'fsdp')."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, P())


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Turns this process's slice of the batch into global arrays laid out over the batch axes."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in local.items()}


def batch_parallelism(mesh: Mesh) -> int:
    """How many ways the batch axes ('data', 'fsdp') split a batch."""
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


def round_batch(batch_size: int, mesh: Mesh | None) -> int:
    """`batch_size` rounded up to a multiple of the mesh's batch parallelism (one row per device at least)."""
    if mesh is None:
        return batch_size
    k = batch_parallelism(mesh)
    return max(k, -(-batch_size // k) * k)


def shard_rows(mesh: Mesh | None, *arrays: np.ndarray) -> list:
    """Host arrays (the same on every process) -> global arrays with the leading dim over the batch axes,
    so a jitted function runs each device on its rows; unchanged when `mesh` is None."""
    if mesh is None:
        return list(arrays)
    return [jax.device_put(a, batch_sharding(mesh, np.ndim(a))) for a in arrays]


def to_host(x: Any) -> np.ndarray:
    """A (possibly multi-host, sharded) array -> the whole value as numpy on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
