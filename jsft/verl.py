"""veRL's SFT config keys -> jsft's: one declarative table, one row per veRL key, and its translation.

A veRL launch script (its legacy `fsdp_sft_trainer` or its current `sft_trainer` with the engine, optim
and model sub-configs) ports by changing the entry point. Every key of those configs has one fate here:

    honoured   same name, same meaning (a value spelling may be normalised: bf16 -> bfloat16)
    mapped     read as the jsft key named, with a one-line note at start when the meaning differs
    ignored    accepted; a one-line note at start says why it changes nothing in jsft
    refused    a value that would train something else stops the run with the reason and the fix

Rows whose `ok` accepts the value given (e.g. `data.custom_cls.path=null`, `engine=fsdp`) pass quietly.
Hydra's `+key=` prefix is accepted. docs/verl.md is generated from this table: `python -m jsft.verl --markdown`.
This module is a leaf: config loading calls `translate` on the (key, value) pairs of the YAML and the overrides.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

HONOURED, MAPPED, IGNORED, REFUSED = "honoured", "mapped", "ignored", "refused"
LEGACY, ENGINE = "legacy", "engine"  # verl/trainer/config/sft_trainer.yaml | sft_trainer_engine.yaml (+ engine/optim/model)

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "float": "float32", "half": "float16"}


def dtype(value: Any) -> Any:
    """veRL / torch dtype spellings -> jsft's (bf16 -> bfloat16, fp32 -> float32; torch.bfloat16 too)."""
    if not isinstance(value, str):
        return value
    name = value.removeprefix("torch.")
    return _DTYPES.get(name, name)


def logger_list(value: Any) -> Any:
    """trainer.logger: a string (`console`) is a one-logger list; veRL's `file` logger is jsft's always-on
    metrics.jsonl, so it is dropped from the list."""
    names = [value] if isinstance(value, str) else list(value or [])
    return [n for n in names if n != "file"]


def _is_null(value: Any) -> bool:
    return value is None or value == "" or value == {} or value == []


def _is_false(value: Any) -> bool:
    return value in (False, None, "false", "False")


@dataclass(frozen=True)
class Rule:
    key: str  # veRL key; `prefix.*` covers every key under prefix
    fate: str  # honoured | mapped | ignored | refused
    note: str = ""  # mapped: how the meaning differs; ignored: why; refused: why, and what to do
    to: Optional[str] = None  # mapped: the jsft key
    convert: Optional[Callable[[Any], Any]] = None  # veRL value -> jsft value
    ok: Optional[Callable[[Any], bool]] = None  # values accepted quietly (refused rows) / allowed (others)
    refusal: str = ""  # non-refused rows: why a value `ok` rejects is refused, and the fix
    where: tuple = (LEGACY, ENGINE)  # the veRL configs that hold the key

    def covers(self, key: str) -> bool:
        return key == self.key or (self.key.endswith(".*") and key.startswith(self.key[:-1]))


_PACKS = "jsft always packs samples into rows without padding (data.pad_mode=no_padding)"
_MESH = "jsft's device mesh is the strategy (trainer.mesh: data x fsdp x sequence, chosen automatically)"
_XLA = "XLA compiles and schedules the step; there is no torch module to configure"
_OFFLOAD = ("jsft can keep the optimizer state (Adam moments) off the device between updates "
            "(optim.offload_state); parameters and gradients stay on the device")

RULES: tuple[Rule, ...] = (
    # ---- data ----
    Rule("data.train_files", HONOURED),
    Rule("data.val_files", HONOURED),
    Rule("data.train_batch_size", HONOURED, "global samples per optimizer step"),
    Rule("data.micro_batch_size_per_gpu", MAPPED,
         "rows per device per micro-batch; a jsft row packs several samples up to data.max_length tokens",
         to="data.micro_batch_size_per_gpu"),
    Rule("data.micro_batch_size", IGNORED,
         "deprecated in veRL, which reads only data.micro_batch_size_per_gpu (jsft does the same)", where=(LEGACY,)),
    Rule("data.max_length", HONOURED),
    Rule("data.truncation", HONOURED, "error | left | right"),
    Rule("data.train_max_samples", HONOURED, "-1: all rows; else the first N rows of data.train_files"),
    Rule("data.val_max_samples", HONOURED, "-1: all rows; else the first N rows of data.val_files"),
    Rule("data.prompt_key", HONOURED, "single-turn rows' prompt column (veRL's default `question` with model.path)",
         where=(LEGACY,)),
    Rule("data.response_key", HONOURED, "single-turn rows' response column (veRL's default `answer` with model.path)",
         where=(LEGACY,)),
    Rule("data.prompt_dict_keys", HONOURED, "path into a nested prompt column, e.g. extra_info -> ['question']",
         where=(LEGACY,)),
    Rule("data.response_dict_keys", HONOURED, "path into a nested response column, e.g. extra_info -> ['answer']",
         where=(LEGACY,)),
    Rule("data.multiturn.enable", IGNORED,
         "jsft reads data.messages_key when a row has it, else data.prompt_key / data.response_key",
         where=(LEGACY,)),
    Rule("data.multiturn.messages_key", MAPPED, to="data.messages_key", where=(LEGACY,)),
    Rule("data.multiturn.tools_key", MAPPED, to="data.tools_key", where=(LEGACY,)),
    Rule("data.multiturn.enable_thinking_key", MAPPED, to="data.enable_thinking_key", where=(LEGACY,)),
    Rule("data.messages_key", HONOURED, where=(ENGINE,)),
    Rule("data.tools_key", HONOURED, where=(ENGINE,)),
    Rule("data.enable_thinking_key", HONOURED, where=(ENGINE,)),
    Rule("data.chat_template", HONOURED, "a Jinja file or inline template replacing the tokenizer's", where=(LEGACY,)),
    Rule("data.apply_chat_template_kwargs", HONOURED, "extra variables passed to the chat template"),
    Rule("data.balance_dp_token", IGNORED,
         "jsft's loss is normalised over the global batch's target tokens, exactly, whatever the device count"),
    Rule("data.custom_cls.path", REFUSED,
         "a custom torch Dataset class cannot feed jsft: write its rows as .jsonl/.parquet with a messages column "
         "(or prompt/response columns) and set data.train_files", ok=_is_null),
    Rule("data.custom_cls.name", REFUSED, "see data.custom_cls.path", ok=_is_null),
    Rule("data.use_shm", IGNORED, "jsft reads local files; there is no shared-memory copy"),
    Rule("data.ignore_input_ids_mismatch", IGNORED,
         "jsft trains the piecewise ids (inference-exact) and only counts where one-pass tokenization differs",
         where=(ENGINE,)),
    Rule("data.pad_mode", HONOURED, "no_padding | right", where=(ENGINE,)),
    Rule("data.use_dynamic_bsz", HONOURED, where=(ENGINE,)),
    Rule("data.max_token_len_per_gpu", HONOURED, where=(ENGINE,)),
    # ---- model ----
    Rule("model", IGNORED, "model=hf_model is jsft's only model config", ok=lambda v: v == "hf_model",
         refusal="jsft loads Hugging Face checkpoints only: use model=hf_model", where=(ENGINE,)),
    Rule("model.path", HONOURED, "a local Hugging Face checkpoint directory (jsft never downloads)", where=(ENGINE,)),
    Rule("model.partial_pretrain", MAPPED, "a local Hugging Face checkpoint directory (jsft never downloads)",
         to="model.path", where=(LEGACY,)),
    Rule("model._target_", IGNORED, "Hydra's class name", where=(ENGINE,)),
    Rule("model.hf_config_path", REFUSED, "jsft reads config.json from model.path: a config from elsewhere would "
         "describe another model; copy it into model.path", ok=_is_null, where=(ENGINE,)),
    Rule("model.tokenizer_path", MAPPED, to="data.tokenizer", where=(ENGINE,)),
    Rule("model.custom_chat_template", MAPPED, to="data.chat_template", where=(ENGINE,)),
    Rule("model.use_shm", IGNORED, "jsft reads local files; there is no shared-memory copy"),
    Rule("model.trust_remote_code", IGNORED, "jsft implements the architectures it supports; it runs no remote code"),
    Rule("model.external_lib", REFUSED, "it imports torch modules that register models; jsft cannot run them. "
         "Remove it (jsft supports qwen2/qwen3/llama/mistral-style architectures natively)", ok=_is_null),
    Rule("model.override_config", REFUSED, "it changes the model config at load time; jsft trains the model "
         "config.json describes: edit a copy of the checkpoint's config.json instead", ok=_is_null, where=(ENGINE,)),
    Rule("model.fsdp_config.model_dtype", MAPPED, "the parameter (and optimizer state) dtype",
         to="model.param_dtype", convert=dtype, where=(LEGACY,)),
    Rule("model.fsdp_config.wrap_policy.*", IGNORED, _MESH, where=(LEGACY,)),
    Rule("model.fsdp_config.cpu_offload", MAPPED, _OFFLOAD, to="optim.offload_state", where=(LEGACY,)),
    Rule("model.fsdp_config.offload_params", MAPPED, _OFFLOAD, to="optim.offload_state", where=(LEGACY,)),
    Rule("model.fsdp_config.optimizer_offload", MAPPED, to="optim.offload_state", where=(LEGACY,)),
    Rule("model.fsdp_config.param_offload", IGNORED, _OFFLOAD + "; set optim.offload_state=true for the optimizer part",
         where=(LEGACY,)),
    Rule("model.fsdp_config.*", IGNORED, _MESH, where=(LEGACY,)),
    Rule("model.enable_gradient_checkpointing", HONOURED,
         "true = full remat of each layer; unset, jsft picks the cheapest policy that fits (model.remat_policy=auto)"),
    Rule("model.enable_activation_offload", IGNORED, "jsft saves activation memory by remat (model.remat_policy)",
         where=(ENGINE,)),
    Rule("model.use_remove_padding", IGNORED, _PACKS),
    Rule("model.lora_rank", HONOURED),
    Rule("model.lora_alpha", HONOURED),
    Rule("model.target_modules", HONOURED),
    Rule("model.lora_adapter_path", HONOURED, where=(ENGINE,)),
    Rule("model.exclude_modules", REFUSED, "name the adapted projections in model.target_modules instead",
         ok=_is_null, where=(ENGINE,)),
    Rule("model.use_liger", IGNORED, "jsft's cross-entropy is always chunked over the vocabulary (no full logits)"),
    Rule("model.use_fused_kernels", IGNORED, "the loss is chunked and fused by XLA", where=(ENGINE,)),
    Rule("model.fused_kernel_options.*", IGNORED, "the loss is chunked and fused by XLA", where=(ENGINE,)),
    Rule("model.tiled_mlp.*", IGNORED, "XLA fuses the MLP; activation memory is set by model.remat_policy",
         where=(ENGINE,)),
    Rule("model.mtp.enable", IGNORED, "multi-token prediction is off in veRL's default", ok=_is_false,
         refusal="multi-token-prediction training is not supported by jsft: set model.mtp.enable=false",
         where=(ENGINE,)),
    Rule("model.mtp.enable_train", IGNORED, "multi-token prediction is off in veRL's default", ok=_is_false,
         refusal="multi-token-prediction training is not supported by jsft: set model.mtp.enable_train=false",
         where=(ENGINE,)),
    Rule("model.mtp.*", IGNORED, "used only with model.mtp.enable", where=(ENGINE,)),
    Rule("model.strategy", IGNORED, _MESH, where=(LEGACY,)),
    # ---- engine (sft_trainer) ----
    Rule("engine", IGNORED, _MESH, ok=lambda v: v == "fsdp",
         refusal="jsft has one engine, its sharded JAX step: use engine=fsdp (or leave it out)", where=(ENGINE,)),
    Rule("engine._target_", IGNORED, "Hydra's class name", where=(ENGINE,)),
    Rule("engine.strategy", IGNORED, _MESH, where=(ENGINE,)),
    Rule("engine.fsdp_size", MAPPED, "the fsdp mesh axis; the data axis takes the other devices (-1: automatic)",
         to="trainer.mesh.fsdp",
         where=(ENGINE,)),
    Rule("engine.ulysses_sequence_parallel_size", MAPPED, to="ulysses_sequence_parallel_size", where=(ENGINE,)),
    Rule("engine.param_offload", IGNORED, _OFFLOAD + "; set optim.offload_state=true for the optimizer part",
         where=(ENGINE,)),
    Rule("engine.optimizer_offload", MAPPED, to="optim.offload_state", where=(ENGINE,)),
    Rule("engine.model_dtype", MAPPED, "the parameter (and optimizer state) dtype", to="model.param_dtype",
         convert=dtype, where=(ENGINE,)),
    Rule("engine.dtype", MAPPED, "the compute dtype", to="model.dtype", convert=dtype, where=(ENGINE,)),
    Rule("engine.seed", IGNORED, "trainer.seed seeds jsft's init and shuffle", where=(ENGINE,)),
    Rule("engine.full_determinism", IGNORED, "jsft's step is deterministic for a given mesh", where=(ENGINE,)),
    Rule("engine.use_torch_compile", IGNORED, _XLA, where=(ENGINE,)),
    Rule("engine.forward_only", IGNORED, "SFT always trains", ok=_is_false,
         refusal="engine.forward_only=true would train nothing: remove it", where=(ENGINE,)),
    Rule("engine.entropy_from_logits_with_chunking", IGNORED, "RL only: SFT computes no entropy", where=(ENGINE,)),
    Rule("engine.entropy_checkpointing", IGNORED, "RL only: SFT computes no entropy", where=(ENGINE,)),
    Rule("engine.*", IGNORED, _MESH + "; " + _XLA, where=(ENGINE,)),
    # ---- optim ----
    Rule("optim", IGNORED, "optim=fsdp: jsft's optimizer is optax AdamW", ok=lambda v: v == "fsdp",
         refusal="jsft's optimizer is AdamW (optim=fsdp): set optim=fsdp or leave it out", where=(ENGINE,)),
    Rule("optim._target_", IGNORED, "Hydra's class name"),
    Rule("optim.optimizer", HONOURED, "AdamW only", ok=lambda v: str(v).lower() == "adamw",
         refusal="jsft's optimizer is AdamW (optax.adamw): set optim.optimizer=AdamW"),
    Rule("optim.optimizer_impl", IGNORED, "jsft's AdamW is optax.adamw, with its moments in optim.param dtype"),
    Rule("optim.override_optimizer_config", REFUSED,
         "extra optimizer constructor arguments cannot be passed to optax.adamw: use optim.betas/eps/weight_decay",
         ok=_is_null),
    Rule("optim.lr", HONOURED),
    Rule("optim.betas", HONOURED),
    Rule("optim.weight_decay", HONOURED, "applied to every parameter, as veRL (optim.no_decay_norms_and_biases off)"),
    Rule("optim.clip_grad", HONOURED),
    Rule("optim.grad_clip", MAPPED, "veRL's deprecated name", to="optim.clip_grad", ok=lambda v: v is not None,
         refusal="", where=(ENGINE,)),
    Rule("optim.lr_warmup_steps_ratio", HONOURED),
    Rule("optim.lr_warmup_steps", HONOURED, "-1 (or null): the ratio decides", convert=lambda v: -1 if v is None else v),
    Rule("optim.total_training_steps", IGNORED, "filled in at run time from trainer.total_training_steps (as veRL)"),
    Rule("optim.lr_scheduler_type", HONOURED, "constant | cosine | wsd"),
    Rule("optim.lr_scheduler", MAPPED, "legacy trainer's name of the schedule", to="optim.lr_scheduler_type",
         where=(LEGACY,)),
    Rule("optim.warmup_style", MAPPED, "veRL's deprecated name of the schedule (null: unset)",
         to="optim.lr_scheduler_type"),
    Rule("optim.min_lr_ratio", HONOURED, "null = 0", convert=lambda v: 0.0 if v is None else v),
    Rule("optim.min_lr", MAPPED, "an absolute final lr: min_lr_ratio = optim.min_lr / optim.lr",
         to="optim.min_lr_ratio"),
    Rule("optim.lr_min", MAPPED, "an absolute final lr: min_lr_ratio = optim.lr_min / optim.lr",
         to="optim.min_lr_ratio"),
    Rule("optim.num_cycles", IGNORED, "0.5: jsft's cosine is the half cycle from lr to the minimum",
         ok=lambda v: float(v) == 0.5, refusal="jsft's cosine schedule is a half cycle: set optim.num_cycles=0.5"),
    # ---- top level ----
    Rule("ulysses_sequence_parallel_size", HONOURED, "each row's tokens split over S devices", where=(LEGACY,)),
    Rule("use_remove_padding", IGNORED, _PACKS, where=(LEGACY,)),
    Rule("checkpoint.save_contents", MAPPED, "jsft always saves model, optimizer and data state; `hf_model` in "
         "the list sets trainer.export_hf (a safetensors export at the end)", to="trainer.export_hf",
         convert=lambda v: "hf_model" in list(v or []), where=(ENGINE,)),
    Rule("checkpoint.load_contents", IGNORED, "jsft restores everything it saved", where=(ENGINE,)),
    Rule("checkpoint._target_", IGNORED, "Hydra's class name", where=(ENGINE,)),
    Rule("profiler", IGNORED, "use JAX's profiler (jax.profiler) instead", where=(ENGINE,)),
    Rule("profiler.*", IGNORED, "torch/nsys/npu profiling; use JAX's profiler (jax.profiler) instead",
         where=(ENGINE,)),
    # ---- trainer ----
    Rule("trainer.default_local_dir", HONOURED, "default checkpoints/{project_name}/{experiment_name}, as veRL"),
    Rule("trainer.default_hdfs_dir", IGNORED, "jsft writes trainer.default_local_dir only; copy it afterwards"),
    Rule("trainer.project_name", HONOURED),
    Rule("trainer.experiment_name", HONOURED),
    Rule("trainer.total_epochs", HONOURED),
    Rule("trainer.total_training_steps", HONOURED),
    Rule("trainer.logger", HONOURED, "a list or one name: console | tensorboard | wandb (`file`: metrics.jsonl, "
         "always written); a logger whose package is missing is refused at start", convert=logger_list),
    Rule("trainer.seed", HONOURED),
    Rule("trainer.save_freq", HONOURED, "optimizer steps, -1 (end only) or after_each_epoch"),
    Rule("trainer.test_freq", HONOURED, "optimizer steps, -1 (end only) or after_each_epoch"),
    Rule("trainer.nnodes", HONOURED, "checked against the processes jax runs (jax.process_count())"),
    Rule("trainer.n_gpus_per_node", HONOURED, "checked against each process's devices (jax.local_device_count())"),
    Rule("trainer.device", HONOURED, "checked against jax's platform (cuda = gpu, npu refused, cpu)"),
    Rule("trainer.max_ckpt_to_keep", HONOURED),
    Rule("trainer.resume_mode", HONOURED, "auto | disable | resume_path"),
    Rule("trainer.resume_from_path", HONOURED),
    Rule("trainer.checkpoint.save_contents", MAPPED, "jsft always saves model, optimizer and data state; `hf_model` "
         "in the list sets trainer.export_hf (a safetensors export at the end)", to="trainer.export_hf",
         convert=lambda v: "hf_model" in list(v or []), where=(LEGACY,)),
    Rule("trainer.checkpoint.load_contents", IGNORED, "jsft restores everything it saved", where=(LEGACY,)),
    Rule("trainer.profile_interval", IGNORED, "use JAX's profiler (jax.profiler) instead", where=(ENGINE,)),
)

# veRL's legacy sft_trainer.yaml values that differ from jsft's own defaults: they apply when model.path is set
# (a veRL user's run), under everything the user sets. Differences kept on purpose (docs/verl.md): trainer.logger
# stays [console] (wandb is an optional package), model.enable_gradient_checkpointing stays unset (remat auto
# picks the cheapest policy that fits, full when nothing else does).
VERL_DEFAULTS: dict[str, Any] = {
    "data.train_batch_size": 256,
    "data.micro_batch_size_per_gpu": 4,
    "data.max_length": 1024,
    "data.prompt_key": "question",
    "data.response_key": "answer",
    "optim.lr": 1e-5,
    "optim.lr_warmup_steps_ratio": 0.1,
    "optim.lr_scheduler_type": "cosine",
    "trainer.total_epochs": 4,
    "trainer.seed": 1,
    "trainer.project_name": "gsm8k-sft",
    "trainer.experiment_name": "test",
}

# jsft keys whose values take veRL's spellings too
_JSFT_CONVERT = {"model.dtype": dtype, "model.param_dtype": dtype, "model.frozen_param_dtype": dtype}
_ABSOLUTE_MIN_LR = ("optim.min_lr", "optim.lr_min")


def rule_for(key: str) -> Optional[Rule]:
    """The table's row for a veRL key (an exact row before a `prefix.*` one), or None."""
    exact = [r for r in RULES if r.key == key]
    return exact[0] if exact else next((r for r in RULES if r.covers(key)), None)


@dataclass
class Translation:
    pairs: list  # (jsft key, value) in the order given
    notes: list  # one line per mapped-with-a-note / ignored key, for the start of the run
    min_lr: Optional[float] = None  # an absolute optim.min_lr: the ratio needs the final optim.lr


def strip_hydra_prefix(key: str) -> str:
    """Hydra's `+key=` (add) and `++key=` (force) spellings name the same key."""
    return key.lstrip("+").strip()


def translate(pairs: list) -> Translation:
    """veRL (key, value) pairs -> jsft's; keys not in the table pass unchanged (config loading checks them).
    Raises ValueError on a refused key or value, with the reason and the fix."""
    out = Translation([], [])
    for key, value in pairs:
        key = strip_hydra_prefix(key)
        if key in _JSFT_CONVERT:
            out.pairs.append((key, _JSFT_CONVERT[key](value)))
            continue
        rule = rule_for(key)
        if rule is None:
            out.pairs.append((key, value))
            continue
        accepted = rule.ok is None or rule.ok(value)
        if rule.fate == REFUSED and not accepted:
            raise ValueError(f"veRL key {key}={value!r} is not supported: {rule.note}")
        if rule.fate != REFUSED and not accepted and rule.refusal:
            raise ValueError(f"veRL key {key}={value!r} is not supported: {rule.refusal}")
        if rule.fate == REFUSED or (not accepted and not rule.refusal):
            continue  # a refused key at its harmless value (null), or an ignored row's unset value
        value = rule.convert(value) if rule.convert else value
        if rule.fate == IGNORED:
            out.notes.append(f"{key}={value!r} ignored: {rule.note}")
        elif rule.fate == HONOURED:
            out.pairs.append((key, value))
        elif key in _ABSOLUTE_MIN_LR:
            out.min_lr = float(value)
            out.notes.append(f"{key}={value} read as optim.min_lr_ratio = {key} / optim.lr")
        elif key == "engine.fsdp_size":  # veRL's HSDP: fsdp groups of this size, replicated over the rest
            if int(value) > 0:
                out.pairs += [("trainer.mesh.fsdp", int(value)), ("trainer.mesh.data", -1)]
            out.notes.append(f"{key}={value} read as trainer.mesh" + (f" {{fsdp: {value}, data: the rest}}"
                             if int(value) > 0 else "=auto"))
        else:
            out.pairs.append((rule.to, value))
            if rule.note:
                out.notes.append(f"{key} read as {rule.to}: {rule.note}")
    return out


def flatten(tree: dict, is_leaf: Callable[[str], bool], prefix: str = "") -> list:
    """A nested YAML mapping -> (dotted key, value) pairs, descending until `is_leaf(key)` or a non-mapping."""
    pairs = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and not is_leaf(key):
            pairs += flatten(v, is_leaf, key + ".")
        else:
            pairs.append((key, v))
    return pairs


def is_table_leaf(key: str) -> bool:
    """A key the table names itself (not through `prefix.*`): its value is taken whole, even a mapping."""
    return any(r.key == key for r in RULES) and key not in ("model", "engine", "optim", "profiler")


# ---- checks that need the cluster (called by the trainer with jax's figures) ----------------------------------

_PLATFORMS = {"cuda": "gpu", "gpu": "gpu", "cpu": "cpu", "tpu": "tpu"}


def check_cluster(nnodes: Optional[int], n_gpus_per_node: Optional[int], device: Optional[str],
                  process_count: int, local_devices: int, platform: str) -> None:
    """veRL's trainer.nnodes / n_gpus_per_node / device against what jax runs on; None: not checked.
    jsft runs one process per node (host); torchrun's one process per GPU is jsft's one process per host."""
    if device is not None and _PLATFORMS.get(str(device)) != platform:
        raise ValueError(f"trainer.device={device} but jax runs on {platform}: set trainer.device="
                         f"{'cuda' if platform == 'gpu' else platform} (or leave it out)")
    if nnodes is not None and nnodes != process_count:
        raise ValueError(f"trainer.nnodes={nnodes} but jax runs {process_count} process(es) (one per node): "
                         f"set trainer.nnodes={process_count}, or start one jsft process per node")
    if n_gpus_per_node is not None and n_gpus_per_node != local_devices:
        raise ValueError(f"trainer.n_gpus_per_node={n_gpus_per_node} but this process sees {local_devices} "
                         f"device(s): set trainer.n_gpus_per_node={local_devices} (or CUDA_VISIBLE_DEVICES)")


# ---- docs/verl.md --------------------------------------------------------------------------------------------


def markdown() -> str:
    """docs/verl.md: every veRL SFT key and its fate (tests/test_verl.py checks the committed file is this)."""
    lines = [
        "# veRL keys in jsft",
        "",
        "<!-- generated by `python -m jsft.verl --markdown > docs/verl.md` from jsft/verl.py; do not edit -->",
        "",
        "Every key of veRL's SFT configs (legacy `verl/trainer/config/sft_trainer.yaml` for `fsdp_sft_trainer`;",
        "current `sft_trainer_engine.yaml` for `sft_trainer` with its `engine/fsdp`, `optim/fsdp`, `model/hf_model`",
        "and `profiler` sub-configs) and what jsft does with it. `prefix.*` covers every key under prefix. Hydra's",
        "`+key=value` is accepted. Mapped keys with a different meaning, and ignored keys, print a one-line note",
        "at start; refused values stop the run before any work with the reason and the fix.",
        "",
        "With `model.path` set (a veRL user's run), keys left unset take veRL's `sft_trainer.yaml` values:",
        "",
    ]
    lines += [f"- `{k}={v}`" for k, v in VERL_DEFAULTS.items()]
    lines += [
        "",
        "except `trainer.logger` (stays `[console]`: wandb is an optional package) and",
        "`model.enable_gradient_checkpointing` (stays unset: remat auto picks the cheapest policy that fits).",
        "The run directory defaults to `checkpoints/{trainer.project_name}/{trainer.experiment_name}`, as veRL's.",
        "",
        "| veRL key | in | fate | jsft key | note |",
        "|---|---|---|---|---|",
    ]
    for r in RULES:
        fate = r.fate + (" (refused unless null)" if r.fate == REFUSED and r.ok is _is_null else "")
        note = r.note + (f" Refused otherwise: {r.refusal}" if r.refusal else "")
        lines.append(f"| `{r.key}` | {', '.join(r.where)} | {fate} | {f'`{r.to}`' if r.to else ''} | "
                     f"{note.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m jsft.verl --markdown > docs/verl.md")
    sys.stdout.write(markdown())
