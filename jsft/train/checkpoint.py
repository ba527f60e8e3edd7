"""Orbax checkpoints: one CheckpointManager per run, atomic async saves, exact resume.

A checkpoint step directory holds the items:
  params     flat dict 'layers/q_proj' -> array (sharded save/restore through tensorstore)
  opt_state  the optax state (absent in params-only checkpoints)
  meta       JSON: step, model config, data-iterator state, RNG seed, resolved run config, tokenizer dir
Orbax writes each step to a temporary directory and renames it when complete, so a crash during a save
never leaves a half-written checkpoint that `latest_step` would pick, and never touches the previous one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from jsft.models.config import ModelConfig

CHECKPOINT_SUBDIR = "checkpoints"


def open_manager(directory: str | Path, *, max_to_keep: Optional[int] = None, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=not read_only, read_only=read_only
    )
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save(manager: ocp.CheckpointManager, step: int, *, params: dict, meta: dict, opt_state: Any = None,
         force: bool = False) -> None:
    items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    manager.save(step, args=ocp.args.Composite(**items), force=force)


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) to restore into: each device reads its own shard."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def restore(manager: ocp.CheckpointManager, step: int, *, params: dict, opt_state: Any = None) -> dict:
    """Restore into the given abstract trees; returns {'params', 'meta'[, 'opt_state']}."""
    items = {"params": ocp.args.StandardRestore(params), "meta": ocp.args.JsonRestore()}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardRestore(opt_state)
    return dict(manager.restore(step, args=ocp.args.Composite(**items)).items())


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def model_config_to_json(cfg: ModelConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def model_config_from_json(d: dict) -> ModelConfig:
    return ModelConfig.from_dict(d)


def locate(path: str | Path, step: Optional[int] = None) -> tuple[ocp.CheckpointManager, int]:
    """A read-only manager and a step, from a run directory, its checkpoints directory or one step's
    directory; the latest complete step unless `step` is given."""
    path = Path(path).absolute()
    if path.name.isdigit() and step is None:
        path, step = path.parent, int(path.name)
    for directory in (path / CHECKPOINT_SUBDIR, path):
        if directory.is_dir():
            manager = open_manager(directory, read_only=True)
            steps = manager.all_steps()
            if steps:
                chosen = max(steps) if step is None else step
                if chosen not in steps:
                    raise FileNotFoundError(f"step {chosen} is not in {directory} (complete steps: {sorted(steps)})")
                return manager, chosen
    raise FileNotFoundError(f"no complete checkpoint found at {path}")
