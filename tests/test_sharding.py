"""Mesh choice and the no-silent-replication check, on the parameter shapes of real models (pure sharding
specs from the layout: no array, any device count)."""

import math

import jax
import pytest

from jsft import plan, sharding
from jsft.config import load_config
from jsft.models.params import param_layout
from jsft.sharding import MAX_REPLICATED_ELEMENTS, auto_mesh_shape, check_layout, make_mesh, param_spec
from jsft.train.setup import model_config


def layout_of(preset):
    cfg = load_config(None, [f"model.init={plan._yaml_inline(plan.PRESETS[preset])}"])
    return param_layout(model_config(cfg))


@pytest.fixture(scope="module")
def layouts():
    return {name: layout_of(name) for name in ("qwen2.5-7b", "llama-3.1-8b", "qwen2.5-32b", "llama-3.1-70b")}


def fsdp_dims(shape, axes, sizes):
    return [d for d, a in enumerate(param_spec(axes, shape, sizes)) if a == "fsdp"]


def can_split(shape, axes, f):
    """Independent of the rule table's order: some shardable dimension is a multiple of f."""
    return any(a in sharding.PARAM_RULES and n % f == 0 for a, n in zip(axes, shape))


@pytest.mark.parametrize("devices", [6, 12, 16, 24])
def test_auto_mesh_shards_every_large_tensor_with_the_largest_fsdp(layouts, devices):
    for name, layout in layouts.items():
        sizes, why = auto_mesh_shape(layout, devices)
        f = sizes["fsdp"]
        assert sizes["data"] * f == devices and f > 1, (name, sizes)
        large = {k: v for k, v in layout.items() if math.prod(v[0]) >= MAX_REPLICATED_ELEMENTS}
        for tensor, (shape, axes) in large.items():
            assert len(fsdp_dims(shape, axes, sizes)) == 1, (name, devices, tensor, shape)
        for bigger in (g for g in range(f + 1, devices + 1) if devices % g == 0):  # none larger would do
            assert any(not can_split(shape, axes, bigger) for shape, axes in large.values()), (name, bigger)
        assert f"mesh {{data: {sizes['data']}, fsdp: {f}}}" in why


def test_the_issue_meshes(layouts):
    """Llama-3.1-8B and Qwen2.5-7B: 4096 / 3584 hidden and 32 / 28 heads are no multiples of 3, so 24 devices
    take HSDP {data: 3, fsdp: 8}; 16 devices stay plain FSDP."""
    for name in ("llama-3.1-8b", "qwen2.5-7b"):
        assert auto_mesh_shape(layouts[name], 24)[0] == {"data": 3, "fsdp": 8}
        assert auto_mesh_shape(layouts[name], 16)[0] == {"data": 1, "fsdp": 16}
    assert auto_mesh_shape(layouts["qwen2.5-7b"], 6)[0] == {"data": 3, "fsdp": 2}
    assert auto_mesh_shape(layouts["qwen2.5-32b"], 32)[0] == {"data": 1, "fsdp": 32}
    assert auto_mesh_shape(layouts["llama-3.1-70b"], 64)[0] == {"data": 1, "fsdp": 64}
    why = auto_mesh_shape(layouts["llama-3.1-8b"], 24)[1]
    assert "fsdp=12 would leave layers/" in why and "HSDP" in why


@pytest.mark.parametrize("devices", [6, 12, 24])
def test_an_explicit_mesh_that_cannot_shard_a_large_tensor_is_an_error(layouts, devices):
    with pytest.raises(ValueError) as e:
        check_layout(layouts["llama-3.1-8b"], {"data": 1, "fsdp": devices})
    msg = str(e.value)
    good = auto_mesh_shape(layouts["llama-3.1-8b"], devices)[0]
    assert f"trainer.mesh {{data: 1, fsdp: {devices}}} cannot shard layers/" in msg  # the mesh and the tensor
    assert "[32, " in msg  # its shape
    assert f"{{data: {good['data']}, fsdp: {good['fsdp']}}}" in msg  # a mesh that works
    check_layout(layouts["llama-3.1-8b"], good)
    # the spec itself refuses too, for any caller that skipped the up-front check
    shape, axes = layouts["llama-3.1-8b"]["layers/q_proj"]
    with pytest.raises(ValueError, match="replicated on every device"):
        param_spec(axes, shape, {"data": 1, "fsdp": devices})


def test_small_tensors_may_stay_whole(layouts):
    """Qwen2.5-7B's q bias [28 layers, 28 heads, 128] on 8 devices: replicated (0.1M elements), not an error."""
    shape, axes = layouts["qwen2.5-7b"]["layers/q_bias"]
    assert math.prod(shape) < MAX_REPLICATED_ELEMENTS
    assert fsdp_dims(shape, axes, {"data": 1, "fsdp": 8}) == []
    assert auto_mesh_shape(layouts["qwen2.5-7b"], 8)[0] == {"data": 1, "fsdp": 8}


def test_mesh_values_are_checked():
    for bad, match in (({"tensor": 2}, "unknown mesh axes"), ({"data": -1, "fsdp": -1}, "only one"),
                       ({"fsdp": 0}, ">= 1"), ("fsdp", "write auto or a mapping")):
        with pytest.raises(ValueError, match=match):
            load_config(None, [f"trainer.mesh={bad}"] if isinstance(bad, str) else
                        ["trainer.mesh={" + ", ".join(f"{k}: {v}" for k, v in bad.items()) + "}"])
    assert load_config(None, []).trainer.mesh == "auto"
    assert sharding.mesh_sizes({"data": 3, "fsdp": -1}, 24) == {"data": 3, "fsdp": 8}


def test_a_constraint_that_cannot_apply_is_reported_once_and_refused_when_large(caplog):
    """Rows that do not divide the 8 data-parallel devices cannot be pinned: a small activation is logged once
    and left to XLA; a large one (its replicated copy would decide the run's memory) raises."""
    import logging

    import jax.numpy as jnp

    from jsft import sharding

    mesh = make_mesh({"data": 1, "fsdp": -1})

    def pinned(shape):
        with jax.set_mesh(mesh):
            return jax.eval_shape(lambda x: sharding.constrain(x, ("batch", None)), jax.ShapeDtypeStruct(shape, jnp.float32))

    with caplog.at_level(logging.INFO, logger="jsft.sharding"):
        pinned((3, 5))
        pinned((3, 5))
    assert sum("cannot be split" in r.message for r in caplog.records) == 1
    pinned((8, 5))  # divides: constrained, nothing to say
    with pytest.raises(ValueError, match=r"activation \[3, 134217728\] .* cannot be split"):
        pinned((3, 1 << 27))
