"""ModelConfig: the decoder's hyperparameters, read from a Hugging Face config and written back.

One decoder covers Llama 2/3/3.1/3.2, Qwen2/2.5, Qwen3, Mistral-style and Gemma 3 configs (`gemma3_text`, and
the text stack of multimodal `gemma3` checkpoints), and the mixtures of experts Qwen3-MoE, Mixtral and gpt-oss
(the MoE MLP of jsft/models/moe.py in their sparse layers; gpt-oss adds attention sinks, q/k/v/o biases and
alternating sliding/full layers). Anything the decoder does not implement (sliding windows outside Gemma 3 and
gpt-oss, unknown rope types, MLP biases, other activations, quantized checkpoints other than gpt-oss' MXFP4
experts) raises here, so an unsupported checkpoint never trains silently wrong.

Layers may differ in their attention: `layer_specs()` is the one place that turns the config into one
LayerSpec per layer (window, rope), which the decoder stacks into per-layer arrays of its scanned stack.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import transformers

from jsft.models.moe import MoeSpec, expert_hidden_size, sparse_layers

SUPPORTED_MODEL_TYPES = (
    "llama", "qwen2", "qwen3", "mistral", "gemma3_text", "gemma3", "qwen3_moe", "mixtral", "gpt_oss",
)
# mixtures of experts: the MLP of their sparse layers is jsft.models.moe
MOE = ("qwen3_moe", "mixtral", "gpt_oss")
# families whose layers differ by `layer_types` (sliding / full windows)
PER_LAYER_ATTENTION = ("gemma3_text", "gpt_oss")
# quantized checkpoints jsft reads (dequantized on import; exports are never quantized): family -> methods
QUANTIZATIONS = {"gpt_oss": ("mxfp4",)}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
FULL, SLIDING = "full_attention", "sliding_attention"  # HF's layer_types
# Gemma 3: (1 + w) RMSNorm, post-attention and pre/post-feed-forward norms, embeddings x sqrt(D), gelu-tanh
GEMMA = ("gemma3_text",)


@dataclass(frozen=True)
class LayerSpec:
    """One layer's attention: its kind, window (None: full causal) and rope."""

    kind: str  # FULL | SLIDING
    window: Optional[int]
    rope_theta: float
    rope_scaling: Optional[tuple]


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
    # per-layer attention (Gemma 3): layer kinds (None: all full), the sliding layers' window and rope
    layer_types: Optional[tuple] = None
    sliding_window: Optional[int] = None
    sliding_rope_theta: Optional[float] = None
    sliding_rope_scaling: Optional[tuple] = None
    query_pre_attn_scalar: Optional[float] = None  # attention scale = this ** -0.5 (None: head_dim ** -0.5)
    attn_logit_softcapping: Optional[float] = None  # c * tanh(scores / c), see `attention_softcap`
    final_logit_softcapping: Optional[float] = None  # c * tanh(logits / c)
    attention_sinks: bool = False  # one learned logit per query head joining the softmax denominator
    hidden_act: str = "silu"  # silu | gelu_pytorch_tanh
    text_of: Optional[str] = None  # "gemma3": the text stack of a multimodal checkpoint (exported as text-only)
    # mixture of experts (MOE families): what each sparse layer's MoE MLP computes, which layers are sparse
    # (the others keep the dense MLP of `intermediate_size`), and the HF fields written back on export
    moe: Optional[MoeSpec] = None
    moe_intermediate_size: Optional[int] = None  # each expert's MLP hidden size
    sparse_layers: Optional[tuple] = None  # one bool per layer
    mlp_only_layers: tuple = ()
    decoder_sparse_step: int = 1
    router_aux_loss_coef: float = 0.0
    output_router_logits: bool = False
    # how the checkpoint stores its weights: None, or "mxfp4" (gpt-oss' expert projections as blocks + scales,
    # dequantized on import); an export is always unquantized (hf_export.save_pretrained drops it)
    quantization: Optional[str] = None

    # ---- Hugging Face <-> jsft ----------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: transformers.PretrainedConfig) -> "ModelConfig":
        mt = hf.model_type
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type '{mt}' is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        outer, text_of = hf, None
        if mt == "gemma3":  # multimodal: its text stack (the vision tower is not loaded)
            hf, text_of, mt = hf.get_text_config(), "gemma3", "gemma3_text"
        gemma, oss = mt in GEMMA, mt == "gpt_oss"
        act = getattr(hf, "hidden_activation" if gemma else "hidden_act", "silu")
        if act not in (("gelu_pytorch_tanh",) if gemma else ("silu",)):
            raise ValueError(f"hidden_act '{act}' is not supported (only {'gelu_pytorch_tanh' if gemma else 'silu'} for {mt})")
        if getattr(hf, "mlp_bias", False):
            raise ValueError("mlp_bias=true is not supported")
        quantization = _quantization(hf)
        moe = _moe_fields(hf) if mt in MOE else {}
        if mt in PER_LAYER_ATTENTION:
            _check_layer_types(hf)
        else:
            _check_no_sliding_window(hf)
        if gemma:
            _check_gemma(hf)
        if oss:
            _check_gpt_oss(hf)
        rope = _rope_by_type(hf) if gemma else {FULL: _rope_from_hf(hf, None)}
        if oss:  # one rope for the sliding and the full layers
            rope[SLIDING] = rope[FULL]
        attention_bias = bool(getattr(hf, "attention_bias", False))
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        layer_types = tuple(hf.layer_types) if mt in PER_LAYER_ATTENTION else None
        sliding = layer_types is not None and SLIDING in layer_types
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
            rope_theta=rope[FULL][0],
            rope_scaling=rope[FULL][1],
            qkv_bias=mt == "qwen2" or attention_bias,
            o_bias=(mt in ("llama", "qwen3", "qwen3_moe", "gpt_oss") or gemma) and attention_bias,
            qk_norm=mt in ("qwen3", "qwen3_moe") or gemma,
            tie_word_embeddings=bool(outer.tie_word_embeddings),
            max_position_embeddings=hf.max_position_embeddings,
            # a multimodal config may carry the chat's stop tokens at its top level
            bos_token_id=_first_set(outer, hf, "bos_token_id"),
            eos_token_id=_first_set(outer, hf, "eos_token_id"),
            pad_token_id=_first_set(outer, hf, "pad_token_id"),
            # transformers 5 names it `dtype` (its `torch_dtype` property only warns); 4.x stores `torch_dtype`
            torch_dtype=_dtype_name(getattr(outer, "dtype", None) or vars(outer).get("torch_dtype")),
            layer_types=layer_types,
            sliding_window=hf.sliding_window if sliding else None,
            sliding_rope_theta=rope[SLIDING][0] if SLIDING in rope else None,
            sliding_rope_scaling=rope[SLIDING][1] if SLIDING in rope else None,
            query_pre_attn_scalar=hf.query_pre_attn_scalar if gemma else None,
            attn_logit_softcapping=getattr(hf, "attn_logit_softcapping", None),
            final_logit_softcapping=getattr(hf, "final_logit_softcapping", None),
            attention_sinks=oss,
            hidden_act=act,
            text_of=text_of,
            quantization=quantization,
            **moe,
        )

    @classmethod
    def from_init(cls, fields: dict) -> "ModelConfig":
        """From HF config fields including `model_type` (random-init models), with the family's defaults."""
        fields = dict(fields)
        if "model_type" not in fields:
            raise ValueError("model.init needs a model_type (one of: " + ", ".join(SUPPORTED_MODEL_TYPES) + ")")
        return cls.from_hf(transformers.AutoConfig.for_model(fields.pop("model_type"), **fields))

    @classmethod
    def from_dict(cls, fields: dict) -> "ModelConfig":
        """The inverse of `dataclasses.asdict` after a JSON round trip (a checkpoint's metadata): the tuple fields
        come back as tuples (hashable: the config is static data of the model), the MoE spec as a MoeSpec."""
        fields = dict(fields)
        for name in _TUPLE_FIELDS:
            if fields.get(name) is not None:
                fields[name] = _as_tuple(fields[name])
        if isinstance(fields.get("moe"), dict):
            fields["moe"] = MoeSpec(**fields["moe"])
        return cls(**fields)

    @classmethod
    def from_pretrained(cls, path: str) -> "ModelConfig":
        return cls.from_hf(load_hf_config(path))

    def to_hf(self) -> transformers.PretrainedConfig:
        """A transformers config describing this decoder (for random-init models and exports). The text stack
        of a multimodal gemma3 checkpoint becomes a text-only `gemma3_text` config."""
        if self.model_type in GEMMA:
            return self._gemma_to_hf()
        if self.model_type == "gpt_oss":
            return self._gpt_oss_to_hf()
        if self.layer_types is not None or self.attention_sinks or self.attn_logit_softcapping or self.final_logit_softcapping:
            raise ValueError(f"per-layer windows, sinks and softcaps are not expressible as model_type {self.model_type}")
        if self.model_type == "qwen2" and not self.qkv_bias:
            raise ValueError("Qwen2 always has q/k/v biases; a qwen2 config without them cannot be exported")
        if self.model_type in ("qwen3", "qwen3_moe") and self.qkv_bias != self.o_bias:
            raise ValueError("Qwen3's attention_bias covers q/k/v and o together")
        if self.qk_norm != (self.model_type in ("qwen3", "qwen3_moe")):
            raise ValueError("q/k RMSNorm is only expressible as model_type qwen3 / qwen3_moe")
        kwargs = dict(
            self._common_hf_fields(),
            rope_parameters=_rope_parameters(self.rope_theta, self.rope_scaling),
            hidden_act="silu",
        )
        if self.model_type in ("llama", "qwen3", "qwen3_moe"):
            kwargs["attention_bias"] = self.qkv_bias
        if self.model_type in ("mistral", "mixtral") and (self.qkv_bias or self.o_bias):
            raise ValueError("Mistral and Mixtral have no attention biases")
        kwargs.update(self._moe_hf_fields())
        if self.model_type == "llama" and self.qkv_bias != self.o_bias:
            raise ValueError("Llama's attention_bias covers q/k/v and o together")
        if self.model_type in ("mistral", "mixtral"):
            kwargs["sliding_window"] = None
        return transformers.AutoConfig.for_model(self.model_type, **kwargs)

    def _moe_hf_fields(self) -> dict:
        if self.moe is None:
            return {}
        common = dict(num_experts_per_tok=self.moe.top_k, router_aux_loss_coef=self.router_aux_loss_coef,
                      output_router_logits=self.output_router_logits)
        if self.model_type == "mixtral":
            return dict(common, num_local_experts=self.moe.num_experts, router_jitter_noise=0.0,
                        intermediate_size=self.moe_intermediate_size)
        return dict(common, num_experts=self.moe.num_experts, moe_intermediate_size=self.moe_intermediate_size,
                    norm_topk_prob=self.moe.norm_topk_prob, mlp_only_layers=list(self.mlp_only_layers),
                    decoder_sparse_step=self.decoder_sparse_step)

    def _common_hf_fields(self) -> dict:
        return dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )

    def _gemma_to_hf(self) -> transformers.PretrainedConfig:
        if self.qkv_bias != self.o_bias or not self.qk_norm or self.attention_sinks:
            raise ValueError("Gemma 3's attention_bias covers q/k/v and o together; it always has q/k norms, no sinks")
        layer_types = list(self.layer_types or (FULL,) * self.num_layers)
        return transformers.Gemma3TextConfig(
            **self._common_hf_fields(),
            hidden_activation=self.hidden_act,
            attention_bias=self.qkv_bias,
            layer_types=layer_types,
            sliding_window=self.sliding_window,
            rope_parameters={
                FULL: _rope_parameters(self.rope_theta, self.rope_scaling),
                SLIDING: _rope_parameters(self.sliding_rope_theta or self.rope_theta, self.sliding_rope_scaling),
            },
            query_pre_attn_scalar=self.query_pre_attn_scalar or self.head_dim,
            attn_logit_softcapping=self.attn_logit_softcapping,
            final_logit_softcapping=self.final_logit_softcapping,
        )

    def _gpt_oss_to_hf(self) -> transformers.PretrainedConfig:
        """A GptOssConfig; what it cannot express (no sinks, partial biases, q/k norms, a second rope for the
        sliding layers, a softcap, a router or experts other than gpt-oss') raises, naming the field."""
        spec = self.moe
        problems = [
            (not self.attention_sinks, "attention_sinks=False (gpt-oss always has sinks)"),
            (self.qkv_bias != self.o_bias, "qkv_bias != o_bias (attention_bias covers q/k/v and o together)"),
            (self.qk_norm, "qk_norm=True"),
            (self.attn_logit_softcapping or self.final_logit_softcapping, "a logit softcap"),
            ((self.sliding_rope_theta or self.rope_theta, self.sliding_rope_scaling)
             != (self.rope_theta, self.rope_scaling), "a sliding-layer rope different from the full layers'"),
            (spec is None or not all(self.layer_is_sparse()), "dense MLP layers"),
            (spec is not None and (spec.routing, spec.activation, spec.router_bias, spec.expert_bias)
             != ("topk_softmax", "gpt_oss", True, True), "a router or expert MLP other than gpt-oss'"),
        ]
        for bad, what in problems:
            if bad:
                raise ValueError(f"gpt_oss cannot express {what}")
        return transformers.GptOssConfig(
            **self._common_hf_fields(),
            hidden_act="silu",
            attention_bias=self.qkv_bias,
            layer_types=list(self.layer_types or (FULL,) * self.num_layers),
            sliding_window=self.sliding_window,
            rope_parameters=_rope_parameters(self.rope_theta, self.rope_scaling),
            num_local_experts=spec.num_experts,
            num_experts_per_tok=spec.top_k,
            swiglu_alpha=spec.swiglu_alpha,
            swiglu_limit=spec.swiglu_limit,
            router_aux_loss_coef=self.router_aux_loss_coef,
            output_router_logits=self.output_router_logits,
        )

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- derived quantities ---------------------------------------------------------------------------------

    def layer_specs(self) -> list[LayerSpec]:
        """One LayerSpec per layer: the one place that reads layer kinds, windows and per-kind rope."""
        specs = []
        for kind in self.layer_types or (FULL,) * self.num_layers:
            if kind == SLIDING:
                theta = self.sliding_rope_theta or self.rope_theta
                specs.append(LayerSpec(kind, self.sliding_window, theta, self.sliding_rope_scaling))
            else:
                specs.append(LayerSpec(kind, None, self.rope_theta, self.rope_scaling))
        return specs

    @property
    def has_window(self) -> bool:
        return any(spec.window is not None for spec in self.layer_specs())

    @property
    def norm_offset(self) -> float:
        """Gemma's RMSNorm multiplies by (1 + w): stored weights are offsets from 1 (and initialised at 0)."""
        return 1.0 if self.model_type in GEMMA else 0.0

    @property
    def attention_scale(self) -> Optional[float]:
        """The factor on q.k (None: head_dim ** -0.5)."""
        return None if self.query_pre_attn_scalar is None else float(self.query_pre_attn_scalar) ** -0.5

    @property
    def attention_softcap(self) -> Optional[float]:
        """The cap on attention scores that runs. transformers' Gemma 3 attention never passes its config's
        attn_logit_softcapping on (Gemma 2's does), so a gemma3 checkpoint keeps the field but runs uncapped."""
        return None if self.model_type in GEMMA else self.attn_logit_softcapping

    def rope_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-layer rope: inverse frequencies [L, H/2] float32 and the cos/sin scaling [L] (yarn's attention
        factor, else 1), as transformers computes them."""
        pairs = [rope_inv_freq(s.rope_theta, s.rope_scaling, self.head_dim, self.max_position_embeddings)
                 for s in self.layer_specs()]
        return np.stack([p[0] for p in pairs]), np.asarray([p[1] for p in pairs], np.float32)

    def inv_freq(self) -> np.ndarray:
        """Rotary inverse frequencies [H/2] in float32 of the full-attention layers."""
        return rope_inv_freq(self.rope_theta, self.rope_scaling, self.head_dim, self.max_position_embeddings)[0]

    def layer_is_sparse(self) -> tuple:
        """One bool per layer: its MLP is the MoE (all False for a dense model)."""
        return self.sparse_layers or (False,) * self.num_layers

    def mlp_params(self, active: bool = False) -> int:
        """MLP parameters over all layers; `active`: only those one token uses (its top-k experts + router)."""
        d, f = self.hidden_size, self.intermediate_size
        sparse = sum(self.layer_is_sparse())
        dense = (self.num_layers - sparse) * 3 * d * f
        if not sparse:
            return dense
        e, fe = self.moe.num_experts, self.moe_intermediate_size
        experts = self.moe.top_k if active else e
        per_expert = 3 * d * fe + ((2 * fe + d) if self.moe.expert_bias else 0)  # gpt-oss: gate_up and down biases
        router = d * e + (e if self.moe.router_bias else 0)
        return dense + sparse * (experts * per_expert + router)

    def num_params(self, active: bool = False) -> int:
        """All parameters; `active`: those one token uses (MoE: top-k experts), the figure for MFU."""
        d, n, k, h = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * n * h * 2 + d * k * h * 2 + (n * h + 2 * k * h if self.qkv_bias else 0) + (d if self.o_bias else 0)
        norms = (4 if self.model_type in GEMMA else 2) * d + (2 * h if self.qk_norm else 0)
        per_layer = attn + norms + (n if self.attention_sinks else 0)
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + self.mlp_params(active) + embed + d

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), matmuls plus causal attention (a
        sliding layer sees at most `window` keys)."""
        d, n, k, h = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        # MoE: the router and the top-k experts a token runs (active parameters), as MFU counts them
        attn = self.num_layers * (d * n * h * 2 + d * k * h * 2)
        matmul_params = attn + self.mlp_params(active=True) + self.vocab_size * d
        # QK^T and PV over the keys a query sees on average (T/2 causal, ~window when shorter), x2 flops/MAC
        keys = [seq_len / 2 if s.window is None else min(seq_len / 2, s.window) for s in self.layer_specs()]
        attention = sum(4 * n * h * kk for kk in keys)
        return 3 * (2 * matmul_params + attention)


# fields held as (nested) tuples, which JSON turns into lists
_TUPLE_FIELDS = ("rope_scaling", "sliding_rope_scaling", "layer_types", "sparse_layers", "mlp_only_layers")


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _first_set(outer, inner, name: str):
    value = getattr(outer, name, None)
    return getattr(inner, name, None) if value is None else value


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
    if hf.model_type in ("qwen2", "qwen3", "qwen3_moe") and not getattr(hf, "use_sliding_window", False):
        window = None
    layer_types = getattr(hf, "layer_types", None) or []
    if window is not None and window < hf.max_position_embeddings or "sliding_attention" in layer_types:
        raise ValueError(
            f"sliding-window attention (sliding_window={window}) is not supported for {hf.model_type}; "
            "jsft implements sliding windows for gemma3 only"
        )


def _moe_fields(hf: transformers.PretrainedConfig) -> dict:
    """The MoE fields of a qwen3_moe / mixtral config (MoeSpec.from_hf refuses what the layer cannot run,
    naming the family and field)."""
    spec = MoeSpec.from_hf(hf)
    sparse = sparse_layers(hf)
    return dict(
        moe=spec if any(sparse) else None,
        moe_intermediate_size=expert_hidden_size(hf),
        sparse_layers=sparse if any(sparse) else None,
        mlp_only_layers=tuple(getattr(hf, "mlp_only_layers", ()) or ()),
        decoder_sparse_step=getattr(hf, "decoder_sparse_step", 1),
        router_aux_loss_coef=float(getattr(hf, "router_aux_loss_coef", 0.0) or 0.0),
        output_router_logits=bool(getattr(hf, "output_router_logits", False)),
    )


def _check_gemma(hf: transformers.PretrainedConfig) -> None:
    if getattr(hf, "use_bidirectional_attention", False):
        raise ValueError("use_bidirectional_attention=true is not supported (jsft trains causal LMs)")


def _check_layer_types(hf: transformers.PretrainedConfig) -> None:
    """Gemma 3 and gpt-oss: `layer_types` lists one of full / sliding attention per layer."""
    unknown = set(hf.layer_types) - {FULL, SLIDING}
    if unknown or len(hf.layer_types) != hf.num_hidden_layers:
        raise ValueError(f"{hf.model_type}: layer_types must list {hf.num_hidden_layers} of {FULL} / {SLIDING}, "
                         f"got {hf.layer_types}")
    if SLIDING in hf.layer_types and not hf.sliding_window:
        raise ValueError(f"{hf.model_type}: layer_types has sliding_attention layers but sliding_window is not set")


def _check_gpt_oss(hf: transformers.PretrainedConfig) -> None:
    """What transformers' GptOss computes that the decoder would compute differently is refused, naming the field
    (its attention scale is head_dim ** -0.5 and its norms plain RMSNorm, as the decoder's defaults)."""
    if getattr(hf, "attention_dropout", 0.0):
        raise ValueError(f"gpt_oss attention_dropout={hf.attention_dropout} is not supported (set 0)")
    for field in ("swiglu_limit", "swiglu_alpha"):  # the clamped SwiGLU the MoE layer implements needs both
        value = getattr(hf, field, None)
        if not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"gpt_oss {field}={value!r} is not supported (the clamped SwiGLU needs a positive number)")


def _quantization(hf: transformers.PretrainedConfig) -> Optional[str]:
    """The checkpoint's `quantization_config.quant_method` where jsft can dequantize it on import (gpt-oss'
    MXFP4 experts), else a refusal naming the family and the field."""
    quant = getattr(hf, "quantization_config", None)
    if not quant:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    method = getattr(method, "value", method)  # a QuantizationMethod enum
    allowed = QUANTIZATIONS.get(hf.model_type, ())
    if method not in allowed:
        which = "allowed: " + ", ".join(allowed) if allowed else "jsft loads unquantized checkpoints of this family"
        raise ValueError(
            f"{hf.model_type}: quantization_config.quant_method={method!r} is not supported ({which}); "
            "dequantize the checkpoint first (e.g. transformers' from_pretrained + save_pretrained)")
    return method


def _rope_by_type(hf: transformers.PretrainedConfig) -> dict:
    """{layer kind: (theta, scaling)} from transformers 5 `rope_parameters` keyed by layer type (its config
    class already folds the 4.x `rope_theta` / `rope_local_base_freq` / `rope_scaling` into them)."""
    if hasattr(hf, "standardize_rope_params"):
        hf.standardize_rope_params()
    params = dict(hf.rope_parameters)
    if FULL not in params:  # one rope for every layer kind
        params = {FULL: params, SLIDING: params}
    return {kind: _rope_from_hf(hf, params[kind]) for kind in (FULL, SLIDING)}


def _rope_from_hf(hf: transformers.PretrainedConfig, params) -> tuple[float, Optional[tuple]]:
    if params is None and hasattr(hf, "standardize_rope_params"):
        hf.standardize_rope_params()
        params = getattr(hf, "rope_parameters", None)
    params = dict(params or {})
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
    if kind == "yarn" and params.get("factor") is None:  # transformers derives it from the lengths
        params["factor"] = hf.max_position_embeddings / params["original_max_position_embeddings"]
    return theta, tuple(sorted(params.items()))  # hashable: the config is static data of the model


def _rope_parameters(theta: float, scaling: Optional[tuple]) -> dict:
    return {"rope_type": "default", "rope_theta": theta, **dict(scaling or ())}


def rope_inv_freq(theta: float, scaling: Optional[tuple], head_dim: int, max_positions: int) -> tuple[np.ndarray, float]:
    """(inverse frequencies [H/2] float32, cos/sin scaling) of one rope, as transformers computes them."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    pos_freqs = np.float32(theta) ** exponents
    inv = (1.0 / pos_freqs).astype(np.float32)
    s = dict(scaling or ())
    kind = s.get("rope_type", "default")
    if kind == "linear":
        inv = inv / np.float32(s["factor"])
    elif kind == "llama3":
        inv = _llama3_inv_freq(inv, s)
    elif kind == "yarn":
        return _yarn_inv_freq(pos_freqs, s, theta, head_dim, max_positions)
    return inv.astype(np.float32), 1.0


def _yarn_inv_freq(pos_freqs, s: dict, theta: float, dim: int, max_positions: int) -> tuple[np.ndarray, float]:
    """YaRN: interpolated low frequencies, extrapolated high ones, a linear ramp between; cos/sin x mscale."""
    factor = s.get("factor") or max_positions / s["original_max_position_embeddings"]
    mscale = lambda scale, m=1.0: 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0  # noqa: E731
    attention = s.get("attention_factor")
    if attention is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention = mscale(factor)
    fast, slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1
    old = s["original_max_position_embeddings"]
    correction = lambda rot: dim * math.log(old / (rot * 2 * math.pi)) / (2 * math.log(theta))  # noqa: E731
    low, high = correction(fast), correction(slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation = 1 - ramp
    inv = (1.0 / (np.float32(factor) * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv.astype(np.float32), float(attention)


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
