"""Llama/Qwen/Mistral/Gemma 3 and MoE (Qwen3-MoE, Mixtral, gpt-oss) decoders in Flax NNX, with Hugging Face safetensors import and export (hf_export.py).

    import jsft.models as jm
    model = jm.from_pretrained("hf_dir", dtype="float32")
    logits = model(input_ids)             # int [B, T] -> [B, T, V]
    jm.save_pretrained(model, "out_dir")  # transformers loads it back unchanged
"""

from __future__ import annotations

import os
from typing import Optional

import jax.numpy as jnp
from jax.sharding import Mesh

from jsft.models import hf_io
from jsft.models.config import ModelConfig
from jsft.models.decoder import Decoder, init_cache
from jsft.models.hf_export import ARCHITECTURES, save_pretrained
from jsft.models.params import abstract_model, flat_params, init_model, model_bytes, replace_params, sharding_for

__all__ = [
    "Decoder", "ModelConfig", "from_pretrained", "save_pretrained", "init_model", "init_cache", "model_bytes",
    "flat_params",
]


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype="bfloat16",
    param_dtype="float32",
    mesh: Optional[Mesh] = None,
    remat_policy: str = "none",
    attention_impl: str = "auto",
    sequence_parallel: str = "ulysses",
) -> Decoder:
    """Load an HF checkpoint directory (safetensors, single file or sharded) straight into sharded arrays.

    `dtype` is the compute dtype, `param_dtype` the stored one. Under `mesh`, every parameter is created
    with its FSDP sharding and each device reads only its own slice from the memory-mapped files."""
    cfg = ModelConfig.from_pretrained(str(path))
    files = hf_io.SafetensorsDir(path)
    prefix = hf_io.text_prefix(cfg, files.names())
    hf_io.check_names(cfg, files.names(), path, prefix)
    if cfg.text_of is not None:
        print(f"{path}: a multimodal {cfg.text_of} checkpoint: loading its text stack ({prefix}*); the vision "
              f"tower is not loaded, and exports are {ARCHITECTURES[cfg.model_type]} text models")
    if cfg.quantization is not None:
        print(f"{path}: {cfg.model_type} experts stored as {cfg.quantization}: dequantized to {param_dtype} on import "
              "(exports are unquantized)")
    abstract = abstract_model(
        cfg, dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy, attention_impl=attention_impl,
        sequence_parallel=sequence_parallel,
    )
    keys = hf_io.keys_by_param(hf_io.key_table(cfg, prefix))
    values = {}
    for name, var in flat_params(abstract).items():
        values[name] = hf_io.load_array(
            keys[name], files, var.shape, sharding_for(var, mesh), jnp.dtype(param_dtype), cfg.num_layers
        )
    return replace_params(abstract, values)
