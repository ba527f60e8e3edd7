"""ModelConfig: the decoder's hyperparameters, read from a Hugging Face config and written back.

One decoder covers Llama 2/3/3.1/3.2, Qwen2/2.5, Qwen3 and Mistral-style configs. Anything the decoder
does not implement (sliding windows, unknown rope types, MLP biases, other activations) raises here,
so an unsupported checkpoint never trains silently wrong.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import transformers

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[tuple] = None  # HF rope parameters (sorted key/value pairs) for linear / llama3
    qkv_bias: bool = False  # Qwen2, or Llama with attention_bias
    o_bias: bool = False  # Llama with attention_bias
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Any = None
    torch_dtype: Optional[str] = None  # the checkpoint's weight dtype: the default export dtype

    # ---- Hugging Face <-> jsft ----------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: transformers.PretrainedConfig) -> "ModelConfig":
        mt = hf.model_type
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type '{mt}' is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act '{act}' is not supported (only silu)")
        if getattr(hf, "mlp_bias", False):
            raise ValueError("mlp_bias=true is not supported")
        _check_no_sliding_window(hf)
        rope_theta, rope_scaling = _rope_from_hf(hf)
        attention_bias = bool(getattr(hf, "attention_bias", False))
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        return cls(
            model_type=mt,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            qkv_bias=mt == "qwen2" or attention_bias,
            o_bias=mt in ("llama", "qwen3") and attention_bias,
            qk_norm=mt == "qwen3",
            tie_word_embeddings=bool(hf.tie_word_embeddings),
            max_position_embeddings=hf.max_position_embeddings,
            bos_token_id=getattr(hf, "bos_token_id", None),
            eos_token_id=getattr(hf, "eos_token_id", None),
            pad_token_id=getattr(hf, "pad_token_id", None),
            # transformers 5 names it `dtype` (its `torch_dtype` property only warns); 4.x stores `torch_dtype`
            torch_dtype=_dtype_name(getattr(hf, "dtype", None) or vars(hf).get("torch_dtype")),
        )

    @classmethod
    def from_init(cls, fields: dict) -> "ModelConfig":
        """From HF config fields including `model_type` (random-init models), with the family's defaults."""
        fields = dict(fields)
        if "model_type" not in fields:
            raise ValueError("model.init needs a model_type (one of: " + ", ".join(SUPPORTED_MODEL_TYPES) + ")")
        return cls.from_hf(transformers.AutoConfig.for_model(fields.pop("model_type"), **fields))

    @classmethod
    def from_pretrained(cls, path: str) -> "ModelConfig":
        return cls.from_hf(load_hf_config(path))

    def to_hf(self) -> transformers.PretrainedConfig:
        """A transformers config describing this decoder (for random-init models and exports)."""
        if self.model_type == "qwen2" and not self.qkv_bias:
            raise ValueError("Qwen2 always has q/k/v biases; a qwen2 config without them cannot be exported")
        if self.model_type == "qwen3" and self.qkv_bias != self.o_bias:
            raise ValueError("Qwen3's attention_bias covers q/k/v and o together")
        if self.qk_norm != (self.model_type == "qwen3"):
            raise ValueError("q/k RMSNorm is only expressible as model_type qwen3")
        kwargs = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta, **dict(self.rope_scaling or ())},
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            hidden_act="silu",
        )
        if self.model_type in ("llama", "qwen3"):
            kwargs["attention_bias"] = self.qkv_bias
        if self.model_type == "mistral" and (self.qkv_bias or self.o_bias):
            raise ValueError("Mistral has no attention biases")
        if self.model_type == "llama" and self.qkv_bias != self.o_bias:
            raise ValueError("Llama's attention_bias covers q/k/v and o together")
        if self.model_type == "mistral":
            kwargs["sliding_window"] = None
        return transformers.AutoConfig.for_model(self.model_type, **kwargs)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- derived quantities ---------------------------------------------------------------------------------

    def inv_freq(self) -> np.ndarray:
        """Rotary inverse frequencies [H/2] in float32, as transformers computes them."""
        exponents = np.arange(0, self.head_dim, 2, dtype=np.int64).astype(np.float32) / self.head_dim
        inv = 1.0 / (self.rope_theta**exponents)
        scaling = dict(self.rope_scaling or ())
        kind = scaling.get("rope_type", "default")
        if kind == "linear":
            inv = inv / scaling["factor"]
        elif kind == "llama3":
            inv = _llama3_inv_freq(inv, scaling)
        return inv.astype(np.float32)

    def num_params(self) -> int:
        d, f, n, k, h = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * n * h * 2 + d * k * h * 2 + (n * h + 2 * k * h if self.qkv_bias else 0) + (d if self.o_bias else 0)
        per_layer = attn + 3 * d * f + 2 * d + (2 * h if self.qk_norm else 0)
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + d

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), matmuls plus causal attention."""
        d, f, n, k, h = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
        matmul_params = self.num_layers * (d * n * h * 2 + d * k * h * 2 + 3 * d * f) + self.vocab_size * d
        attention = self.num_layers * 2 * n * h * seq_len  # QK^T and PV, halved by the causal mask, x2 flops/MAC
        return 3 * (2 * matmul_params + attention)


def _dtype_name(dtype) -> Optional[str]:
    """'bfloat16' from a torch dtype or string (transformers records either)."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def load_hf_config(path: str) -> transformers.PretrainedConfig:
    """The checkpoint's config.json through transformers (fills the family defaults); never remote code, never
    a hub download: a path that is not a local checkpoint directory is a clear error."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory (jsft loads local checkpoints only)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    return transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)


def _check_no_sliding_window(hf: transformers.PretrainedConfig) -> None:
    window = getattr(hf, "sliding_window", None)
    if hf.model_type in ("qwen2", "qwen3") and not getattr(hf, "use_sliding_window", False):
        window = None
    layer_types = getattr(hf, "layer_types", None) or []
    if window is not None and window < hf.max_position_embeddings or "sliding_attention" in layer_types:
        raise ValueError(
            f"sliding-window attention (sliding_window={window}) is not supported; "
            "jsft implements full causal attention only"
        )


def _rope_from_hf(hf: transformers.PretrainedConfig) -> tuple[float, Optional[dict]]:
    if hasattr(hf, "standardize_rope_params"):
        hf.standardize_rope_params()
    params = dict(getattr(hf, "rope_parameters", None) or {})
    if not params:  # transformers 4.x layout
        params = dict(getattr(hf, "rope_scaling", None) or {})
        params["rope_theta"] = hf.rope_theta
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type '{kind}' is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    theta = float(params.pop("rope_theta"))
    params.pop("type", None)
    params.pop("partial_rotary_factor", None)
    if kind == "default":
        return theta, None
    params["rope_type"] = kind
    return theta, tuple(sorted(params.items()))  # hashable: the config is static data of the model


def _llama3_inv_freq(inv: np.ndarray, s: dict) -> np.ndarray:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled)
