"""Llama/Qwen/Mistral/Gemma 3 decoders in Flax NNX, with Hugging Face safetensors import and export.

    import jsft.models as jm
    model = jm.from_pretrained("hf_dir", dtype="float32")
    logits = model(input_ids)             # int [B, T] -> [B, T, V]
    jm.save_pretrained(model, "out_dir")  # transformers loads it back unchanged
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jsft.models import hf_io
from jsft.models.config import GEMMA, ModelConfig
from jsft.models.decoder import Decoder, init_cache
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
              f"tower is not loaded, and exports are {_ARCHITECTURES[cfg.model_type]} text models")
    abstract = abstract_model(
        cfg, dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy, attention_impl=attention_impl,
        sequence_parallel=sequence_parallel,
    )
    keys = {k.jsft: k for k in hf_io.key_table(cfg, prefix)}
    values = {}
    for name, var in flat_params(abstract).items():
        values[name] = hf_io.load_array(
            keys[name], files, var.shape, sharding_for(var, mesh), jnp.dtype(param_dtype), cfg.num_layers
        )
    return replace_params(abstract, values)


def save_pretrained(
    model: Decoder,
    out_dir: str | os.PathLike,
    *,
    dtype=None,
    max_shard_size="5GB",
    tokenizer=None,
    generation_config: Optional[dict] = None,
    readme: Optional[str] = None,
) -> Path:
    """Write config.json, generation_config.json, tokenizer files (a tokenizer object or directory, when
    given), README.md (`readme`, when given) and HF-named safetensors shards with their index. `dtype`
    defaults to the source checkpoint's dtype (for imported models) or the parameter dtype.
    `generation_config` (a dict) replaces the one derived from the model config. Multi-host: every process
    calls it; process 0 writes. Device memory beyond the parameters stays near one layer's largest tensor
    (hf_io.hf_tensors)."""
    from safetensors.numpy import save_file

    cfg = model.config
    dtype = jnp.dtype(dtype or cfg.torch_dtype or model.param_dtype)
    out = Path(out_dir)
    writer = jax.process_index() == 0
    if writer and cfg.text_of is not None:
        print(f"exporting the text stack of a multimodal {cfg.text_of} model as a {_ARCHITECTURES[cfg.model_type]} "
              f"text model (model_type {cfg.model_type}; no vision tower) to {out}")
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        _write_configs(cfg, out, dtype, tokenizer, generation_config)
        if readme is not None:
            (out / "README.md").write_text(readme)
    plan, sharded = hf_io.shard_plan(cfg, dtype, max_shard_size)
    remaining = {f: sum(1 for v in plan.values() if v == f) for f in set(plan.values())}
    pending: dict[str, dict[str, np.ndarray]] = {}
    params = {name: var[...] for name, var in flat_params(model).items()}
    # streams: one layer at a time comes to this host, a shard is written once its last tensor arrived
    for name, tensor in hf_io.hf_tensors(cfg, params, dtype):
        file = plan[name]
        remaining[file] -= 1
        if not writer:
            continue  # the other processes only take part in the gathers
        pending.setdefault(file, {})[name] = tensor
        if remaining[file] == 0:
            save_file(pending.pop(file), str(out / file), metadata={"format": "pt"})
    if writer and sharded:
        total = sum(int(np.prod(k.hf_shape)) * (cfg.num_layers if k.per_layer else 1) for k in hf_io.key_table(cfg))
        index = {"metadata": {"total_size": total * dtype.itemsize}, "weight_map": dict(sorted(plan.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def _write_configs(cfg: ModelConfig, out: Path, dtype, tokenizer, generation_config: Optional[dict]) -> None:
    import transformers

    hf_config = cfg.to_hf()
    hf_config.dtype = str(dtype)
    hf_config.architectures = [_ARCHITECTURES[cfg.model_type]]
    hf_config.save_pretrained(out)
    _add_legacy_fields(out / "config.json", cfg, dtype)
    if generation_config is not None:
        transformers.GenerationConfig(**generation_config).save_pretrained(out)
    elif cfg.eos_token_id is not None or cfg.bos_token_id is not None:
        transformers.GenerationConfig.from_model_config(hf_config).save_pretrained(out)
    if tokenizer is not None:
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer))
        tokenizer.save_pretrained(out)


def _add_legacy_fields(path: Path, cfg: ModelConfig, dtype) -> None:
    """transformers 5 writes `rope_parameters` and `dtype`; 4.x (still pinned by many serving stacks) reads
    `rope_theta`, `rope_scaling` and `torch_dtype`, and would silently fall back to its defaults. Write both."""
    config = json.loads(path.read_text())
    config["rope_theta"] = cfg.rope_theta
    config["rope_scaling"] = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    if cfg.model_type in GEMMA:  # 4.x reads the sliding layers' theta from here
        config["rope_local_base_freq"] = cfg.sliding_rope_theta or cfg.rope_theta
    config["torch_dtype"] = str(jnp.dtype(dtype))
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
