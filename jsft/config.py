"""Run-config schema (model, data, optim, trainer), YAML + dotted overrides, strict key checking.

Key names follow veRL's SFT trainer wherever the concept is the same, so a veRL launch script ports by
changing the entry point. Unknown keys are rejected with the closest valid names.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from jsft import verl
from jsft.data.config import DataConfig
from jsft.sharding import AUTO, check_mesh_axes

# The allowed values of the schema's choice keys, defined here once: the modules that implement them
# (models/attention.py, models/decoder.py, models/sequence_parallel.py, models/lora.py, train/batch.py,
# train/remat.py) import them from here.
ATTENTION_IMPLEMENTATIONS = ("xla", "blockwise", "cudnn", "pallas_gpu", "splash")  # model.attention_impl (or auto)
REMAT_POLICIES = ("none", "dots_saveable", "full")  # model.remat_policy (or auto), cheapest recompute first
SEQUENCE_PARALLEL_MODES = ("auto", "ulysses", "ring")  # trainer.sequence_parallel
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# HF module names that can carry a LoRA adapter, in layer order (peft's `all-linear` minus lm_head)
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FROZEN_PARAM_DTYPES = ("float32", "bfloat16", "float16")  # model.frozen_param_dtype (LoRA's frozen base)

# the built-in demo job, run by `python -m jsft.train` when no model is named
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


@dataclass
class ModelSection:
    """The run config's `model:` section (the architecture itself is jsft.models.config.ModelConfig)."""

    path: Optional[str] = None  # Hugging Face checkpoint directory (safetensors)
    # random initialisation instead of model.path: HF config fields ({model_type: qwen2, hidden_size: 256,
    # ...}); vocab_size defaults to the tokenizer's size rounded up to a multiple of 64
    init: Optional[Dict[str, Any]] = None
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"  # parameter (and optimizer state) dtype
    # veRL's switch: true = rematerialise each decoder layer (remat_policy full, or the one named), false = none;
    # null = let remat_policy decide
    enable_gradient_checkpointing: Optional[bool] = None
    # auto: the cheapest of none, dots_saveable, full whose compiled peak fits the device (jsft/train/remat.py)
    remat_policy: str = "auto"  # auto | none | dots_saveable | full
    # auto (pallas_gpu on GPU, splash on TPU, blockwise on CPU) | blockwise | xla | pallas_gpu | cudnn | splash
    attention_impl: str = "auto"  # (jsft/models/attention.py; docs/training.md "Attention")
    # LoRA (veRL's keys; docs/training.md#lora): adapters on the projections, the base frozen
    lora_rank: int = 0  # adapter rank; 0 = full fine-tuning
    lora_alpha: float = 16  # scale = lora_alpha / lora_rank, as PEFT
    target_modules: Any = "all-linear"  # all-linear | list of q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
    use_rslora: bool = False  # scale = lora_alpha / sqrt(lora_rank) (PEFT's use_rslora)
    lora_adapter_path: Optional[str] = None  # start from this PEFT adapter dir (it sets rank, alpha, targets)
    frozen_param_dtype: Optional[str] = None  # LoRA: dtype of the frozen base (bfloat16 halves it); None = param_dtype
    # mixtures of experts (docs/training.md "Mixtures of experts: router losses"); set on a dense model = error
    # load-balancing loss coefficient; None = as transformers: the checkpoint's router_aux_loss_coef where its
    # output_router_logits is true, else 0
    router_aux_loss_coef: Optional[float] = None
    router_z_loss_coef: float = 0.0  # router z-loss (ST-MoE: mean logsumexp(router logits)^2) coefficient
    moe_capacity_factor: Optional[float] = None  # None = dropless; cf > 0: each expert takes ceil(cf*tokens*k/E)


@dataclass
class OptimConfig:
    lr: float = 1e-5  # peak learning rate
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.01
    no_decay_norms_and_biases: bool = False  # exclude norm scales and biases from weight decay (veRL decays all)
    lr_warmup_steps_ratio: float = 0.0  # warmup = int(ratio * total optimizer steps)
    lr_warmup_steps: int = -1  # overrides the ratio when >= 0
    lr_scheduler_type: str = "cosine"  # constant | cosine | wsd
    min_lr_ratio: float = 0.0  # final lr / peak lr for cosine and wsd
    wsd_decay_ratio: float = 0.1  # fraction of steps spent decaying in wsd
    clip_grad: float = 1.0  # global-norm clipping; <= 0 disables
    max_consecutive_skips: int = 10  # abort after this many non-finite steps in a row
    # keep the optimizer state (Adam moments) in pinned host memory between updates, moved to the device
    # only for the update: frees its device memory during the micro-steps (veRL: fsdp_config.optimizer_offload)
    offload_state: bool = False


@dataclass
class TrainerConfig:
    total_epochs: int = 1
    total_training_steps: Optional[int] = None  # overrides epochs when set (optimizer steps)
    # run directory: checkpoints, metrics, run_info (veRL's default)
    default_local_dir: str = "checkpoints/${trainer.project_name}/${trainer.experiment_name}"
    save_freq: Any = -1  # optimizer steps between checkpoints; -1: only at the end; after_each_epoch
    test_freq: Any = -1  # optimizer steps between validations; -1: only at the end; after_each_epoch
    max_ckpt_to_keep: Optional[int] = None  # None keeps all
    resume_mode: str = "auto"  # auto | disable | resume_path
    resume_from_path: Optional[str] = None  # checkpoint directory for resume_mode=resume_path
    logger: List[str] = field(default_factory=lambda: ["console"])  # console, tensorboard, wandb
    # veRL's cluster keys, checked at start against jax (jsft/verl.py check_cluster); None: not checked
    nnodes: Optional[int] = None  # processes (one per node)
    n_gpus_per_node: Optional[int] = None  # devices of each process
    device: Optional[str] = None  # cuda | cpu | tpu
    project_name: str = "jsft"
    experiment_name: str = "default"
    seed: int = 0
    loss_agg_mode: str = "token-mean"  # token-mean | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm
    loss_chunk_size: int = 4096  # vocabulary columns per chunk of the cross-entropy (never full fp32 logits)
    # micro-batch row lengths and per-row target capacities are rounded up to multiples of 1/shape_buckets
    # of the row (jsft/data/batch.py): fewer padded tokens and logits only at targets, for at most
    # shape_buckets^2 compiled shapes; 1 = one fixed shape (whole rows, a logit at every position)
    shape_buckets: int = 4
    # JAX's persistent compilation cache (a directory; None = off): restarts and resumes skip recompiling
    compilation_cache_dir: Optional[str] = None
    # auto: fsdp = the largest group dividing the devices that shards every large tensor, data = the rest
    # (HSDP); or explicit sizes {data: 3, fsdp: 8} (-1 takes the rest), checked against the model at start;
    # `sequence: S` (trainer.mesh.sequence=4) splits each row's tokens over S devices (Ulysses), data/fsdp auto;
    # `expert: E` (trainer.mesh.expert=4) splits a mixture of experts' experts (and the rows) over E devices
    mesh: Any = "auto"
    # auto | ulysses | ring: attention over split rows; auto = Ulysses where S splits the heads, ring otherwise
    sequence_parallel: str = "auto"
    # memory of one device for model.remat_policy=auto, e.g. 80GB or 24GiB; None: jax's bytes_limit (GPU/TPU),
    # on CPU the host's available RAM over its devices
    device_memory: Optional[str] = None
    peak_tflops: Optional[float] = None  # dense peak TFLOP/s of one device for train/mfu; None: jsft/train/perf.py's table
    export_hf: bool = False  # also write an HF safetensors export to <default_local_dir>/hf at the end
    val_generations: int = 0  # held-out prompts generated and scored at each validation; 0 = off (docs/training.md)
    val_max_new_tokens: int = 256  # generation budget per prompt of validation by generation
    val_temperature: float = 0.0  # sampling temperature of validation by generation; 0 = greedy (reproducible)


@dataclass
class DemoConfig:
    enabled: bool = False  # generate the built-in tool-use dataset + tokenizer into <default_local_dir>/demo
    num_train: int = 2000  # training conversations
    num_val: int = 64  # held-out conversations: val/loss, and generation-based validation on their prompts
    seed: int = 0
    max_new_tokens: int = 128  # generation budget per assistant turn in validation episodes


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    ulysses_sequence_parallel_size: int = 1  # veRL's key (top-level there too): alias of trainer.mesh.sequence


_SECTIONS = {
    "model": ModelSection, "data": DataConfig, "optim": OptimConfig, "trainer": TrainerConfig, "demo": DemoConfig,
}


def _valid_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if f.name in _SECTIONS and cls is RunConfig:
            keys += _valid_keys(_SECTIONS[f.name], name + ".")
        else:
            keys.append(name)
    return keys


def _unknown_key_error(key: str) -> ValueError:
    close = difflib.get_close_matches(key, _valid_keys(RunConfig), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"unknown config key '{key}'{hint}")


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = (),
                notes: Optional[list] = None) -> RunConfig:
    """Defaults (veRL's when model.path is set) <- YAML file <- `a.b=value` overrides; returns a typed RunConfig.
    veRL's keys are translated on the way (jsft/verl.py); its one-line notes are appended to `notes`."""
    pairs = []
    if path is not None:
        loaded = OmegaConf.to_container(OmegaConf.load(path)) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file holds a mapping of sections (model, data, optim, trainer)")
        pairs += verl.flatten(loaded, _whole_value)
    pairs += [_parse_override(item) for item in overrides]
    translated = verl.translate(pairs)
    user = OmegaConf.create()
    for key, value in translated.pairs:
        _check_key(key, value)
        OmegaConf.update(user, key, value, force_add=True)
    verl_run = OmegaConf.select(user, "model.path") is not None  # a veRL user's run: veRL's defaults
    defaults = OmegaConf.create({})
    for key, value in (verl.VERL_DEFAULTS.items() if verl_run else ()):
        OmegaConf.update(defaults, key, value, force_add=True)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), defaults, user)
        cfg = OmegaConf.to_object(merged)
    except (ConfigKeyError, ValidationError) as e:
        raise ValueError(f"invalid config: {e}") from None
    if translated.min_lr is not None:
        cfg.optim.min_lr_ratio = translated.min_lr / cfg.optim.lr
    validate(cfg)
    if notes is not None:
        notes += translated.notes
    return cfg


def _parse_override(item: str) -> tuple[str, Any]:
    """`key=value` -> (key, value parsed as OmegaConf parses a dotlist: [a,b] is a list, null is None)."""
    if "=" not in item:
        raise ValueError(f"override '{item}' is not of the form key=value")
    key, raw = item.split("=", 1)
    return key.strip(), OmegaConf.to_container(OmegaConf.from_dotlist([f"value={raw}"]))["value"]


# mappings taken whole from a YAML file: free-form ones (their sub-keys are the user's)
_FREE = ("trainer.mesh", "model.init", "data.apply_chat_template_kwargs")


def _whole_value(key: str) -> bool:
    return key in _FREE or verl.is_table_leaf(key) or (key in _valid_keys(RunConfig) and key not in _SECTIONS)


def _check_key(key: str, value: Any) -> None:
    if key in _SECTIONS:
        raise ValueError(f"config section '{key}' must be a mapping, got {value!r}")
    if key not in _valid_keys(RunConfig) and not key.startswith(tuple(f + "." for f in _FREE)):
        raise _unknown_key_error(key)


def config_from_yaml(text: str) -> RunConfig:
    """A RunConfig from a resolved config.yaml (as stored in a run directory and its checkpoints)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(text)))


def _choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {', '.join(map(str, allowed))}")


def validate(cfg: RunConfig) -> None:
    """Reject unsupported values early, naming the key and the allowed values. Only what the config alone
    decides: checks that need the model or the devices run in the run's set-up (jsft/train/setup.py)."""
    _check_data(cfg.data)
    _check_model(cfg.model)
    _check_optim(cfg.optim)
    _check_trainer(cfg)
    if cfg.demo.enabled and cfg.data.train_files:
        raise ValueError("data.train_files is set but no model is named: set model.path (a local Hugging Face "
                         "checkpoint directory) or model.init; without them the built-in demo job would run on its own data")
    if cfg.data.train_max_samples == 0 or cfg.data.val_max_samples == 0:
        raise ValueError("data.train_max_samples / data.val_max_samples must be -1 (all rows) or a number of rows >= 1")
    if cfg.model.path and cfg.model.init:
        raise ValueError("set either model.path (load a checkpoint) or model.init (random init), not both")
    _check_sequence(cfg)


def _check_data(d: DataConfig) -> None:
    _choice("data.multiturn_policy", d.multiturn_policy, ["auto", "split", "single", "error"])
    _choice("data.train_turns", d.train_turns, ["all", "last"])
    _choice("data.truncation", d.truncation, ["error", "left", "right"])
    _choice("data.on_bad_row", d.on_bad_row, ["error", "skip"])
    _choice("data.pad_mode", d.pad_mode, ["no_padding", "right"])
    if d.stop_tokens is not None and not (d.stop_tokens and all(isinstance(t, str) and t for t in d.stop_tokens)):
        raise ValueError(f"data.stop_tokens must be a non-empty list of token texts (or null), got {d.stop_tokens!r}")
    if d.max_length <= 0 or d.train_batch_size <= 0 or d.micro_batch_size_per_gpu <= 0:
        raise ValueError("data.max_length, data.train_batch_size and data.micro_batch_size_per_gpu must be > 0")


def _check_model(m: ModelSection) -> None:
    _choice("model.remat_policy", m.remat_policy, ["auto", *REMAT_POLICIES])
    if m.enable_gradient_checkpointing is True and m.remat_policy == "none":
        raise ValueError("model.enable_gradient_checkpointing=true contradicts model.remat_policy=none: "
                         "drop one of them (or set enable_gradient_checkpointing=false)")
    _choice("model.attention_impl", m.attention_impl, ["auto", *ATTENTION_IMPLEMENTATIONS])
    _check_lora(m)
    _check_moe_keys(m)


MOE_KEYS = ("router_aux_loss_coef", "router_z_loss_coef", "moe_capacity_factor")  # model.* keys of MoE runs only


def moe_keys_set(m: ModelSection) -> list[str]:
    """The MoE keys this run sets away from their defaults (refused on a dense model by the set-up)."""
    return [f"model.{k}" for k in MOE_KEYS if getattr(m, k) not in (None, 0, 0.0)]


def _check_moe_keys(m: ModelSection) -> None:
    for key in ("router_aux_loss_coef", "router_z_loss_coef"):
        value = getattr(m, key)
        if value is not None and not value >= 0:
            raise ValueError(f"model.{key}={value} must be >= 0")
    if m.moe_capacity_factor is not None and not m.moe_capacity_factor > 0:
        raise ValueError(f"model.moe_capacity_factor={m.moe_capacity_factor} must be > 0 (or null: dropless)")


def lora_enabled(m: ModelSection) -> bool:
    """LoRA is on with model.lora_rank > 0 or a starting adapter (model.lora_adapter_path)."""
    return m.lora_rank > 0 or bool(m.lora_adapter_path)


def lora_targets(target_modules: Any) -> tuple[str, ...]:
    """`all-linear` or a list of HF module names -> the names in layer order; unknown names raise."""
    if target_modules == "all-linear":
        return LORA_TARGET_MODULES
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules or [])
    unknown = [n for n in names if n not in LORA_TARGET_MODULES]
    if unknown:
        raise ValueError(
            f"model.target_modules: unknown module(s) {unknown}; allowed: all-linear or a list of "
            f"{', '.join(LORA_TARGET_MODULES)}"
        )
    if not names:
        raise ValueError("model.lora_rank > 0 but model.target_modules names no module: list some, or all-linear")
    return tuple(n for n in LORA_TARGET_MODULES if n in names)


def _check_lora(m: ModelSection) -> None:
    """The LoRA keys; the starting adapter's files are read by the set-up (models/lora.py spec_from_run_config)."""
    if m.lora_rank < 0:
        raise ValueError(f"model.lora_rank={m.lora_rank} must be >= 0 (0 = full fine-tuning)")
    if m.frozen_param_dtype and not lora_enabled(m):
        raise ValueError("model.frozen_param_dtype applies to LoRA only: set model.lora_rank > 0, or remove it")
    if m.frozen_param_dtype not in (None, *FROZEN_PARAM_DTYPES):
        raise ValueError(f"model.frozen_param_dtype={m.frozen_param_dtype!r}; allowed: {', '.join(FROZEN_PARAM_DTYPES)}")
    if not lora_enabled(m):
        return
    if m.lora_alpha <= 0:
        raise ValueError(f"model.lora_alpha={m.lora_alpha} must be > 0")
    if not m.lora_adapter_path:
        lora_targets(m.target_modules)


def _check_optim(o: OptimConfig) -> None:
    _choice("optim.lr_scheduler_type", o.lr_scheduler_type, ["constant", "cosine", "wsd"])
    if len(o.betas) != 2:
        raise ValueError(f"optim.betas must hold two numbers, got {o.betas}")


def _check_trainer(cfg: RunConfig) -> None:
    t = cfg.trainer
    _choice("trainer.resume_mode", t.resume_mode, ["auto", "disable", "resume_path"])
    _choice("trainer.loss_agg_mode", t.loss_agg_mode, LOSS_AGG_MODES)
    for lg in t.logger:
        _choice("trainer.logger", lg, ["console", "tensorboard", "wandb"])
        _check_logger_package(lg)
    for key in ("save_freq", "test_freq"):
        value = getattr(t, key)
        if value != "after_each_epoch" and not (isinstance(value, int) and not isinstance(value, bool)):
            raise ValueError(f"trainer.{key}={value!r}: write a number of optimizer steps, -1, or after_each_epoch")
    if t.resume_mode == "resume_path" and not t.resume_from_path:
        raise ValueError("trainer.resume_mode=resume_path needs trainer.resume_from_path")
    if t.shape_buckets < 1 or t.loss_chunk_size < 1:
        raise ValueError("trainer.shape_buckets and trainer.loss_chunk_size must be >= 1")
    if t.val_generations < 0 or t.val_max_new_tokens < 1 or t.val_temperature < 0:
        raise ValueError("need trainer.val_generations >= 0, trainer.val_max_new_tokens >= 1, trainer.val_temperature >= 0")
    if t.val_generations and not (cfg.data.val_files or cfg.demo.enabled):
        raise ValueError("trainer.val_generations generates from held-out rows: set data.val_files")
    if t.mesh != AUTO:
        check_mesh_axes(t.mesh)
    _choice("trainer.sequence_parallel", t.sequence_parallel, SEQUENCE_PARALLEL_MODES)
    if t.peak_tflops is not None and t.peak_tflops <= 0:
        raise ValueError(f"trainer.peak_tflops={t.peak_tflops} must be > 0 (or null: look it up)")
    if t.device_memory is not None:
        try:
            parse_bytes(str(t.device_memory))
        except ValueError as e:
            raise ValueError(f"trainer.device_memory: {e}") from None


_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str) -> int:
    """'80GB' (1e9), '80GiB' / '80G' (2**30), '512MB', '1e9' -> bytes (trainer.device_memory, --device-memory)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read a memory size from {text!r}; write e.g. 80GB, 80GiB or 512MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


# trainer.logger name -> the package it needs (tensorboard's writer is optional too)
_LOGGER_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboardX"}


def _check_logger_package(name: str) -> None:
    """A logger whose package is missing is refused now, not after the first step."""
    package = _LOGGER_PACKAGES.get(name)
    if package and importlib.util.find_spec(package) is None:
        raise ValueError(f"trainer.logger lists {name} but the {package} package is not installed: pip install "
                         f"{package}, or drop {name} from trainer.logger (e.g. trainer.logger=console)")


def names_a_model(overrides: Sequence[str]) -> bool:
    """Whether the overrides name a model (model.path, model.init or veRL's model.partial_pretrain): if not,
    and no --config is given, the built-in demo job runs."""
    pairs = verl.translate([_parse_override(o) for o in overrides]).pairs
    return any(k in ("model.path", "model.init") or k.startswith("model.init.") for k, _ in pairs)


def sequence_parallel_size(cfg: RunConfig) -> int:
    """S of trainer.mesh.sequence or its alias ulysses_sequence_parallel_size (1: no sequence parallelism)."""
    return max(_mesh_sequence(cfg), cfg.ulysses_sequence_parallel_size)


def _mesh_sequence(cfg: RunConfig) -> int:
    return int(cfg.trainer.mesh.get("sequence", 1)) if isinstance(cfg.trainer.mesh, Mapping) else 1


def _check_sequence(cfg: RunConfig) -> None:
    alias, mesh_s = cfg.ulysses_sequence_parallel_size, _mesh_sequence(cfg)
    if alias < 1 or mesh_s < 1:
        raise ValueError("trainer.mesh.sequence and ulysses_sequence_parallel_size must be >= 1")
    if alias > 1 and mesh_s > 1 and alias != mesh_s:
        raise ValueError(f"ulysses_sequence_parallel_size={alias} and trainer.mesh.sequence={mesh_s} disagree: set one")
    s = sequence_parallel_size(cfg)
    key, row = row_length(cfg)
    if row % s:
        raise ValueError(f"{key}={row} must be a multiple of the sequence-parallel size {s}: each row's tokens "
                         f"are split over {s} devices")
    if cfg.trainer.sequence_parallel == "ring":  # auto -> ring is checked when the heads are known (train/setup.py)
        check_ring_length("ring", row, s, key)


def check_ring_length(choice: str, row_length: int, s: int, key: str) -> None:
    """Ring rows are cut into 2S zigzag chunks: the row length must be a multiple of 2S (before any work)."""
    if choice == "ring" and s > 1 and row_length % (2 * s):
        raise ValueError(f"{key}={row_length} must be a multiple of 2 x trainer.mesh.sequence = {2 * s} with ring "
                         f"attention (each row is cut into 2S chunks for the causal load balance)")


def row_length(cfg: RunConfig) -> tuple[str, int]:
    """(key, tokens) of one packed row: data.max_token_len_per_gpu with data.use_dynamic_bsz, else data.max_length."""
    if cfg.data.use_dynamic_bsz:
        return "data.max_token_len_per_gpu", cfg.data.max_token_len_per_gpu
    return "data.max_length", cfg.data.max_length


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
