"""The built-in demo job's glue to the trainer: make its data and tokenizer, and validate by generation.

`prepare` writes the generated tool-use dataset and the tokenizer into <default_local_dir>/demo (process 0;
the others wait) and points data.* at them. `GenerationEval` plays the held-out prompts with the model's
KV-cache sampler, executing the tools it calls, and scores the protocol (see docs/demo.md).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax

from jsft.config import RunConfig
from jsft.demo.dataset import val_prompts, write_dataset
from jsft.demo.episode import episode_metrics, run_episodes
from jsft.demo.tokenizer import build_tokenizer


def prepare(cfg: RunConfig, run_dir: Path) -> RunConfig:
    """cfg with data.train_files / val_files / tokenizer pointing at freshly generated demo assets."""
    demo = run_dir / "demo"
    if jax.process_index() == 0:
        paths = write_dataset(demo, cfg.demo.num_train, cfg.demo.num_val, seed=cfg.demo.seed)
        build_tokenizer(demo / "tokenizer", seed=cfg.demo.seed)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jsft demo assets written")
    data = dataclasses.replace(
        cfg.data, train_files=str(demo / "train.jsonl"), val_files=str(demo / "val.jsonl"),
        tokenizer=str(demo / "tokenizer"),
    )
    return dataclasses.replace(cfg, data=data)


class GenerationEval:
    """val/tool_call_parse_rate and val/exact_answer_rate on the held-out prompts; samples/step_N.jsonl."""

    def __init__(self, cfg: RunConfig, tokenizer, generator, run_dir: Path):
        self.prompts = val_prompts(cfg.demo.num_val, seed=cfg.demo.seed)
        self.tokenizer, self.generator = tokenizer, generator
        self.samples_dir = run_dir / "samples"

    def __call__(self, params, step: int) -> dict:
        episodes = run_episodes(lambda prompts: self.generator(params, prompts), self.tokenizer, self.prompts)
        if jax.process_index() == 0:
            self.samples_dir.mkdir(parents=True, exist_ok=True)
            with open(self.samples_dir / f"step_{step}.jsonl", "w") as f:
                for e in episodes:
                    f.write(json.dumps(e.record()) + "\n")
        return {f"val/{k}": v for k, v in episode_metrics(episodes).items()}
