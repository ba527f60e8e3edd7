"""Will this run fit? Per-device memory of the train step, compiled from abstract shapes before any download.

    python -m jsft.plan [--config C] [key=value ...] [--device-memory 80GB] [--devices N] [--preset NAME]

No weight is read and no array is allocated: the model comes from `model.path`'s config.json (or
`model.init`, or `--preset`), parameters, optimizer state and the micro-batch are `jax.ShapeDtypeStruct`s
with the shardings the trainer uses on the configured mesh (`trainer.mesh`), and XLA compiles the real
micro-step (forward + backward + gradient accumulation) and optimizer update. Printed per device:
parameters, optimizer state, gradient accumulator, the micro-step's temporaries (activations), the
update's temporaries, and the peak, then whether the peak fits `--device-memory` x `--mem-fraction`
(JAX preallocates 75% of a GPU by default). Exit status 0 when it fits, 1 when it does not.
model.remat_policy=auto (the default) is resolved as the trainer resolves it (jsft/train/remat.py), against
that budget when given: the first line then says e.g. `remat auto -> dots_saveable`.

On a CPU host, `--devices N` fakes N devices (XLA_FLAGS) so an 8-GPU mesh can be planned on a laptop; the
figures are then XLA:CPU's buffer assignment, an estimate of a GPU's (fusion choices differ). On the GPU
host itself they are exact.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence

_LLAMA31_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192)
_GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
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
}

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str) -> int:
    """'80GB' (1e9), '80GiB' / '80G' (2**30), '512MB', '1e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read a memory size from {text!r}; write e.g. 80GB, 80GiB or 512MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# ---- compiled memory ---------------------------------------------------------------------------------------------


def _temp_bytes(fn, *abstract_args) -> int:
    """Temporaries of `fn` compiled for these abstract arguments (XLA's memory analysis)."""
    return int(_compile(fn, *abstract_args).memory_analysis().temp_size_in_bytes)


def _compile(fn, *abstract_args):
    import jax

    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    return jitted.lower(*abstract_args).compile()


def loss_memory(*, vocab: int, hidden: int, tokens: int, chunk_size: int = 4096, dtype="float32") -> dict:
    """Temp bytes of the loss's forward + backward on one row of `tokens` tokens: jsft's vocabulary-chunked
    cross-entropy against the plain one that materialises fp32 logits [T, V] and their log-softmax."""
    import jax
    import jax.numpy as jnp

    from jsft.train.loss import target_nll

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
    import jax

    total = 0
    for x, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings_tree)):
        total += math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
    return total


def plan_memory(model, optimizer, mesh, *, rows: int, row_length: int, chunk_size: int, update: bool = True,
                offload_opt_state: bool = False) -> Plan:
    """Compile the trainer's micro-step and update for an ABSTRACT model (jsft.models.params.abstract_model).
    update=False skips the update's compile (its temporaries count 0), to compare micro-step settings fast."""
    import jax
    import jax.numpy as jnp

    from jsft.models.params import flat_params
    from jsft.train.step import BATCH_FIELDS, TrainStep

    step = TrainStep(model, optimizer, mesh, chunk_size=chunk_size, offload_opt_state=offload_opt_state)
    params, frozen = step.split({n: jax.ShapeDtypeStruct(v.shape, v.dtype) for n, v in flat_params(model).items()})
    acc = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32), params)
    opt_state = jax.eval_shape(optimizer.init, params)
    # The largest micro-batch: whole rows, a target slot per token (as batch.largest_micro_batch).
    dtypes = {"target_weight": jnp.float32}
    batch = {k: jax.ShapeDtypeStruct((rows, row_length), dtypes.get(k, jnp.int32)) for k in BATCH_FIELDS}
    # TrainStep's programs carry the in/out shardings and donation the trainer runs with, and are lowered
    # under the mesh as the trainer traces them (else activations would not stay split by rows).
    grad_step = step.lower_grad({**params, **frozen}, batch).compile().memory_analysis()
    update_temp = step.lower_update(params, opt_state).compile().memory_analysis().temp_size_in_bytes if update else 0
    batch_shardings = {k: step.batch_sharding for k in batch}
    return Plan(
        params=_per_device_bytes(params, step.param_shardings) + _per_device_bytes(frozen, step.frozen_shardings),
        frozen_params=_per_device_bytes(frozen, step.frozen_shardings),
        trainable_count=sum(math.prod(x.shape) for x in params.values()),
        opt_state=_per_device_bytes(opt_state, step.opt_shardings),
        grad_accumulator=_per_device_bytes(acc, step.param_shardings),
        batch=_per_device_bytes(batch, batch_shardings),
        step_temp=int(grad_step.temp_size_in_bytes),
        update_temp=int(update_temp),
        opt_offloaded=offload_opt_state,
        step_memory={"argument_bytes": int(grad_step.argument_size_in_bytes),
                     "output_bytes": int(grad_step.output_size_in_bytes),
                     "temp_bytes": int(grad_step.temp_size_in_bytes)},
    )


# ---- the command ------------------------------------------------------------------------------------------------


def model_config(cfg):
    """The decoder's config from model.path's config.json (no weights read) or from model.init."""
    from jsft.train.mesh import run_model_config  # imports jax: only after main() set --devices

    return run_model_config(cfg)


def make_plan(cfg, update: bool = True, budget: Optional[int] = None) -> tuple[Plan, dict]:
    """(Plan, description) for a run config on the devices of this process (see plan_memory for `update`).
    model.remat_policy=auto is resolved as the trainer does (jsft/train/remat.py), against `budget` when given."""
    from jsft.train import remat as remat_choice
    from jsft.train.mesh import run_mesh

    model_cfg = model_config(cfg)
    why = []
    mesh = run_mesh(cfg, why.append, model_cfg)  # raises before compiling when the mesh would replicate
    policy = remat_choice.explicit_policy(cfg.model)
    if policy is None:  # auto: the chosen candidate's plan, compiled while choosing
        chosen = remat_choice.choose_for_run(cfg, model_cfg, mesh, budget=budget, update=update)
        plan, about = chosen.plan
        about = {**about, "remat": f"auto -> {chosen.policy}"}
    else:
        plan, about = plan_run(cfg, model_cfg, mesh, policy, update=update)
    return plan, {**about, "why": why[0]}


def plan_run(cfg, model_cfg, mesh, remat: str, update: bool = True) -> tuple[Plan, dict]:
    """The Plan of a run config with this remat policy, on this mesh (no "why" in the description)."""
    import jax

    from jsft.data.pipeline import BatchLayout
    from jsft.models import lora, sequence_parallel
    from jsft.models.params import abstract_model
    from jsft.sharding import mesh_sizes_of, sequence_size
    from jsft.train.feeders import mesh_feeders
    from jsft.train.optim import make_optimizer

    spec = lora.spec_from_run_config(cfg.model)
    seq_choice, _ = sequence_parallel.for_run(cfg, model_cfg)  # ring's KV buffers are then in the compiled step
    model = abstract_model(model_cfg, dtype=cfg.model.dtype, param_dtype=lora.base_param_dtype(cfg.model),
                           remat_policy=remat, attention_impl=cfg.model.attention_impl, lora=spec,
                           sequence_parallel=seq_choice)
    feeders = mesh_feeders(mesh)  # rows per feeder: devices off `sequence`
    layout = BatchLayout.from_config(cfg.data, feeders.row_blocks)
    rows = layout.rows_per_micro_batch * feeders.count
    plan = plan_memory(model, make_optimizer(cfg.optim, 1), mesh, rows=rows, row_length=layout.row_length,
                       chunk_size=cfg.trainer.loss_chunk_size, update=update, offload_opt_state=cfg.optim.offload_state)
    about = {
        "model": f"{model_cfg.model_type}, {model_cfg.num_params() / 1e9:.2f}B parameters",
        "mesh": mesh_sizes_of(mesh),
        "devices": f"{jax.device_count()} {jax.devices()[0].platform}",
        "micro-batch": f"[{rows}, {layout.row_length}]",
        "dtypes": f"compute {cfg.model.dtype}, parameters {lora.base_param_dtype(cfg.model)}",
        "remat": remat,
        "attention": model.attention_impl,
    }
    if sequence_size(mesh) > 1:
        about["sequence parallel"] = seq_choice
    if spec:
        about["lora"] = f"r={spec.rank} alpha={spec.alpha:g} on {','.join(spec.targets)} ({cfg.model.param_dtype})"
    return plan, about


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jsft.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML run config")
    parser.add_argument("--device-memory", help="memory of one device, e.g. 80GB; omit to only print the plan")
    parser.add_argument("--mem-fraction", type=float, default=0.75,
                        help="share of device memory jax may use (its GPU default preallocation: 0.75)")
    parser.add_argument("--devices", type=int, help="CPU only: plan for N fake devices")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="plan a known model without a checkpoint")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.max_length=4096")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    if args.devices:  # must precede the first jax import of this process
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}").strip()
    from jsft.config import load_config

    overrides = list(args.overrides)
    if args.preset:
        overrides.append(f"model.init={_yaml_inline(PRESETS[args.preset])}")
    try:
        cfg = load_config(args.config, overrides)
        budget = parse_bytes(args.device_memory) * args.mem_fraction if args.device_memory else None
        plan, about = make_plan(cfg, budget=budget)
    except (ValueError, FileNotFoundError) as e:
        print(f"plan error: {e}", file=sys.stderr)
        return 2
    print(report(plan, about, budget))
    return 0 if budget is None or plan.peak <= budget else 1


def _yaml_inline(fields: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "}"


if __name__ == "__main__":
    sys.exit(main())
