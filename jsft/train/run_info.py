"""What a run is about to do, written to <default_local_dir>/run_info.json and printed at start."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jsft.models.params import array_bytes
from jsft.sharding import mesh_sizes_of
from jsft.data.batch import largest_micro_batch


def tree_bytes(tree) -> tuple[int, int]:
    """(total bytes, bytes on the fullest local device) of a pytree of jax arrays."""
    total, per_device = array_bytes(tree)
    return total, max(per_device.values(), default=0)


def step_memory(trainer, example) -> dict:
    """The largest micro-step's compiled memory figures; remat auto compiled that program already."""
    if trainer.remat_choice is not None and trainer.remat_choice.step_memory:
        return trainer.remat_choice.step_memory
    return trainer.step_fn.memory_analysis(trainer.params, trainer.opt_state, example)


def run_info(trainer, peak_flops: float) -> dict:
    cfg, model_cfg = trainer.cfg, trainer.model.config
    param_total, param_device = tree_bytes(trainer.params)
    trainable, frozen = trainer.step_fn.split(trainer.params)  # LoRA: the adapters, and the frozen base
    opt_total, opt_device = tree_bytes(trainer.opt_state)
    layout = trainer.train_data.layout
    example = trainer.step_fn.device_batch(largest_micro_batch(layout.rows_per_micro_batch, layout.row_length))
    return {
        "mesh": mesh_sizes_of(trainer.mesh),
        "mesh_reason": trainer.setup.mesh_reason,  # which mesh and why (trainer.mesh=auto's choice, an expert axis)
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "backend": jax.default_backend(),
        "num_params": int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.params))),
        "param_bytes_total": param_total,
        "param_bytes_per_device": param_device,
        "trainable_params": int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))),
        "trainable_param_bytes_total": tree_bytes(trainable)[0],
        "frozen_param_bytes_total": tree_bytes(frozen)[0],
        "frozen_param_bytes_per_device": tree_bytes(frozen)[1],
        "opt_state_bytes_total": opt_total,
        "opt_state_bytes_per_device": opt_device,
        "opt_state_memory": "pinned_host between updates" if trainer.step_fn.offload_opt_state else "device",
        "flops_per_token": model_cfg.flops_per_token(cfg.data.max_length),
        "peak_flops": peak_flops,
        "compute_dtype": str(jnp.dtype(cfg.model.dtype)),
        "param_dtype": str(jnp.dtype(cfg.model.param_dtype)),
        "micro_batch_shape": list(example.input_ids.shape),  # the largest; shape_buckets may cut it
        "shape_buckets": cfg.trainer.shape_buckets,
        "step_memory_per_device": step_memory(trainer, example),
        "total_steps": trainer.total_steps,
        "loss_agg_mode": cfg.trainer.loss_agg_mode,
        "attention_impl": trainer.model.attention_impl,  # what model.attention_impl resolved to here
        "sequence_parallel": trainer.model.sequence_parallel,  # ulysses | ring (trainer.sequence_parallel resolved)
        "remat_policy": trainer.model.remat_policy,  # what the decoder runs with
        "remat_auto": trainer.remat_choice.to_json() if trainer.remat_choice else None,  # remat_policy=auto's figures
    }
