"""The run's set-up: what a run config implies, resolved once, before any data is read or weight exists.

    cfg -> tokenizer (+ stop tokens) -> model config (+ MoE objective) -> LoRA spec -> sequence-parallel choice
        -> mesh -> feeders + batch layout -> device memory -> remat policy (auto: compiled by the planner)

`resolve` returns a frozen `RunSetup` that the trainer (jsft/train/loop.py), `python -m jsft.plan`,
`python -m jsft.export` and `python -m jsft.inspect` read; nothing downstream resolves any of it again.
The mesh decisions live here (which mesh, checked against the parameter shapes and the heads, and which
processes feed which rows); jsft/sharding.py holds the axis table and builds a mesh of given sizes.

    trainer.mesh: auto            -> the largest fsdp that divides the devices and shards every large tensor,
                                     the rest on data (HSDP), printed with the reason
    trainer.mesh: {data: 3, fsdp: 8} -> used as given; a large tensor it cannot shard stops the run here
    trainer.mesh.sequence=4          -> (or ulysses_sequence_parallel_size=4) each row's tokens over 4 devices,
                                     data/fsdp as above over the rest; Ulysses, or ring where 4 cannot split the heads;
                                     a group may span processes (jsft/train/feeders.py says who feeds which rows)
    trainer.mesh.expert=4            -> a mixture of experts' experts over 4 devices (checked: E divides the experts
                                     and the devices); auto for a mixture of experts: see auto_expert_size

A new mesh axis is added to jsft/sharding.py's table and chosen here, next to `sequence` and `expert`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import jax
from jax.sharding import Mesh

from jsft.config import ModelSection, RunConfig, moe_keys_set, row_length, sequence_parallel_size
from jsft.data.pipeline import BatchLayout
from jsft.data.tokenizer import load_tokenizer, stop_token_ids, stop_tokens
from jsft.models import lora, sequence_parallel
from jsft.models.attention import resolve_impl
from jsft.models.config import ModelConfig
from jsft.models.moe_parallel import expert_axis_sizes
from jsft.models.params import param_layout
from jsft.sharding import AUTO, make_mesh, working_meshes
from jsft.train import planner, remat
from jsft.train.feeders import Feeders, mesh_feeders
from jsft.train.loss import MoeObjective

Log = Optional[Callable[[str], None]]


@dataclass(frozen=True)
class RunSetup:
    """Everything the run config implies that a run needs before data and weights."""

    cfg: RunConfig
    model_config: ModelConfig
    tokenizer: Any  # None where the caller needs none (jsft.plan of a model.path or a model.init with vocab_size)
    stop_tokens: tuple[str, ...]  # texts generation stops on (data.stop_tokens, generation_config.json or EOS)
    stop_token_ids: tuple[int, ...]
    lora: Optional[lora.LoraSpec]  # None: full fine-tuning
    attention_impl: str  # model.attention_impl resolved for this backend (auto -> pallas_gpu / splash / blockwise)
    sequence_parallel: str  # ulysses | ring: attention over rows split on the `sequence` axis
    mesh: Mesh  # {data, fsdp, sequence, expert} over all devices
    mesh_reason: str  # the mesh line: which mesh and why (printed at start, in run_info.json)
    feeders: Feeders  # which processes feed which micro-batch rows
    layout: BatchLayout  # a feeder's micro-batch: rows and row length
    device_memory: tuple[int, str]  # bytes of one of this process's devices, and where the figure comes from
    remat_policy: str  # none | dots_saveable | full (auto resolved)
    remat_choice: Optional[remat.RematChoice]  # model.remat_policy=auto's compiled figures; None when fixed
    moe: Optional[MoeObjective] = None  # a mixture of experts' router losses and dispatch; None: a dense model

    @property
    def param_dtype(self) -> str:
        """The dtype the (frozen) base parameters are stored in."""
        return lora.base_param_dtype(self.cfg.model)

    def model_kwargs(self) -> dict:
        """What jsft.models.from_pretrained / init_model take from the run."""
        m = self.cfg.model
        return dict(dtype=m.dtype, param_dtype=self.param_dtype, mesh=self.mesh, remat_policy=self.remat_policy,
                    attention_impl=self.attention_impl, sequence_parallel=self.sequence_parallel)


def resolve(cfg: RunConfig, log: Log = None, *, tokenizer: bool = True, budget: Optional[int] = None,
            update: bool = True, moe_kernel: Optional[str] = None) -> RunSetup:
    """The run's set-up, each part once. `tokenizer=False` (jsft.plan) loads one only where model.init needs
    its vocab size. `budget` / `update` / `moe_kernel`: model.remat_policy=auto's budget (default: the device
    memory), whether it also compiles the optimizer update, and the MoE kernel it plans with (planner.choose_remat)."""
    tok = run_tokenizer(cfg) if tokenizer else None
    model_cfg = model_config(cfg, tok)
    if tok is not None and len(tok) > model_cfg.vocab_size:
        raise ValueError(f"the tokenizer has {len(tok)} tokens but the model's vocab_size is {model_cfg.vocab_size}: "
                         "they do not belong together")
    moe = check_moe(model_cfg, cfg.model, log)
    spec = lora.spec_from_run_config(cfg.model)  # reads a starting adapter's adapter_config.json
    if spec and cfg.model.lora_adapter_path and cfg.model.path:  # before reading any weight
        lora.check_adapter(cfg.model.lora_adapter_path, model_cfg, spec)
    impl = resolve_impl(cfg.model.attention_impl, cfg.model.dtype)  # raises for a kernel this backend lacks
    seq_choice, seq_line = sequence_parallel_choice(cfg, model_cfg, impl)
    mesh, mesh_reason = mesh_and_reason(cfg, model_cfg, seq_line)
    if log is not None:
        log(mesh_reason)
    feeders = mesh_feeders(mesh)
    policy = remat.explicit_policy(cfg.model)
    run = RunSetup(
        cfg=cfg, model_config=model_cfg, tokenizer=tok,
        stop_tokens=stop_tokens(tok) if tok is not None else (),
        stop_token_ids=tuple(stop_token_ids(tok)) if tok is not None else (),
        lora=spec, attention_impl=impl, sequence_parallel=seq_choice, mesh=mesh, mesh_reason=mesh_reason,
        feeders=feeders,
        layout=BatchLayout.from_config(cfg.data, feeders.row_blocks),
        # this process's devices: jax refuses memory_stats of another process's (jax.devices()[0] on process 1)
        device_memory=remat.device_memory(cfg.trainer.device_memory, jax.local_devices()),
        remat_policy=policy or "auto", remat_choice=None, moe=moe,
    )
    if policy is not None:
        return run
    choice = planner.choose_remat(run, budget, update, moe_kernel)  # compiles the step per candidate
    if log is not None:
        log(choice.describe())
    return dataclasses.replace(run, remat_policy=choice.policy, remat_choice=choice)


def check_moe(model_cfg: ModelConfig, m: ModelSection, log: Log = None) -> Optional[MoeObjective]:
    """A mixture of experts' objective and dispatch from the model.* MoE keys (None for a dense model, which
    must set none of them). model.router_aux_loss_coef unset applies the load-balancing loss as transformers
    does: the checkpoint config's router_aux_loss_coef where its output_router_logits is true, else none."""
    if model_cfg.moe is None:
        keys = moe_keys_set(m)
        if keys:
            raise ValueError(f"{keys[0]}={getattr(m, keys[0].split('.')[1])}: {model_cfg.model_type} is not a mixture "
                             f"of experts (it has no router); remove {', '.join(keys)}")
        return None
    if m.router_aux_loss_coef is not None:
        aux, source = m.router_aux_loss_coef, " (model.router_aux_loss_coef)"
    elif model_cfg.output_router_logits:
        aux = model_cfg.router_aux_loss_coef
        source = " (the checkpoint's router_aux_loss_coef: output_router_logits=true)"
    else:
        aux, source = 0.0, " (the checkpoint's output_router_logits=false, as transformers)"
    moe = MoeObjective(float(aux), float(m.router_z_loss_coef), m.moe_capacity_factor)
    if log is not None:
        log(moe.describe(source))
    return moe


def run_tokenizer(cfg: RunConfig, path: Optional[str] = None):
    """The run's tokenizer: `path`, else data.tokenizer, else model.path; the chat template and stop tokens
    as the config says."""
    return load_tokenizer(path or cfg.data.tokenizer or cfg.model.path, cfg.data.chat_template,
                          stop_tokens=cfg.data.stop_tokens, model_path=cfg.model.path)


def model_config(cfg: RunConfig, tokenizer=None) -> ModelConfig:
    """The decoder's config of a run: model.path's config.json (no weights read) or model.init, completed
    from the tokenizer (loaded from data.tokenizer when model.init has no vocab_size and none is given)."""
    if cfg.model.path:
        return ModelConfig.from_pretrained(cfg.model.path)
    if not cfg.model.init:
        raise ValueError("nothing to plan: set model.path (a checkpoint directory), model.init or --preset")
    init = dict(cfg.model.init)
    if tokenizer is None and "vocab_size" in init:
        return ModelConfig.from_init(init)
    if tokenizer is None:
        if not cfg.data.tokenizer:
            raise ValueError("model.init has no vocab_size: set it, or data.tokenizer to take it from")
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    return random_init_config(init, tokenizer)


def random_init_config(init: dict, tokenizer) -> ModelConfig:
    """model.init (HF config fields) completed from the tokenizer: vocab rounded up to 64, special ids."""
    fields = dict(init)
    fields.setdefault("vocab_size", -(-len(tokenizer) // 64) * 64)
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if getattr(tokenizer, name, None) is not None:
            fields.setdefault(name, getattr(tokenizer, name))
    return ModelConfig.from_init(fields)


def sequence_parallel_choice(cfg: RunConfig, model_cfg: ModelConfig, attention_impl: Optional[str] = None) -> tuple[str, str]:
    """(ulysses | ring, the line printed with the mesh; "" at S=1) for a run and its model; raises before any
    work (explicit Ulysses on heads it cannot split, ring rows that do not cut into 2S chunks)."""
    s, mode = sequence_parallel_size(cfg), cfg.trainer.sequence_parallel
    choice = sequence_parallel.choose(mode, model_cfg.num_heads, model_cfg.num_kv_heads, s)
    key, row = row_length(cfg)
    sequence_parallel.check_length(choice, row, s, key)
    if s == 1:
        return choice, ""
    impl = attention_impl or resolve_impl(cfg.model.attention_impl, cfg.model.dtype)
    return choice, sequence_parallel.describe(mode, choice, model_cfg.num_heads, model_cfg.num_kv_heads, s, impl)


def run_mesh(cfg: RunConfig, log: Log = None, model_cfg: Optional[ModelConfig] = None,
             seq_line: Optional[str] = None) -> Mesh:
    """trainer.mesh over all devices, chosen (auto) or checked for the run's parameter shapes and heads.
    `log` receives the mesh line (with the sequence-parallel and expert choices when used)."""
    mesh, why = mesh_and_reason(cfg, model_cfg or model_config(cfg), seq_line)
    if log is not None:
        log(why)
    return mesh


def mesh_and_reason(cfg: RunConfig, model_cfg: ModelConfig, seq_line: Optional[str] = None) -> tuple[Mesh, str]:
    """(the run's mesh, the line saying which and why); raises before any work for a mesh that cannot run."""
    if seq_line is None:
        _, seq_line = sequence_parallel_choice(cfg, model_cfg)
    s = sequence_parallel_size(cfg)
    axes = cfg.trainer.mesh
    check_expert_axis(axes, model_cfg)
    e, expert_line = expert_choice(axes, model_cfg, s)
    if s > 1 or e > 1:  # on top of auto / an explicit {data, fsdp}
        axes = {**(axes if axes != AUTO else {}), **({"sequence": s} if s > 1 else {}), **({"expert": e} if e > 1 else {})}
    lines = []
    mesh = make_mesh(axes, jax.devices(), params=param_layout(model_cfg), log=lines.append)
    why = "; ".join(filter(None, [*lines, seq_line if s > 1 else "", expert_line]))
    try:  # processes that share rows (a sequence group spanning them) must share all of them
        mesh_feeders(mesh)
    except ValueError as e:
        raise ValueError(f"trainer.mesh.sequence={s}: {e}; use trainer.mesh.sequence in "
                         f"{_feedable_sizes(cfg.trainer.sequence_parallel, model_cfg)} (data/fsdp auto), which these processes can feed") from None
    return mesh, why


def _expert_sizes(model_cfg: ModelConfig) -> list[int]:
    return expert_axis_sizes(model_cfg.moe.num_experts, jax.device_count())


def check_expert_axis(axes, model_cfg: ModelConfig) -> None:
    """trainer.mesh.expert=E, before any work: a mixture of experts whose experts and devices E divides."""
    e = int(axes.get("expert", 1)) if isinstance(axes, Mapping) else 1
    if e == 1:
        return
    if model_cfg.moe is None:
        raise ValueError(f"trainer.mesh.expert={e}: {model_cfg.model_type} is not a mixture of experts; remove it")
    ok = _expert_sizes(model_cfg)
    if e not in ok:
        raise ValueError(f"trainer.mesh.expert={e} does not divide the {model_cfg.moe.num_experts} experts and "
                         f"{jax.device_count()} devices; use trainer.mesh.expert in {ok}")


# expert parallelism stays within one node, as MaxText and torchtitan run it: the token all-gather and
# reduce-scatter of every MoE layer (forward and backward) need the intra-node links (NVLink: 8 GPUs)
MAX_AUTO_EXPERT = 8


def expert_choice(axes, model_cfg: ModelConfig, seq: int) -> tuple[int, str]:
    """(E, the line saying why; "" for a dense model): trainer.mesh.expert as written, else auto_expert_size
    where the data/fsdp part is auto too; an explicit {data, fsdp} without `expert` keeps E=1."""
    if model_cfg.moe is None:
        return 1, ""
    if isinstance(axes, Mapping) and "expert" in axes:
        e = int(axes["expert"])
        return e, f"expert={e} (trainer.mesh.expert={e}): each device holds {model_cfg.moe.num_experts // e} of the {model_cfg.moe.num_experts} experts"
    if axes != AUTO and not set(axes) <= {"sequence"}:
        return 1, (f"expert=1 (trainer.mesh={dict(axes)} names no expert axis): the expert weights shard over fsdp; "
                   f"trainer.mesh.expert=E in {_expert_sizes(model_cfg)} splits the experts instead")
    return auto_expert_size(model_cfg, jax.device_count(), jax.local_device_count(), seq)


def auto_expert_size(model_cfg: ModelConfig, n_devices: int, local_devices: int, seq: int = 1) -> tuple[int, str]:
    """trainer.mesh=auto's expert axis for a mixture of experts: the largest E <= MAX_AUTO_EXPERT dividing the
    experts, the devices of one process (so an expert group is one host's devices, jsft/sharding.py's device
    order) and the devices over `seq`, with a data/fsdp mesh over the rest that splits every large tensor.

    Why E > 1 at all: with fsdp alone, every device all-gathers every expert's weights of a layer in its forward
    and again in its backward (Qwen3-30B-A3B: 0.6B values a layer, while its tokens use 8 of 128 experts);
    with E, a device gathers only its E-th of the experts and the layer instead exchanges its tokens within
    the E devices (n_tokens x hidden values each way), which is far less at any fine-tuning batch. Memory is
    the same (the fsdp group spans fsdp x expert for the other weights, expert x fsdp for the experts)."""
    moe = model_cfg.moe
    if moe is None:  # a dense model: no expert axis, the mesh line unchanged
        return 1, ""
    layout = param_layout(model_cfg)
    expert_params = sum(math.prod(shape) for shape, axes in layout.values() if "experts" in axes)
    share = expert_params / sum(math.prod(shape) for shape, _ in layout.values())
    for e in range(min(MAX_AUTO_EXPERT, local_devices), 0, -1):
        if moe.num_experts % e or local_devices % e or (n_devices // seq) % e or not working_meshes(layout, n_devices, seq, e):
            continue
        if e == 1:
            return 1, (f"expert=1 (auto): no size in 2..{MAX_AUTO_EXPERT} divides both the {moe.num_experts} experts "
                       f"and the {local_devices} devices of a process; the expert weights shard over fsdp")
        return e, (f"expert={e} (auto): the largest size <= {MAX_AUTO_EXPERT} dividing the {moe.num_experts} experts and "
                   f"the {local_devices} devices of a process; the expert weights ({share:.0%} of the parameters) are "
                   f"split by expert, so each MoE layer exchanges its tokens within {e} devices of one host instead of "
                   f"all-gathering every expert's weights on every device")
    return 1, "expert=1 (auto): no expert axis leaves a data/fsdp mesh that splits every large tensor"


def checkpoint_mesh(model_cfg: ModelConfig) -> Mesh:
    """The mesh a saved model is restored onto (jsft.export): auto for its parameter shapes, as training."""
    return make_mesh(AUTO, params=param_layout(model_cfg))


def _feedable_sizes(mode: str, model_cfg: ModelConfig) -> list[int]:
    """The sequence sizes (data/fsdp auto) that `mode` supports for these heads and whose rows the processes can feed."""
    out = []
    for s in (s for s in range(1, jax.device_count() + 1) if jax.device_count() % s == 0):
        try:
            sequence_parallel.choose(mode, model_cfg.num_heads, model_cfg.num_kv_heads, s)
            mesh_feeders(make_mesh({"sequence": s}, jax.devices(), params=param_layout(model_cfg)))
        except ValueError:
            continue
        out.append(s)
    return out
