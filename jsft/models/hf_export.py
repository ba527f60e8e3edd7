"""Writing a Hugging Face checkpoint directory, in one place: HF-named safetensors shards (through the key
table of hf_io.py, streamed one layer at a time), config.json, generation_config.json, the tokenizer and
the model card (README.md).

The generation config starts from the source checkpoint's (sampling defaults kept) and its `eos_token_id`
lists the stop tokens the run trained the model to end its turns with, so HF `generate` and vLLM stop where
training taught the model to stop (a base model's config says `<|endoftext|>`; a ChatML fine-tune ends its
turns with `<|im_end|>`). Both are computed at start-up and kept in every checkpoint's metadata, so
`python -m jsft.export` writes the same files as the end of training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from safetensors.numpy import save_file

from jsft.models import hf_io
from jsft.models.config import GEMMA, ModelConfig
from jsft.models.decoder import Decoder
from jsft.models.params import flat_params

GENERATION_CONFIG = "generation_config.json"


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
    (hf_io.hf_tensors). A quantized source (gpt-oss' MXFP4 experts) is exported unquantized in `dtype`."""
    cfg = model.config
    dtype = jnp.dtype(dtype or cfg.torch_dtype or model.param_dtype)
    out = Path(out_dir)
    writer = jax.process_index() == 0
    if cfg.quantization is not None:  # e.g. gpt-oss' MXFP4 experts: written dequantized, no quantization_config
        if writer:
            print(f"the source checkpoint stored its experts as {cfg.quantization}; exporting them unquantized in "
                  f"{dtype} (config.json without quantization_config: transformers loads {out} as a plain model)")
        cfg = cfg.replace(quantization=None)
    if writer and cfg.text_of is not None:
        print(f"exporting the text stack of a multimodal {cfg.text_of} model as a {ARCHITECTURES[cfg.model_type]} "
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
        total = sum(int(np.prod(k.hf_shape)) * len(hf_io.hf_tensor_names(k, cfg.num_layers)) for k in hf_io.key_table(cfg))
        index = {"metadata": {"total_size": total * dtype.itemsize}, "weight_map": dict(sorted(plan.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def _write_configs(cfg: ModelConfig, out: Path, dtype, tokenizer, generation_config: Optional[dict]) -> None:
    hf_config = cfg.to_hf()
    hf_config.dtype = str(dtype)
    hf_config.architectures = [ARCHITECTURES[cfg.model_type]]
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


ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
}


def generation_config(source_dirs: Sequence[Optional[str]], stop_ids: Sequence[int], model_cfg) -> dict:
    """The source's generation_config.json (the first dir that has one) with eos_token_id = the stop tokens."""
    base: dict = {}
    for d in source_dirs:
        if d and (Path(d) / GENERATION_CONFIG).is_file():
            base = json.loads((Path(d) / GENERATION_CONFIG).read_text())
            break
    base.pop("transformers_version", None)
    for name in ("bos_token_id", "pad_token_id"):
        if base.get(name) is None and getattr(model_cfg, name, None) is not None:
            base[name] = getattr(model_cfg, name)
    stops = list(dict.fromkeys(int(i) for i in stop_ids))
    if stops:
        base["eos_token_id"] = stops if len(stops) > 1 else stops[0]
    elif model_cfg.eos_token_id is not None:
        base.setdefault("eos_token_id", model_cfg.eos_token_id)
    return base


def model_card(cfg, step: int, metrics: Mapping[str, Any], stop_tokens: Sequence[str] = ()) -> str:
    """README.md of an export: base model, data, steps, final losses (what a reader needs to trust it)."""
    m, d, t = cfg.model, cfg.data, cfg.trainer
    base = m.path or "random initialisation (model.init)"
    total = t.total_training_steps or f"{t.total_epochs} epoch(s)"
    rows = [
        ("base model", f"`{base}`"),
        ("training data", _files(d.train_files)),
        ("validation data", _files(d.val_files)),
        ("optimizer steps", f"{step} (of {total}), {d.train_batch_size} samples per step, max_length {d.max_length}"),
        ("optimizer", f"AdamW lr {cfg.optim.lr:g}, {cfg.optim.lr_scheduler_type} schedule, loss {t.loss_agg_mode}"),
        ("final train loss", _number(metrics.get("train/loss"))),
        ("final val loss", _number(metrics.get("val/loss"))),
        ("stop tokens", ", ".join(f"`{s}`" for s in stop_tokens) or "-"),
    ]
    front = f"---\nlibrary_name: transformers\ntags: [jsft, sft]\nbase_model: {json.dumps(str(base))}\n---\n"
    table = "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    return (f"{front}\n# {t.experiment_name}\n\nSupervised fine-tune written by jsft (`python -m jsft.train`).\n\n{table}\n"
            "The tokenizer and its chat template are in this directory; `generation_config.json` stops on the "
            "stop tokens above.\n")


def _files(files: Any) -> str:
    if not files:
        return "-"
    items = [files] if isinstance(files, str) else list(files)
    return ", ".join(f"`{f}`" for f in items)


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"
