"""Creating models whose parameters are born sharded: random init, HF import, and per-parameter shardings."""

from __future__ import annotations

from typing import Optional

import jax
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from jsft.models.config import ModelConfig
from jsft.models.decoder import Decoder
from jsft.sharding import param_sharding


def abstract_model(cfg: ModelConfig, **decoder_kwargs) -> Decoder:
    """The model with ShapeDtypeStruct leaves: no memory, no compute."""
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), **decoder_kwargs))


def flat_params(model: Decoder) -> dict[str, nnx.Variable]:
    """'layers/q_proj' -> Variable, for every parameter."""
    return {"/".join(map(str, path)): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def param_layout(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple]]:
    """'layers/q_proj' -> (shape, logical axes) of every parameter, from the config alone (no memory):
    what jsft.sharding needs to choose and check a mesh before the model exists."""
    return {name: (tuple(v.shape), tuple(v.logical_axes)) for name, v in flat_params(abstract_model(cfg)).items()}


def sharding_for(var: nnx.Variable, mesh: Optional[Mesh]):
    """A parameter's sharding from its logical axes (one device when there is no mesh)."""
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    return param_sharding(var.logical_axes, var.shape, mesh)


def param_shardings(model: Decoder, mesh: Optional[Mesh]) -> dict:
    """'layers/q_proj' -> sharding, matching `param_arrays(model)`; for jit in/out shardings."""
    return {name: sharding_for(var, mesh) for name, var in flat_params(model).items()}


def param_arrays(model: Decoder) -> dict[str, jax.Array]:
    """'layers/q_proj' -> array: the flat parameter dict that training, checkpoints and export pass around
    (ShapeDtypeStructs for an abstract model, which `var[...]` cannot index)."""
    return {name: var.get_value() for name, var in flat_params(model).items()}


def init_model(cfg: ModelConfig, *, seed: int = 0, mesh: Optional[Mesh] = None, **decoder_kwargs) -> Decoder:
    """A randomly initialised model, created inside jit so each device materialises only its shard."""
    abstract = abstract_model(cfg, **decoder_kwargs)

    def make():
        return param_arrays(Decoder(cfg, rngs=nnx.Rngs(seed), **decoder_kwargs))

    return replace_params(abstract, jax.jit(make, out_shardings=param_shardings(abstract, mesh))())


def replace_params(template: Decoder, values: dict[str, jax.Array]) -> Decoder:
    """A new model like `template` whose parameters are `values` (keyed by flat path); `template` is left
    untouched, so this also works inside jit with traced values."""
    graphdef, state = nnx.split(template)
    flat = [(path, var.replace(values["/".join(map(str, path))])) for path, var in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def array_bytes(tree) -> tuple[int, dict]:
    """(total bytes, bytes on each local device) of a pytree of jax arrays; non-arrays are skipped."""
    total, per_device = 0, {}
    for x in jax.tree.leaves(tree):
        if not hasattr(x, "addressable_shards"):
            continue
        total += x.size * x.dtype.itemsize
        for shard in x.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.size * x.dtype.itemsize
    return total, per_device


def model_bytes(model: Decoder) -> tuple[int, dict]:
    """Total parameter bytes and bytes on each device."""
    return array_bytes(param_arrays(model))
