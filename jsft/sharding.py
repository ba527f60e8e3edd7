"""The device mesh and the ONE table from logical axis names to mesh axes.

This is the only module that names mesh axes. Parameters declare logical axes (vocab, embed, heads, ...);
`param_spec` turns them into a PartitionSpec: FSDP puts the `fsdp` mesh axis on the first listed logical
axis whose size it divides, and replicates small tensors (norm scales, biases) and tensors where nothing
divides. XLA then inserts the all-gathers and reduce-scatters.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")

# logical axis -> mesh axes it may be sharded over, in priority order for parameters: `embed` first, then
# the larger inner dimensions. `layers`, `head_dim` and `norm` stay replicated (the scan slices `layers`).
PARAM_RULES: dict[str, tuple[str, ...]] = {
    "embed": ("fsdp",),
    "mlp": ("fsdp",),
    "vocab": ("fsdp",),
    "heads": ("fsdp",),
    "kv_heads": ("fsdp",),
}
# activations: the batch is split over every data-parallel axis; everything else is replicated.
ACTIVATION_RULES: dict[str, tuple[str, ...]] = {"batch": ("data", "fsdp")}

# tensors smaller than this are replicated: sharding them saves nothing and costs a collective each
MIN_SHARDED_ELEMENTS = 1 << 12


def make_mesh(axes: Mapping[str, int], devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A mesh over all devices (of every process); one axis may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    unknown = set(axes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; supported: {', '.join(MESH_AXES)}")
    sizes = {name: int(axes.get(name, 1)) for name in MESH_AXES}
    free = [n for n, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {free}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(f"{len(devices)} devices cannot be split into mesh {dict(axes)}")
        sizes[free[0]] = len(devices) // fixed
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, {len(devices)} are available")
    shape = tuple(sizes[n] for n in MESH_AXES)
    # Auto axes: shardings are annotations and XLA's partitioner places the collectives.
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, auto, devices=devices)


def param_spec(logical_axes: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec for a parameter: each mesh axis goes to the first logical axis (in PARAM_RULES order)
    that it divides; a mesh axis is never used twice; small tensors are replicated."""
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {logical_axes} do not match shape {shape}")
    spec: list[Optional[str]] = [None] * len(shape)
    if math.prod(shape) < MIN_SHARDED_ELEMENTS:
        return P(*spec)
    used: set[str] = set()
    for name, mesh_axes in PARAM_RULES.items():
        if name not in logical_axes:
            continue
        dim = logical_axes.index(name)
        for mesh_axis in mesh_axes:
            size = mesh.shape[mesh_axis]
            if mesh_axis in used or spec[dim] is not None or size == 1:
                continue
            if shape[dim] % size == 0:
                spec[dim] = mesh_axis
                used.add(mesh_axis)
    return P(*spec)


def param_sharding(logical_axes, shape, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, param_spec(logical_axes, shape, mesh))


def activation_spec(logical_axes: Sequence[Optional[str]]) -> P:
    """PartitionSpec for an activation or batch array, e.g. ("batch", None) for [B, T] token ids."""
    return P(*[ACTIVATION_RULES.get(a) if a else None for a in logical_axes])


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, activation_spec(("batch",) + (None,) * (ndim - 1)))


def data_parallel_size(mesh: Mesh) -> int:
    """Devices the batch dimension is split over (rows of a micro-batch must be a multiple of it)."""
    return int(np.prod([mesh.shape[a] for a in ACTIVATION_RULES["batch"]]))


def constrain(x: jax.Array, logical_axes: Sequence[Optional[str]]) -> jax.Array:
    """Pin an activation's sharding at a block boundary when a mesh is active (`jax.set_mesh`) and the
    batch divides the data-parallel devices; a no-op otherwise (single device, eager tests)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = activation_spec(logical_axes)
    for dim, axes in enumerate(spec):
        if axes and x.shape[dim] % math.prod(mesh.shape[a] for a in axes):
            return x
    return jax.lax.with_sharding_constraint(x, spec)
