"""The device mesh and the ONE table from logical axis names to mesh axes.

This is the only module that names mesh axes. Parameters declare logical axes (vocab, embed, heads, ...);
`param_spec` turns them into a PartitionSpec: FSDP puts the `fsdp` mesh axis on the first listed logical
axis whose size it divides, and replicates small tensors (norm scales, biases). A tensor of
MAX_REPLICATED_ELEMENTS or more that no listed dimension lets `fsdp` divide is an error, never a quiet
full copy on every device. XLA then inserts the all-gathers and reduce-scatters.

The mesh is `{data: D, fsdp: F}`: parameters are sharded over the F devices of an fsdp group and
replicated over the D groups (HSDP; D=1 is plain FSDP), the batch is split over all D*F devices.
`trainer.mesh: auto` picks the largest F that divides the device count and shards every large tensor.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
AUTO = "auto"  # trainer.mesh value: choose {data, fsdp} from the parameter shapes (auto_mesh_shape)

# logical axis -> mesh axes it may be sharded over, in priority order for parameters: `embed` first, then
# the larger inner dimensions. `layers`, `head_dim` and `norm` stay replicated (the scan slices `layers`).
PARAM_RULES: dict[str, tuple[str, ...]] = {
    "embed": ("fsdp",),
    "mlp": ("fsdp",),
    "vocab": ("fsdp",),
    "heads": ("fsdp",),
    "kv_heads": ("fsdp",),
}
# activations: the batch is split over every data-parallel axis; everything else is replicated, except
# `replica_batch` + `embed`: rows over data, hidden over fsdp (the embedding lookup's layout, decoder.py).
ACTIVATION_RULES: dict[str, tuple[str, ...]] = {"batch": ("data", "fsdp"), "replica_batch": ("data",), "embed": ("fsdp",)}

# tensors smaller than this are replicated: sharding them saves nothing and costs a collective each
MIN_SHARDED_ELEMENTS = 1 << 12
# a tensor this large must be split over fsdp: replicated, each element costs 16 bytes on every device
# (fp32 parameter, gradient accumulator, two Adam moments). Stacked norm scales and q/k/v biases of the
# models jsft plans for stay below it (Llama-3.1-70B's [80, 8192] norms: 0.66M elements).
MAX_REPLICATED_ELEMENTS = 1 << 20

# name -> (shape, logical axes) of every parameter (jsft.models.params.param_layout)
Layout = Mapping[str, tuple[Sequence[int], Sequence[Optional[str]]]]
MeshSizes = Union[Mesh, Mapping[str, int]]


def _sizes(mesh: MeshSizes) -> dict[str, int]:
    shape = mesh.shape if isinstance(mesh, Mesh) else mesh
    return {name: int(shape.get(name, 1)) for name in MESH_AXES}


def check_mesh_axes(axes) -> dict[str, int]:
    """An explicit trainer.mesh's sizes per axis (an axis left out is 1; at most one -1), or ValueError."""
    if not isinstance(axes, Mapping):
        raise ValueError(f"trainer.mesh={axes!r}: write {AUTO} or a mapping such as {{data: 3, fsdp: 8}}")
    unknown = set(axes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; supported: {', '.join(MESH_AXES)}")
    sizes = {name: int(axes.get(name, 1)) for name in MESH_AXES}
    free = [n for n, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {free}")
    if any(s < 1 for n, s in sizes.items() if n not in free):
        raise ValueError(f"trainer.mesh sizes must be >= 1, or -1 for the rest; got {dict(axes)}")
    return sizes


def mesh_sizes(axes: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """An explicit trainer.mesh resolved for `n_devices` (the -1 axis takes the rest)."""
    sizes = check_mesh_axes(axes)
    fixed = math.prod(s for s in sizes.values() if s != -1)
    free = [n for n, s in sizes.items() if s == -1]
    if free:
        if n_devices % fixed:
            raise ValueError(f"{n_devices} devices cannot be split into mesh {dict(axes)}")
        sizes[free[0]] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, {n_devices} are available")
    return sizes


def make_mesh(
    axes: Union[str, Mapping[str, int]] = AUTO,
    devices: Optional[Sequence[jax.Device]] = None,
    params: Optional[Layout] = None,
    log=None,
) -> Mesh:
    """A mesh over all devices (of every process). `axes`: `auto`, or {data, fsdp} sizes (one may be -1).
    With `params` (the model's layout), `auto` chooses the HSDP shape from it and an explicit mesh is
    checked against it (ValueError naming a tensor it cannot shard); without, `auto` puts every device on
    fsdp. `log` receives a line saying which mesh and why."""
    devices = list(devices if devices is not None else jax.devices())
    if axes == AUTO and params is None:
        sizes = {"data": 1, "fsdp": len(devices)}
        why = f"mesh {_mesh_text(sizes)} (auto without parameter shapes: every device on fsdp)"
    elif axes == AUTO:
        sizes, why = auto_mesh_shape(params, len(devices))
    else:
        sizes = mesh_sizes(axes, len(devices))
        if params is not None:
            check_layout(params, sizes)
        checked = ": every large tensor splits over fsdp" if params is not None else ""
        why = f"mesh {_mesh_text(sizes)} (trainer.mesh={dict(axes)}{checked})"
    if log is not None:
        log(why)
    shape = tuple(sizes[n] for n in MESH_AXES)
    # Auto axes: shardings are annotations and XLA's partitioner places the collectives.
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    # jax.devices() order (host by host), fsdp the fastest axis: an fsdp group is one host's devices when
    # F divides the devices per host, so HSDP's parameter all-gathers stay within a host
    return jax.make_mesh(shape, MESH_AXES, auto, devices=devices)


def _place(logical_axes: Sequence[Optional[str]], shape: Sequence[int], sizes: Mapping[str, int]) -> list:
    """Each mesh axis on the first logical axis (in PARAM_RULES order) that it divides, never used twice."""
    spec: list[Optional[str]] = [None] * len(shape)
    if math.prod(shape) < MIN_SHARDED_ELEMENTS:
        return spec
    used: set[str] = set()
    for name, mesh_axes in PARAM_RULES.items():
        if name not in logical_axes:
            continue
        dim = logical_axes.index(name)
        for mesh_axis in mesh_axes:
            size = sizes[mesh_axis]
            if mesh_axis in used or spec[dim] is not None or size == 1:
                continue
            if shape[dim] % size == 0:
                spec[dim] = mesh_axis
                used.add(mesh_axis)
    return spec


def left_whole(logical_axes, shape, sizes: Mapping[str, int]) -> bool:
    """True when a large tensor would be replicated over a real (size > 1) fsdp axis."""
    spec = _place(logical_axes, shape, sizes)
    return sizes["fsdp"] > 1 and math.prod(shape) >= MAX_REPLICATED_ELEMENTS and "fsdp" not in spec


def param_spec(logical_axes: Sequence[Optional[str]], shape: Sequence[int], mesh: MeshSizes) -> P:
    """PartitionSpec for a parameter (see `_place`); small tensors are replicated, a large one that cannot
    be split over fsdp raises (check_layout names it and the meshes that would work, before any work)."""
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {logical_axes} do not match shape {shape}")
    sizes = _sizes(mesh)
    if left_whole(logical_axes, shape, sizes):
        raise ValueError(f"a parameter {list(shape)} {tuple(logical_axes)} cannot be split over fsdp={sizes['fsdp']} "
                         f"and would be replicated on every device: use a mesh whose fsdp size divides one of "
                         f"its {', '.join(a for a in logical_axes if a in PARAM_RULES)} dimensions "
                         f"(jsft.sharding.auto_mesh_shape / trainer.mesh={AUTO} finds one)")
    return P(*_place(logical_axes, shape, sizes))


def _describe(name: str, shape, logical_axes, fsdp: int) -> str:
    dims = ", ".join(f"{a} {n}" for a, n in zip(logical_axes, shape) if a in PARAM_RULES)
    return f"{name} {list(shape)} ({dims or 'no shardable dimension'}; none a multiple of {fsdp})"


def first_left_whole(params: Layout, sizes: Mapping[str, int]) -> Optional[str]:
    """The first large tensor that this mesh would replicate over fsdp, described; None when all split."""
    for name, (shape, logical_axes) in params.items():
        if left_whole(logical_axes, shape, sizes):
            return _describe(name, shape, logical_axes, sizes["fsdp"])
    return None


def working_meshes(params: Layout, n_devices: int) -> list[dict[str, int]]:
    """Every {data, fsdp} over `n_devices` that splits each large tensor over fsdp, largest fsdp first."""
    out = []
    for f in sorted((f for f in range(1, n_devices + 1) if n_devices % f == 0), reverse=True):
        sizes = {"data": n_devices // f, "fsdp": f}
        if first_left_whole(params, sizes) is None:
            out.append(sizes)
    return out


def check_layout(params: Layout, sizes: Mapping[str, int]) -> None:
    """Raise, naming the tensor, its shape, the mesh and meshes that would work, when `sizes` would
    replicate a tensor of MAX_REPLICATED_ELEMENTS or more over fsdp."""
    bad = first_left_whole(params, sizes)
    if bad is None:
        return
    n = math.prod(sizes.values())
    good = ", ".join(_mesh_text(m) for m in working_meshes(params, n)[:3])
    raise ValueError(
        f"trainer.mesh {_mesh_text(sizes)} cannot shard {bad}: every device would hold a full copy. "
        f"Meshes over {n} devices that shard every tensor: {good} (or trainer.mesh={AUTO})"
    )


def auto_mesh_shape(params: Layout, n_devices: int) -> tuple[dict[str, int], str]:
    """({data, fsdp}, why): the largest fsdp that divides `n_devices` and splits every large tensor (the
    parameters then take 1/fsdp of their size per device); the remaining factor replicates over data."""
    sizes = working_meshes(params, n_devices)[0]  # fsdp=1 always works
    why = (f"mesh {_mesh_text(sizes)} (trainer.mesh={AUTO}): the largest fsdp dividing {n_devices} devices "
           f"that splits every parameter of >= {MAX_REPLICATED_ELEMENTS} elements")
    if sizes["fsdp"] < n_devices:
        bigger = min(f for f in range(sizes["fsdp"] + 1, n_devices + 1) if n_devices % f == 0)
        why += (f"; fsdp={bigger} would leave "
                f"{first_left_whole(params, {'data': n_devices // bigger, 'fsdp': bigger})} whole; "
                f"parameters are replicated over data={sizes['data']} groups (HSDP)")
    return sizes, why


def _mesh_text(sizes: Mapping[str, int]) -> str:
    return "{" + ", ".join(f"{n}: {sizes[n]}" for n in MESH_AXES) + "}"


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


def constrain(x: jax.Array, logical_axes: Sequence[Optional[str]], via: Optional[Sequence[Optional[str]]] = None):
    """Pin an activation's sharding at a block boundary when a mesh is active (`jax.set_mesh`) and the
    batch divides the data-parallel devices; a no-op otherwise (single device, eager tests, generation's
    single rows). `via`: a layout to pass through first (where it divides), which steers the backward's
    resharding (see the embedding lookup in decoder.py)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not _divides(x, activation_spec(logical_axes), mesh):
        return x
    if via is not None and _divides(x, activation_spec(via), mesh):
        x = jax.lax.with_sharding_constraint(x, activation_spec(via))
    return jax.lax.with_sharding_constraint(x, activation_spec(logical_axes))


def _divides(x, spec: P, mesh) -> bool:
    for dim, axes in enumerate(spec):
        axes = (axes,) if isinstance(axes, str) else axes  # P may store a 1-tuple as its name
        if axes and x.shape[dim] % math.prod(mesh.shape[a] for a in axes):
            return False
    return True
