"""The memory planner: per-device memory of a run's train step, compiled from abstract shapes.

No weight is read and no array is allocated: parameters, optimizer state and the micro-batch are
`jax.ShapeDtypeStruct`s with the shardings the trainer uses on the run's mesh, and XLA compiles the real
micro-step (forward + backward + gradient accumulation) and optimizer update; `memory_analysis` gives the
temporaries. `plan_run` plans a resolved run (jsft/train/setup.py) with one remat policy; `choose_remat` is
model.remat_policy=auto (the cheapest policy that fits, jsft/train/remat.py). `python -m jsft.plan` is the
command over this module.

A mixture of experts planned on XLA:CPU for a GPU (`moe_kernel="plan"`, what jsft.plan passes on a CPU host)
compiles its grouped matmuls as a stand-in with ragged_dot's shapes (jsft/models/moe.py): XLA:CPU's own
lowerings of the MoE kernels report E-fold temporaries (Mixtral-8x7B's tiles: 159 GiB a device) that say
nothing about a GPU. Everything else (token dispatch, expert-parallel exchanges, the gathered expert weights,
remat) is the compiled program itself.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import jax
import jax.numpy as jnp

from jsft import distributed
from jsft.data.batch import largest_micro_batch
from jsft.models.params import abstract_model, flat_params
from jsft.sharding import expert_size, mesh_sizes_of, sequence_size
from jsft.train import remat
from jsft.train.loss import target_nll
from jsft.train.optim import make_optimizer
from jsft.train.step import TrainStep

_LLAMA31_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192)
_GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
_GPT_OSS = dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_attention_heads=64,
                num_key_value_heads=8, head_dim=64, num_experts_per_tok=4, sliding_window=128, attention_bias=True,
                rope_theta=150000.0, rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0,
                                                       truncate=False, original_max_position_embeddings=4096),
                max_position_embeddings=131072, rms_norm_eps=1e-5, swiglu_limit=7.0, tie_word_embeddings=False)
# HF config fields of common models, for planning without a checkpoint (`--preset`; fills model.init).
PRESETS = {
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=32768),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=32768),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       rope_theta=1e6, max_position_embeddings=32768),
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         rope_theta=5e5, max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_scaling=_LLAMA31_ROPE),
    # Qwen/Qwen2.5-32B-Instruct config.json
    "qwen2.5-32b": dict(model_type="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=27648,
                        num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                        rope_theta=1e6, max_position_embeddings=32768, rms_norm_eps=1e-6),
    # meta-llama/Llama-3.1-70B config.json
    "llama-3.1-70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                          num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                          rope_theta=5e5, max_position_embeddings=131072, rms_norm_eps=1e-5,
                          rope_scaling=_LLAMA31_ROPE),
    # google/gemma-3-{4b,12b,27b}-pt text_config (multimodal checkpoints: jsft trains their text stack):
    # five sliding-window (1024) layers per global one, global rope linear x8
    "gemma-3-4b": dict(model_type="gemma3_text", vocab_size=262208, hidden_size=2560, intermediate_size=10240,
                       num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                       query_pre_attn_scalar=256, sliding_window=1024, rope_parameters=_GEMMA3_ROPE,
                       max_position_embeddings=131072),
    "gemma-3-12b": dict(model_type="gemma3_text", vocab_size=262208, hidden_size=3840, intermediate_size=15360,
                        num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                        query_pre_attn_scalar=256, sliding_window=1024, rope_parameters=_GEMMA3_ROPE,
                        max_position_embeddings=131072),
    "gemma-3-27b": dict(model_type="gemma3_text", vocab_size=262208, hidden_size=5376, intermediate_size=21504,
                        num_hidden_layers=62, num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                        query_pre_attn_scalar=168, sliding_window=1024, rope_parameters=_GEMMA3_ROPE,
                        max_position_embeddings=131072),
    # Qwen/Qwen3-30B-A3B config.json: 128 experts, top-8, every layer sparse
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                          norm_topk_prob=True, rope_theta=1e6, max_position_embeddings=40960, rms_norm_eps=1e-6),
    # mistralai/Mixtral-8x7B-v0.1 config.json: 8 experts, top-2
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                         num_experts_per_tok=2, rope_theta=1e6, max_position_embeddings=32768, rms_norm_eps=1e-5),
    # openai/gpt-oss-{20b,120b} config.json: top-4 experts with biases, alternating sliding (128) / full layers with
    # sinks, yarn x32 over 4096 positions (the released MXFP4 experts are dequantized on import)
    "gpt-oss-20b": dict(model_type="gpt_oss", **_GPT_OSS, num_hidden_layers=24, num_local_experts=32),
    "gpt-oss-120b": dict(model_type="gpt_oss", **_GPT_OSS, num_hidden_layers=36, num_local_experts=128),
}

def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"



def _temp_bytes(fn, *abstract_args) -> int:
    """Temporaries of `fn` compiled for these abstract arguments (XLA's memory analysis)."""
    return int(_compile(fn, *abstract_args).memory_analysis().temp_size_in_bytes)


def _compile(fn, *abstract_args):
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    return jitted.lower(*abstract_args).compile()


def loss_memory(*, vocab: int, hidden: int, tokens: int, chunk_size: int = 4096, dtype="float32") -> dict:
    """Temp bytes of the loss's forward + backward on one row of `tokens` tokens: jsft's vocabulary-chunked
    cross-entropy against the plain one that materialises fp32 logits [T, V] and their log-softmax."""
    h = jax.ShapeDtypeStruct((1, tokens, hidden), jnp.dtype(dtype))
    w = jax.ShapeDtypeStruct((hidden, vocab), jnp.dtype(dtype))
    ids = jax.ShapeDtypeStruct((1, tokens), jnp.int32)

    def chunked(h, w, ids):  # every position a target (the most a micro-batch can hold)
        pos = jnp.arange(tokens)[None]
        return jnp.sum(target_nll(h, w, pos, ids, jnp.ones(ids.shape), chunk_size))

    def full(h, w, ids):
        logits = jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.sum(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    grad = lambda f: jax.grad(f, argnums=(0, 1))  # noqa: E731
    return {
        "vocab": vocab, "hidden": hidden, "tokens": tokens, "chunk_size": chunk_size,
        "chunked_temp_bytes": _temp_bytes(grad(chunked), h, w, ids),
        "full_temp_bytes": _temp_bytes(grad(full), h, w, ids),
        "fp32_logits_bytes": tokens * vocab * 4,
    }


@dataclass
class Plan:
    """Per-device bytes of one training configuration."""

    params: int
    opt_state: int
    grad_accumulator: int
    batch: int
    step_temp: int  # the micro-step's temporaries: activations saved for the backward, logits chunks, ...
    update_temp: int  # the optimizer update's temporaries
    opt_offloaded: bool = False  # optim.offload_state: the state is on the device during the update only
    frozen_params: int = 0  # of `params`, the frozen part (LoRA: the base); gradients and optimizer skip it
    trainable_count: int = 0  # trainable parameters (elements, all devices)
    step_memory: dict = field(default_factory=dict)  # the micro-step's compiled figures, as TrainStep.memory_analysis

    @property
    def peak(self) -> int:
        """Parameters and accumulator live throughout; the two programs run in turn. The optimizer state
        lives in device memory throughout, or (offloaded) is brought in for the update only."""
        during_steps = self.batch + self.step_temp + (0 if self.opt_offloaded else self.opt_state)
        return self.params + self.grad_accumulator + max(during_steps, self.opt_state + self.update_temp)


def _per_device_bytes(abstract_tree, shardings_tree) -> int:
    """The largest device's share of a pytree of ShapeDtypeStructs laid out with these shardings."""
    total = 0
    for x, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings_tree)):
        total += math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
    return total


def plan_memory(model, optimizer, mesh, *, rows: int, row_length: int, chunk_size: int, update: bool = True,
                offload_opt_state: bool = False) -> Plan:
    """Compile the trainer's micro-step and update for an ABSTRACT model (jsft.models.params.abstract_model).
    update=False skips the update's compile (its temporaries count 0), to compare micro-step settings fast."""
    step = TrainStep(model, optimizer, mesh, chunk_size=chunk_size, offload_opt_state=offload_opt_state)
    params, frozen = step.split({n: jax.ShapeDtypeStruct(v.shape, v.dtype) for n, v in flat_params(model).items()})
    acc = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32), params)
    opt_state = jax.eval_shape(optimizer.init, params)
    # The largest micro-batch: whole rows, a target slot per token.
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), largest_micro_batch(rows, row_length))
    # TrainStep's programs carry the in/out shardings and donation the trainer runs with, and are lowered
    # under the mesh as the trainer traces them (else activations would not stay split by rows).
    grad_step = step.lower_grad({**params, **frozen}, batch).compile().memory_analysis()
    update_temp = step.lower_update(params, opt_state).compile().memory_analysis().temp_size_in_bytes if update else 0
    return Plan(
        params=_per_device_bytes(params, step.param_shardings) + _per_device_bytes(frozen, step.frozen_shardings),
        frozen_params=_per_device_bytes(frozen, step.frozen_shardings),
        trainable_count=sum(math.prod(x.shape) for x in params.values()),
        opt_state=_per_device_bytes(opt_state, step.opt_shardings),
        grad_accumulator=_per_device_bytes(acc, step.param_shardings),
        batch=_per_device_bytes(batch, jax.tree.map(lambda _: step.row_sharding, batch)),
        step_temp=int(grad_step.temp_size_in_bytes),
        update_temp=int(update_temp),
        opt_offloaded=offload_opt_state,
        step_memory={"argument_bytes": int(grad_step.argument_size_in_bytes),
                     "output_bytes": int(grad_step.output_size_in_bytes),
                     "temp_bytes": int(grad_step.temp_size_in_bytes)},
    )


def planning_moe_kernel() -> Optional[str]:
    """The MoE kernel jsft.plan compiles with on this backend: the GPU-shaped stand-in on CPU, else the run's."""
    return "plan" if jax.default_backend() == "cpu" else None


def plan_run(run, remat_policy: str, update: bool = True, moe_kernel: Optional[str] = None) -> tuple[Plan, dict]:
    """The Plan of a resolved run (jsft.train.setup.RunSetup) with this remat policy, and its description.
    `moe_kernel`: compile a mixture of experts with this kernel (planning_moe_kernel) instead of the run's."""
    cfg, model_cfg = run.cfg, run.model_config
    if moe_kernel and model_cfg.moe is not None:
        model_cfg = dataclasses.replace(model_cfg, moe=dataclasses.replace(model_cfg.moe, kernel=moe_kernel))
    model = abstract_model(model_cfg, dtype=cfg.model.dtype, param_dtype=run.param_dtype, remat_policy=remat_policy,
                           attention_impl=run.attention_impl, lora=run.lora,
                           sequence_parallel=run.sequence_parallel)  # ring's KV buffers are in the compiled step
    rows = run.layout.rows_per_micro_batch * run.feeders.count
    plan = plan_memory(model, make_optimizer(cfg.optim, 1), run.mesh, rows=rows, row_length=run.layout.row_length,
                       chunk_size=cfg.trainer.loss_chunk_size, update=update, offload_opt_state=cfg.optim.offload_state)
    about = {
        "model": f"{model_cfg.model_type}, {model_cfg.num_params() / 1e9:.2f}B parameters",
        "mesh": mesh_sizes_of(run.mesh),
        "devices": f"{jax.device_count()} {jax.devices()[0].platform}",
        "micro-batch": f"[{rows}, {run.layout.row_length}]",
        "dtypes": f"compute {cfg.model.dtype}, parameters {run.param_dtype}",
        "remat": remat_policy,
        "attention": model.attention_impl,
    }
    if sequence_size(run.mesh) > 1:
        about["sequence parallel"] = run.sequence_parallel
    if model_cfg.moe is not None:
        moe = model_cfg.moe
        kernel = ("ragged_dot's memory (stand-in compiled on CPU)" if moe.kernel == "plan" else moe.resolved_kernel())
        about["moe"] = f"{moe.num_experts} experts top-{moe.top_k} over expert={expert_size(run.mesh)}, {kernel}"
    if run.lora:
        spec = run.lora
        about["lora"] = f"r={spec.rank} alpha={spec.alpha:g} on {','.join(spec.targets)} ({cfg.model.param_dtype})"
    return plan, about


def choose_remat(run, budget: Optional[int] = None, update: bool = True, moe_kernel: Optional[str] = None
                 ) -> remat.RematChoice:
    """model.remat_policy=auto: compile the run's step per candidate until one fits `budget` (default:
    HEADROOM x the device memory the set-up resolved, the smallest of all hosts, so that every host takes
    the same choice). `update`: also compile the optimizer update (once, with the first candidate).
    `moe_kernel`: as plan_run's."""
    if budget is None:
        memory, source = run.device_memory
        smallest = int(distributed.all_hosts([memory >> 20]).min())  # in MiB: all_hosts carries int32
        memory = min(memory, (smallest + 1) << 20)  # lowered only where another host has less
        budget, source = int(remat.HEADROOM * memory), f"{remat.HEADROOM:.0%} of {source}"
    else:
        source = "the given budget"
    update_temp, plans = {}, {}

    def peak_of(policy: str) -> int:
        plan, about = plan_run(run, policy, update=update and not update_temp, moe_kernel=moe_kernel)
        update_temp.setdefault("bytes", plan.update_temp)  # compiled with the first candidate only
        plan.update_temp = update_temp["bytes"]
        plans[policy] = plan, about
        return plan.peak

    choice = remat.choose(peak_of, int(budget), source)
    # the very programs the run compiles: run_info and jsft.plan take them from here, no second compile
    choice.plan = plans[choice.policy]
    choice.step_memory = choice.plan[0].step_memory
    return choice


def report(plan: Plan, about: dict, budget: Optional[int]) -> str:
    rows = [
        (f"parameters ({plan.trainable_count / 1e6:.2f}M trainable)", plan.params),
        *([("  of which frozen (LoRA base)", plan.frozen_params)] if plan.frozen_params else []),
        ("optimizer state" + (" (host between updates)" if plan.opt_offloaded else ""), plan.opt_state),
        ("gradient accumulator", plan.grad_accumulator),
        ("micro-batch", plan.batch),
        ("micro-step temporaries", plan.step_temp),
        ("optimizer-update temporaries", plan.update_temp),
        ("peak", plan.peak),
    ]
    about = dict(about)
    why = about.pop("why", None)
    lines = ["plan: " + ", ".join(f"{k} {v}" for k, v in about.items())] + ([why] if why else []) + ["per device:"]
    lines += [f"  {name:<40}{_gib(n):>12}" for name, n in rows]
    if budget is not None:
        verdict = "fits" if plan.peak <= budget else "does NOT fit"
        lines.append(f"{verdict}: peak {_gib(plan.peak)} of {_gib(budget)} usable ({plan.peak / budget:.0%})")
    return "\n".join(lines)
