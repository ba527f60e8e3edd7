"""LoRA: low-rank adapters on the decoder's projections, with PEFT adapter directories in and out.

Each adapted projection W [*in, *out] (jsft layout) gets a [*in, r] and b [r, *out]; the layer computes

    y = x @ W + scale * (x @ a) @ b,    scale = alpha / r   (alpha / sqrt(r) with use_rslora)

exactly as PEFT's `base(x) + lora_B(lora_A(x)) * scaling`. PEFT stores lora_A.weight [r, in] and
lora_B.weight [out, r] (torch Linear layout), so a = lora_A.T and b = lora_B.T, reshaped into jsft's named
axes: the same "linear" layout as the base weights in hf_io's key table, which drives reading and writing
adapters too. Merging gives the HF weight W_hf + scale * lora_B @ lora_A (= (W + scale * a @ b).T).

The adapters are `nnx.LoRAParam`s named 'lora_a/<proj>' and 'lora_b/<proj>' in the flat parameter dict;
`trainable_names` selects them, so the train step differentiates and optimises only those.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jsft.config import LORA_TARGET_MODULES as TARGET_MODULES  # noqa: F401 (lora's own name for them)
from jsft.config import lora_enabled as enabled
from jsft.config import lora_targets as resolve_targets
from jsft.models import hf_io
from jsft.models.config import ModelConfig
from jsft.models.decoder import Decoder
from jsft.models.params import abstract_model, flat_params, param_arrays, replace_params, sharding_for

PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM wraps the HF model twice
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_ADAPTER_PREFIXES = ("lora_a/", "lora_b/")


@dataclass(frozen=True)
class LoraSpec:
    """What the decoder needs to build and apply adapters (hashable: it is part of the model structure)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    use_rslora: bool = False
    dtype: str = "float32"  # adapter parameters (and their optimizer state)

    @property
    def scale(self) -> float:
        """PEFT's scaling: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


# ---- from the run config ---------------------------------------------------------------------------------------


def spec_from_run_config(run_model) -> Optional[LoraSpec]:
    """The LoRA spec of a run (None: full fine-tuning). With model.lora_adapter_path, the adapter's
    adapter_config.json gives rank, alpha, targets and use_rslora; model.lora_rank must then be 0 or agree."""
    if not enabled(run_model):
        return None
    if run_model.lora_adapter_path:
        spec = read_adapter_config(run_model.lora_adapter_path, dtype=run_model.param_dtype)
        if run_model.lora_rank not in (0, spec.rank):
            raise ValueError(
                f"model.lora_rank={run_model.lora_rank} but the adapter at {run_model.lora_adapter_path} has "
                f"r={spec.rank}: set model.lora_rank={spec.rank} (or 0 to take the adapter's)"
            )
        return spec
    return LoraSpec(
        rank=int(run_model.lora_rank), alpha=float(run_model.lora_alpha),
        targets=resolve_targets(run_model.target_modules), use_rslora=bool(run_model.use_rslora),
        dtype=run_model.param_dtype,
    )


def base_param_dtype(run_model) -> str:
    """The dtype the (frozen) base parameters are stored in."""
    if enabled(run_model) and run_model.frozen_param_dtype:
        return run_model.frozen_param_dtype
    return run_model.param_dtype


# ---- PEFT adapter directories ------------------------------------------------------------------------------------

# adapter_config.json values jsft's adapters cannot represent: key -> the value jsft needs
_PEFT_REQUIRED = {
    "peft_type": "LORA", "bias": "none", "fan_in_fan_out": False, "use_dora": False, "lora_bias": False,
    "layers_to_transform": None, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
}


def read_adapter_config(path, dtype: str = "float32") -> LoraSpec:
    """LoraSpec from a PEFT adapter directory's adapter_config.json; what jsft cannot represent raises."""
    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(
            f"model.lora_adapter_path={path}: no {ADAPTER_CONFIG} (expected a PEFT adapter directory)"
        )
    conf = json.loads(file.read_text())
    for key, needed in _PEFT_REQUIRED.items():
        if key in conf and (conf[key] or None) != (needed or None):  # None, False and {} all mean "off"
            raise ValueError(f"{file}: {key}={conf[key]!r} is not supported by jsft's LoRA (it needs {needed!r})")
    targets = conf.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        raise ValueError(
            f"{file}: target_modules is a regular expression ({targets!r}); jsft reads lists of module names"
        )
    # peft saves `all-linear` expanded to full paths (model.layers.0.self_attn.q_proj): keep the module names
    short = "all-linear" if targets == "all-linear" else sorted({t.rsplit(".", 1)[-1] for t in targets or []})
    try:
        resolved = resolve_targets(short)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    return LoraSpec(rank=int(conf["r"]), alpha=float(conf["lora_alpha"]), targets=resolved,
                    use_rslora=bool(conf.get("use_rslora", False)), dtype=dtype)


def adapter_keys(cfg: ModelConfig, spec: LoraSpec) -> list[hf_io.Key]:
    """hf_io key-table rows of the adapters, derived from the base rows: HF name .weight -> .lora_A.weight
    (shape [r, in]) and .lora_B.weight ([out, r]), both in the torch Linear ("linear") layout."""
    base = {k.jsft: k for k in hf_io.key_table(cfg)}
    keys = []
    for name in spec.targets:
        key = base[f"layers/{name}"]
        out_dim, in_dim = key.hf_shape
        stem = PEFT_PREFIX + key.hf.removesuffix(".weight")
        keys.append(hf_io.Key(f"lora_a/{name}", stem + ".lora_A.weight", (spec.rank, in_dim), "linear"))
        keys.append(hf_io.Key(f"lora_b/{name}", stem + ".lora_B.weight", (out_dim, spec.rank), "linear"))
    return keys


def check_adapter(path, cfg: ModelConfig, spec: LoraSpec) -> None:
    """The adapter's tensors are exactly those of `spec` on this base model, with its shapes: an adapter
    trained for another base (other sizes or depth) fails here, before any weight is read."""
    files = hf_io.SafetensorsDir(path)
    keys = adapter_keys(cfg, spec)
    expected = {n: k.hf_shape for k in keys for n in hf_io.hf_tensor_names(k, cfg.num_layers)}
    names = files.names()
    missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
    if missing or extra:
        raise ValueError(
            f"{path}: the adapter does not match a {cfg.num_layers}-layer {cfg.model_type} base with targets "
            f"{list(spec.targets)}: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
            f"{extra[:3]}{'...' if len(extra) > 3 else ''} (is it an adapter for another base model?)"
        )
    for name, shape in expected.items():
        if files.shape(name) != shape:
            raise ValueError(
                f"{path}: {name} has shape {files.shape(name)}, this base model needs {shape}: the adapter "
                "was trained for another base model (model.path)"
            )


def save_adapter(model: Decoder, out_dir, *, base_model_name_or_path: Optional[str] = None) -> Path:
    """Write `model`'s adapters as a PEFT directory (adapter_config.json + adapter_model.safetensors) that
    `peft.PeftModel.from_pretrained(base, out_dir)` loads. Multi-host: every process calls it; process 0 writes."""
    from safetensors.numpy import save_file

    spec, cfg = _spec_of(model), model.config
    params = param_arrays(model)
    tensors = {}
    for key in adapter_keys(cfg, spec):
        for i in range(cfg.num_layers):  # one layer at a time, as the model export streams
            tensors[key.hf.format(i=i)] = hf_io.to_hf_layout(key, hf_io.gather_layer(params[key.jsft], i))
    out = Path(out_dir)
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        conf = {
            **_PEFT_REQUIRED, "r": spec.rank, "lora_alpha": spec.alpha, "target_modules": list(spec.targets),
            "use_rslora": spec.use_rslora, "lora_dropout": 0.0, "task_type": "CAUSAL_LM", "inference_mode": True,
            "init_lora_weights": True, "base_model_name_or_path": base_model_name_or_path,
        }
        (out / ADAPTER_CONFIG).write_text(json.dumps(conf, indent=2))
    return out


# ---- models with adapters ----------------------------------------------------------------------------------------


def _spec_of(model: Decoder) -> LoraSpec:
    if model.lora is None:
        raise ValueError("the model has no LoRA adapters (model.lora_rank=0)")
    return model.lora


def _decoder_kwargs(model: Decoder, **changes) -> dict:
    kw = dict(dtype=model.dtype, param_dtype=model.param_dtype, remat_policy=model.remat_policy,
              attention_impl=model.attention_impl, lora=model.lora, sequence_parallel=model.sequence_parallel)
    return {**kw, **changes}


def is_adapter(name: str) -> bool:
    return name.startswith(_ADAPTER_PREFIXES)


def trainable_names(model: Decoder) -> list[str]:
    """Flat names of the parameters training updates: the adapters (nnx.LoRAParam) when the model has
    them, else every parameter."""
    state = nnx.state(model, nnx.LoRAParam) if model.lora is not None else nnx.state(model, nnx.Param)
    return sorted("/".join(map(str, path)) for path, _ in nnx.to_flat_state(state))


def attach(model: Decoder, spec: LoraSpec, *, mesh=None, seed: int = 0, adapter_path=None) -> Decoder:
    """`model` with adapters added: read from a PEFT directory (each device reads its shard), or freshly
    initialised as PEFT does (a kaiming-uniform, b zeros: the model's outputs are unchanged)."""
    cfg = model.config
    abstract = abstract_model(cfg, **_decoder_kwargs(model, lora=spec))
    adapters = {n: v for n, v in flat_params(abstract).items() if is_adapter(n)}
    shardings = {n: sharding_for(v, mesh) for n, v in adapters.items()}
    if adapter_path:
        check_adapter(adapter_path, cfg, spec)
        files = hf_io.SafetensorsDir(adapter_path)
        keys = {k.jsft: k for k in adapter_keys(cfg, spec)}
        values = {
            n: hf_io.load_array(keys[n], files, v.shape, shardings[n], jnp.dtype(spec.dtype), cfg.num_layers)
            for n, v in adapters.items()
        }
    else:
        def make():  # the base's random init is traced too, and dropped by XLA as unused
            full = param_arrays(Decoder(cfg, rngs=nnx.Rngs(seed), **_decoder_kwargs(model, lora=spec)))
            return {n: full[n] for n in adapters}

        values = jax.jit(make, out_shardings=shardings)()
    return replace_params(abstract, {**param_arrays(model), **values})


def merged_params(params: dict, spec: LoraSpec, dtype) -> dict:
    """The flat base parameters with every adapter folded in, W + scale * a @ b (in float32, then `dtype`);
    traceable."""
    out = {n: v for n, v in params.items() if not is_adapter(n)}
    for name in spec.targets:
        w, a, b = params[f"layers/{name}"], params[f"lora_a/{name}"], params[f"lora_b/{name}"]
        layers, r = a.shape[0], spec.rank
        a2 = a.reshape(layers, -1, r).astype(jnp.float32)  # [L, in, r]
        b2 = b.reshape(layers, r, -1).astype(jnp.float32)  # [L, r, out]
        delta = jnp.einsum("lir,lro->lio", a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(w.shape)
        out[f"layers/{name}"] = w.astype(jnp.float32) + spec.scale * delta
    return {n: v.astype(dtype) for n, v in out.items()}


def merge(model: Decoder) -> Decoder:
    """A plain decoder (no adapters) computing what `model` computes: the weights to export to HF. Stored
    in the wider of the base and adapter dtypes, so a bf16 base does not round the update away here (the
    export casts to the checkpoint's dtype once)."""
    spec = _spec_of(model)
    dtype = jnp.promote_types(model.param_dtype, jnp.dtype(spec.dtype))
    base = abstract_model(model.config, **_decoder_kwargs(model, lora=None, param_dtype=dtype))
    params = param_arrays(model)
    shardings = {n: params[n].sharding for n in flat_params(base)}
    values = jax.jit(lambda p: merged_params(p, spec, dtype), out_shardings=shardings)(params)
    return replace_params(base, values)


def spec_to_json(spec: Optional[LoraSpec]) -> Optional[dict]:
    return None if spec is None else {**asdict(spec), "targets": list(spec.targets)}


def spec_from_json(d: Optional[dict]) -> Optional[LoraSpec]:
    return None if d is None else LoraSpec(**{**d, "targets": tuple(d["targets"])})
