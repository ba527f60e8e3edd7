"""The built-in demo job: a config (configs/default.yaml), a data generator and an episode hook on the trainer.

`train` = `prepare` (write the generated tool-use dataset and tokenizer into <default_local_dir>/demo on
process 0, the others wait, and point data.* at them) + the generic `Trainer` + `EpisodeEval` as an extra
validation hook: it plays the held-out prompts to a final answer with the KV-cache sampler, executing the
tools the model calls, and reports val/episode_tool_call_parse_rate and val/episode_exact_answer_rate
(docs/demo.md) next to the trainer's own validation by generation (val/tool_call_parse_rate, ...).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax

from jsft import distributed
from jsft.config import RunConfig
from jsft.demo.dataset import val_prompts, write_dataset
from jsft.demo.episode import episode_metrics, run_episodes
from jsft.demo.tokenizer import build_tokenizer
from jsft.data.tokenizer import stop_token_ids
from jsft.generate import Generator
from jsft.train.loop import Trainer


def build_trainer(cfg: RunConfig) -> Trainer:
    """The demo job's trainer: its data, the generic trainer, its episodes after each validation."""
    distributed.initialize()  # before prepare asks which process this is
    trainer = Trainer(prepare(cfg, Path(cfg.trainer.default_local_dir).absolute()))
    trainer.validation_hooks.append(EpisodeEval(trainer.cfg, trainer.tokenizer, trainer.model, trainer.run_dir))
    return trainer


def train(cfg: RunConfig) -> dict:
    """Run the demo job."""
    return build_trainer(cfg).run()


def prepare(cfg: RunConfig, run_dir: Path) -> RunConfig:
    """cfg with data.train_files / val_files / tokenizer pointing at freshly generated demo assets."""
    demo = run_dir / "demo"
    if jax.process_index() == 0:
        write_dataset(demo, cfg.demo.num_train, cfg.demo.num_val, seed=cfg.demo.seed)
        build_tokenizer(demo / "tokenizer", seed=cfg.demo.seed)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jsft demo assets written")
    data = dataclasses.replace(
        cfg.data, train_files=str(demo / "train.jsonl"), val_files=str(demo / "val.jsonl"),
        tokenizer=str(demo / "tokenizer"),
    )
    return dataclasses.replace(cfg, data=data)


class EpisodeEval:
    """Validation hook: val/episode_* rates on the held-out prompts; samples/episodes_step_N.jsonl."""

    def __init__(self, cfg: RunConfig, tokenizer, model, run_dir: Path):
        self.prompts = val_prompts(cfg.demo.num_val, seed=cfg.demo.seed)
        self.tokenizer = tokenizer
        self.generator = Generator(model, max_new_tokens=cfg.demo.max_new_tokens, eos_ids=stop_token_ids(tokenizer),
                                   pad_id=tokenizer.pad_token_id or 0)
        self.samples_dir = run_dir / "samples"

    def __call__(self, params, step: int) -> dict:
        episodes = run_episodes(lambda prompts: self.generator(params, prompts), self.tokenizer, self.prompts)
        if jax.process_index() == 0:
            self.samples_dir.mkdir(parents=True, exist_ok=True)
            with open(self.samples_dir / f"episodes_step_{step}.jsonl", "w") as f:
                for e in episodes:
                    f.write(json.dumps(e.record()) + "\n")
        return {f"val/episode_{k}": v for k, v in episode_metrics(episodes).items()}
