"""The device mesh and the ONE table from logical axis names to mesh axes.

This is the only module that names mesh axes. Parameters declare logical axes (vocab, embed, heads, ...);
`param_spec` turns them into a PartitionSpec: FSDP puts the `fsdp` mesh axis on the first listed logical
axis whose size it divides, and replicates small tensors (norm scales, biases). A tensor of
MAX_REPLICATED_ELEMENTS or more that no listed dimension lets `fsdp` divide is an error, never a quiet
full copy on every device. XLA then inserts the all-gathers and reduce-scatters.

The mesh is `{data: D, fsdp: F, sequence: S, expert: E}`: parameters are sharded over the F*S*E devices
of an fsdp group (fsdp, sequence and expert together, so parameter memory does not grow with S or E) and
replicated over the D groups (HSDP; D=1 is plain FSDP); a mixture of experts' expert weights are split by
expert over `expert` and over the F*S devices of the rest of the group inside (torchtitan's
"dp_shard_mod_ep"). The rows of a batch are split over the D*F*E devices, and each row's tokens over the S
devices of the `sequence` axis (Ulysses, jsft/models/ulysses.py). `trainer.mesh: auto` picks the largest F
that divides the devices (over S and E) and shards every large tensor; S is 1 unless asked; E is chosen by
jsft/train/setup.py (auto_expert_size) for a mixture of experts, 1 for a dense model.
"""

from __future__ import annotations

import logging
import math
from typing import Mapping, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "sequence", "expert")
# axes shown and written only when they split something (size > 1), and never -1
INNER_AXES = ("sequence", "expert")
AUTO = "auto"  # trainer.mesh value: choose {data, fsdp} from the parameter shapes (auto_mesh_shape)

# logical axis -> mesh axes it may be sharded over, in priority order for parameters: `embed` first, then
# the larger inner dimensions. `layers`, `head_dim` and `norm` stay replicated (the scan slices `layers`).
PARAM_RULES: dict[str, tuple[str, ...]] = {
    "embed": ("fsdp",),
    "mlp": ("fsdp",),
    "vocab": ("fsdp",),
    "heads": ("fsdp",),
    "kv_heads": ("fsdp",),
    "experts": ("expert",),  # a mixture of experts' expert weights (jsft/models/moe.py), split by expert
}
# activations: the batch is split over every data-parallel axis; everything else is replicated, except
# `replica_batch` + `embed`: rows over data, hidden over fsdp x expert (the embedding lookup's layout,
# decoder.py: the table's hidden dimension is split over that part of the fsdp group, so the lookup is local).
# `length`: a row's tokens over the sequence axis (size 1 unless trainer.mesh.sequence > 1).
ACTIVATION_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"), "replica_batch": ("data",), "embed": ("fsdp", "expert"), "length": ("sequence",),
}

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
    """An explicit trainer.mesh's sizes per axis (an axis left out is 1; at most one -1), or ValueError.
    A mapping that names only `sequence` leaves data and fsdp to `auto` (see make_mesh)."""
    if not isinstance(axes, Mapping):
        raise ValueError(f"trainer.mesh={axes!r}: write {AUTO} or a mapping such as {{data: 3, fsdp: 8}}")
    unknown = set(axes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; supported: {', '.join(MESH_AXES)}")
    # sequence / expert only when named: a {data, fsdp} mesh reads back as written
    sizes = {name: int(axes.get(name, 1)) for name in MESH_AXES if name not in INNER_AXES or name in axes}
    free = [n for n, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {free}")
    if any(s < 1 for n, s in sizes.items() if n not in free):
        raise ValueError(f"trainer.mesh sizes must be >= 1, or -1 for the rest; got {dict(axes)}")
    for name in INNER_AXES:
        if sizes.get(name) == -1:
            raise ValueError(f"trainer.mesh.{name} must be a size (e.g. 4), not -1")
    return sizes


def split_inner(axes) -> tuple[Union[str, dict], int, int]:
    """(data/fsdp part of trainer.mesh, sequence size S, expert size E): `auto` or a mapping naming only
    `sequence` / `expert` becomes (auto, S, E), so `trainer.mesh.expert=4` keeps the automatic data/fsdp."""
    if axes == AUTO:
        return AUTO, 1, 1
    sizes = check_mesh_axes(axes)
    s, e = sizes.pop("sequence", 1), sizes.pop("expert", 1)
    return (AUTO if set(axes) <= set(INNER_AXES) else sizes), s, e


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
    """A mesh over all devices (of every process). `axes`: `auto`, or {data, fsdp, sequence} sizes (one of
    data/fsdp may be -1; only `sequence` given: data/fsdp auto over the rest). With `params` (the model's
    layout), `auto` chooses the HSDP shape from it and an explicit mesh is checked against it (ValueError
    naming a tensor it cannot shard); without, `auto` puts every device on fsdp. `log` receives a line
    saying which mesh and why."""
    devices = list(devices if devices is not None else jax.devices())
    axes, seq, experts = split_inner(axes)
    if len(devices) % seq:
        raise ValueError(f"trainer.mesh.sequence={seq} does not divide the {len(devices)} devices")
    if len(devices) % (seq * experts):
        raise ValueError(f"trainer.mesh.expert={experts} does not divide the {len(devices) // seq} devices")
    n = len(devices) // experts  # the expert axis is a batch axis too: data/fsdp are chosen over the rest
    if axes == AUTO and params is None:
        sizes = {"data": 1, "fsdp": n // seq, "sequence": seq, "expert": experts}
        why = f"mesh {_mesh_text(sizes)} (auto without parameter shapes: every other device on fsdp)"
    elif axes == AUTO:
        sizes, why = auto_mesh_shape(params, len(devices), seq, experts)
    else:
        sizes = {**mesh_sizes(axes, n // seq), "sequence": seq, "expert": experts}
        if params is not None:
            check_layout(params, sizes)
        checked = ": every large tensor splits over fsdp" if params is not None else ""
        why = f"mesh {_mesh_text(sizes)} (trainer.mesh={dict(axes)}{checked})"
    if log is not None:
        log(why)
    shape = tuple(sizes.get(n, 1) for n in MESH_AXES)
    # Auto axes: shardings are annotations and XLA's partitioner places the collectives.
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    # jax.devices() order (host by host), sequence then fsdp the fastest axes: a sequence group (its
    # all-to-alls in every layer) and an fsdp group are one host's devices when they divide the devices per
    # host, so Ulysses' and HSDP's collectives stay within a host
    return jax.make_mesh(shape, MESH_AXES, auto, devices=devices)


def _fsdp_group(sizes: Mapping[str, int], logical_axes: Sequence[Optional[str]] = ()
                ) -> tuple[Union[str, tuple[str, ...]], int]:
    """The mesh axes a parameter is sharded over in place of `fsdp`, and their device count: fsdp, plus
    sequence and expert where they split something, so those devices hold different parameter shards, not
    copies. A tensor with an `experts` dimension leaves `expert` out: that axis splits its experts."""
    axes = ["fsdp"] + [a for a in INNER_AXES if sizes.get(a, 1) > 1 and not (a == "expert" and "experts" in logical_axes)]
    size = math.prod(sizes.get(a, 1) for a in axes)
    return (axes[0] if len(axes) == 1 else tuple(axes)), size


def _place(logical_axes: Sequence[Optional[str]], shape: Sequence[int], sizes: Mapping[str, int]) -> list:
    """Each mesh axis on the first logical axis (in PARAM_RULES order) that it divides, never used twice;
    `fsdp` stands for the fsdp group (_fsdp_group)."""
    spec: list[Optional[str]] = [None] * len(shape)
    if math.prod(shape) < MIN_SHARDED_ELEMENTS:
        return spec
    used: set[str] = set()
    for name, mesh_axes in PARAM_RULES.items():
        if name not in logical_axes:
            continue
        dim = logical_axes.index(name)
        for mesh_axis in mesh_axes:
            placed, size = _fsdp_group(sizes, logical_axes) if mesh_axis == "fsdp" else (mesh_axis, sizes[mesh_axis])
            if mesh_axis in used or spec[dim] is not None or size == 1:
                continue
            if shape[dim] % size == 0:
                spec[dim] = placed
                used.add(mesh_axis)
    return spec


def left_whole(logical_axes, shape, sizes: Mapping[str, int]) -> bool:
    """True when a large tensor would be replicated over a real (size > 1) fsdp group."""
    sizes = _sizes(sizes)
    placed, size = _fsdp_group(sizes, logical_axes)
    spec = _place(logical_axes, shape, sizes)
    return size > 1 and math.prod(shape) >= MAX_REPLICATED_ELEMENTS and placed not in spec


def param_spec(logical_axes: Sequence[Optional[str]], shape: Sequence[int], mesh: MeshSizes) -> P:
    """PartitionSpec for a parameter (see `_place`); small tensors are replicated, a large one that cannot
    be split over fsdp raises (check_layout names it and the meshes that would work, before any work)."""
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {logical_axes} do not match shape {shape}")
    sizes = _sizes(mesh)
    if left_whole(logical_axes, shape, sizes):
        raise ValueError(f"a parameter {list(shape)} {tuple(logical_axes)} cannot be split over fsdp group={_fsdp_group(sizes, logical_axes)[1]} "
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
            return _describe(name, shape, logical_axes, _fsdp_group(_sizes(sizes), logical_axes)[1])
    return None


def _with_inner(sizes: dict[str, int], seq: int, expert: int = 1) -> dict[str, int]:
    return {**sizes, **({"sequence": seq} if seq > 1 else {}), **({"expert": expert} if expert > 1 else {})}


def working_meshes(params: Layout, n_devices: int, seq: int = 1, expert: int = 1) -> list[dict[str, int]]:
    """Every {data, fsdp} (with `sequence: seq` / `expert: expert` when > 1) over `n_devices` that splits
    each large tensor over the fsdp group, largest fsdp first."""
    out, rows = [], n_devices // (seq * expert)
    for f in sorted((f for f in range(1, rows + 1) if rows % f == 0), reverse=True):
        sizes = _with_inner({"data": rows // f, "fsdp": f}, seq, expert)
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
    good = ", ".join(_mesh_text(m) for m in working_meshes(params, n, sizes.get("sequence", 1), sizes.get("expert", 1))[:3])
    raise ValueError(
        f"trainer.mesh {_mesh_text(sizes)} cannot shard {bad}: every device would hold a full copy. "
        f"Meshes over {n} devices that shard every tensor: {good} (or trainer.mesh={AUTO})"
    )


def auto_mesh_shape(params: Layout, n_devices: int, seq: int = 1, expert: int = 1) -> tuple[dict[str, int], str]:
    """({data, fsdp} (+ sequence / expert when > 1), why): the largest fsdp that divides
    `n_devices / (seq * expert)` and splits every large tensor over the fsdp group (the parameters then take
    1/(fsdp*seq*expert) of their size per device); the remaining factor replicates over data."""
    rows = n_devices // (seq * expert)
    meshes = working_meshes(params, n_devices, seq, expert)  # fsdp=1 always works at seq=expert=1
    if not meshes:
        raise ValueError(f"no mesh over {n_devices} devices with sequence={seq}, expert={expert} splits every large "
                         f"tensor: {first_left_whole(params, _with_inner({'data': rows, 'fsdp': 1}, seq, expert))}")
    sizes = meshes[0]
    why = (f"mesh {_mesh_text(sizes)} (trainer.mesh={AUTO}): the largest fsdp dividing {rows} devices "
           f"that splits every parameter of >= {MAX_REPLICATED_ELEMENTS} elements")
    if sizes["fsdp"] < rows:
        bigger = min(f for f in range(sizes["fsdp"] + 1, rows + 1) if rows % f == 0)
        why += (f"; fsdp={bigger} would leave "
                f"{first_left_whole(params, _with_inner({'data': rows // bigger, 'fsdp': bigger}, seq, expert))} whole; "
                f"parameters are replicated over data={sizes['data']} groups (HSDP)")
    return sizes, why


def _mesh_text(sizes: Mapping[str, int]) -> str:
    shown = [n for n in MESH_AXES if n not in INNER_AXES or sizes.get(n, 1) > 1]  # sequence/expert when used
    return "{" + ", ".join(f"{n}: {sizes.get(n, 1)}" for n in shown) + "}"


def param_sharding(logical_axes, shape, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, param_spec(logical_axes, shape, mesh))


def activation_spec(logical_axes: Sequence[Optional[str]]) -> P:
    """PartitionSpec for an activation or batch array, e.g. ("batch", None) for [B, T] token ids."""
    return P(*[ACTIVATION_RULES.get(a) if a else None for a in logical_axes])


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows split over the data-parallel devices, the rest replicated (generation's prompts)."""
    return NamedSharding(mesh, activation_spec(("batch",) + (None,) * (ndim - 1)))


def row_sharding(mesh: Mesh) -> NamedSharding:
    """A training micro-batch field [rows, length or target slots]: rows over the data-parallel devices,
    the second axis over `sequence` (so its size must be a multiple of S: jsft/data/batch.py)."""
    return NamedSharding(mesh, activation_spec(("batch", "length")))


def mesh_sizes_of(mesh: Mesh) -> dict[str, int]:
    """{axis: size} for reports, `sequence` / `expert` only when used (as trainer.mesh is written)."""
    return {n: int(mesh.shape[n]) for n in MESH_AXES if n not in INNER_AXES or mesh.shape[n] > 1}


def expert_size(mesh) -> int:
    """E: the devices a mixture of experts' experts are split over (1 without expert parallelism)."""
    return int(mesh.shape.get("expert", 1))


def sequence_size(mesh: Mesh) -> int:
    """S: the devices one row's tokens are split over (1 without sequence parallelism)."""
    return int(mesh.shape.get("sequence", 1))


def data_parallel_size(mesh: Mesh) -> int:
    """Devices the batch dimension is split over (rows of a micro-batch must be a multiple of it)."""
    return int(np.prod([mesh.shape[a] for a in ACTIVATION_RULES["batch"]]))


def constrain(x: jax.Array, logical_axes: Sequence[Optional[str]], via: Optional[Sequence[Optional[str]]] = None):
    """Pin an activation's sharding at a block boundary when a mesh is active (`jax.set_mesh`); a no-op
    without one (single device, eager tests). A dimension its mesh axes do not divide (generation's single
    rows, a decode step's one token on a sequence-split mesh) cannot be constrained: logged once per shape
    and left to XLA, and an error for a tensor of MAX_UNCONSTRAINED_ELEMENTS or more, whose layout decides
    the run's memory (a training micro-batch always divides: jsft/data/batch.py). `via`: a layout to pass
    through first (where it divides), which steers the backward's resharding (the embedding lookup, decoder.py)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = activation_spec(logical_axes)
    if not _divides(x, spec, mesh):
        _cannot_constrain(x, logical_axes, mesh)
        return x
    if via is not None and _divides(x, activation_spec(via), mesh):
        x = jax.lax.with_sharding_constraint(x, activation_spec(via))
    return jax.lax.with_sharding_constraint(x, spec)


# an activation this large whose layout cannot be pinned is an error, not a note: replicated, it would
# take a full copy on every device (1 GiB in fp32)
MAX_UNCONSTRAINED_ELEMENTS = 1 << 28
_reported: set = set()


def _cannot_constrain(x, logical_axes, mesh) -> None:
    sizes = {a: int(mesh.shape[a]) for a in mesh.axis_names}
    what = (f"activation {list(x.shape)} {tuple(logical_axes)} cannot be split as "
            f"{activation_spec(logical_axes)} over mesh {sizes}: a dimension is not a multiple of its devices")
    if math.prod(x.shape) >= MAX_UNCONSTRAINED_ELEMENTS:
        raise ValueError(what + "; make the batch rows a multiple of the data-parallel devices "
                                "and the row length a multiple of trainer.mesh.sequence")
    key = (tuple(x.shape), tuple(logical_axes), tuple(sorted(sizes.items())))
    if key not in _reported:
        _reported.add(key)
        logger.info("%s; its layout is left to XLA", what)


def _divides(x, spec: P, mesh) -> bool:
    for dim, axes in enumerate(spec):
        axes = (axes,) if isinstance(axes, str) else axes  # P may store a 1-tuple as its name
        if axes and x.shape[dim] % math.prod(mesh.shape[a] for a in axes):
            return False
    return True
