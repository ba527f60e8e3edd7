"""The run's device mesh, chosen or checked against the model's parameter shapes before any weight exists.

    trainer.mesh: auto            -> the largest fsdp that divides the devices and shards every large tensor,
                                     the rest on data (HSDP), printed with the reason
    trainer.mesh: {data: 3, fsdp: 8} -> used as given; a large tensor it cannot shard stops the run here
    trainer.mesh.sequence=4          -> (or ulysses_sequence_parallel_size=4) each row's tokens over 4 devices,
                                     data/fsdp as above over the rest; Ulysses, or ring where 4 cannot split the heads;
                                     a group may span processes (jsft/train/feeders.py says who feeds which rows)
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
from jax.sharding import Mesh

from jsft.config import sequence_parallel_size
from jsft.models.config import ModelConfig
from jsft.models.params import param_layout
from jsft.models import sequence_parallel
from jsft.sharding import AUTO, make_mesh
from jsft.train.feeders import mesh_feeders


def run_model_config(cfg) -> ModelConfig:
    """The decoder's config of a run: model.path's config.json (no weights read) or model.init, whose
    vocab_size may come from data.tokenizer (as the trainer fills it)."""
    if cfg.model.path:
        return ModelConfig.from_pretrained(cfg.model.path)
    if cfg.model.init:
        init = dict(cfg.model.init)
        if "vocab_size" not in init:
            from jsft.data.tokenizer import load_tokenizer
            from jsft.train.loop import random_init_config  # lazy: the loop imports this module

            if not cfg.data.tokenizer:
                raise ValueError("model.init has no vocab_size: set it, or data.tokenizer to take it from")
            return random_init_config(init, load_tokenizer(cfg.data.tokenizer))
        return ModelConfig.from_init(init)
    raise ValueError("nothing to plan: set model.path (a checkpoint directory), model.init or --preset")


def run_mesh(cfg, log: Optional[Callable[[str], None]] = None, model_cfg: Optional[ModelConfig] = None) -> Mesh:
    """trainer.mesh over all devices, chosen (auto) or checked for the run's parameter shapes and heads."""
    model_cfg = model_cfg or run_model_config(cfg)
    s = sequence_parallel_size(cfg)
    # ulysses or ring (heads Ulysses cannot split stop the run only with trainer.sequence_parallel=ulysses)
    _, seq_line = sequence_parallel.for_run(cfg, model_cfg)
    log = log if log is None or s == 1 else (lambda line, log=log: log(f"{line}; {seq_line}"))
    axes = cfg.trainer.mesh
    if s > 1:  # the alias key, or trainer.mesh.sequence on top of auto / an explicit {data, fsdp}
        axes = {**(axes if axes != AUTO else {}), "sequence": s}
    mesh = make_mesh(axes, jax.devices(), params=param_layout(model_cfg), log=log)
    try:  # processes that share rows (a sequence group spanning them) must share all of them
        mesh_feeders(mesh)
    except ValueError as e:
        raise ValueError(f"trainer.mesh.sequence={s}: {e}; use trainer.mesh.sequence in "
                         f"{_feedable_sizes(cfg.trainer.sequence_parallel, model_cfg)} (data/fsdp auto), which these processes can feed") from None
    return mesh


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
