"""The built-in demo job end to end, shrunk: generated data + tokenizer, random init, validation by generation
(generic and the demo's tool-executing episodes), samples, HF export. (The full job is `python -m jsft.train`;
it takes minutes.)"""

import json
import math

import transformers

from jsft.config import DEFAULT_CONFIG, load_config
from jsft.demo.dataset import val_prompts
from jsft.demo.job import train


def _mean(values):
    values = list(values)
    return sum(map(float, values)) / len(values)


def check_logged_rates(last, episodes, samples, tool_rounds):
    """The logged val/* rates, recounted here from the samples files the job wrote, by their definitions
    (docs/demo.md, docs/training.md). Two steps from random init write no tool call (checked), so a turn
    expected to call (turn < tool_rounds) is one failed unit and nothing else counts."""
    assert not any("<tool_call>" in g for e in episodes for g in e["generations"])
    assert not any("<tool_call>" in s["generation"] or "<tool_call>" in s["reference"] for s in samples)
    expected_calls = sum(t < rounds for e, rounds in zip(episodes, tool_rounds, strict=True)
                         for t in range(len(e["generations"])))
    assert expected_calls > 0 and last["val/episode_tool_call_parse_rate"] == 0.0
    norm = lambda text: " ".join(text.split())  # noqa: E731
    assert last["val/episode_exact_answer_rate"] == _mean(
        e["final_answer"] is not None and norm(e["final_answer"]) == norm(e["expected"]) for e in episodes)
    assert math.isnan(last["val/tool_call_parse_rate"])  # no call found, and no reference turn calls
    assert last["val/exact_match"] == _mean(s["generation"] == s["reference"] for s in samples)
    assert last["val/stop_rate"] == _mean(s["generation"].endswith("<|im_end|>") for s in samples)


def test_demo_job_runs_end_to_end(tmp_path):
    cfg = load_config(DEFAULT_CONFIG, [
        f"trainer.default_local_dir={tmp_path}", "demo.num_train=32", "demo.num_val=4", "demo.max_new_tokens=24",
        "trainer.total_training_steps=2", "trainer.test_freq=2", "model.init.hidden_size=64",
        "model.init.intermediate_size=128", "model.init.num_hidden_layers=1", "data.micro_batch_size_per_gpu=1",
        "data.num_workers=0", "trainer.val_generations=3", "trainer.val_max_new_tokens=24",
    ])
    last = train(cfg)
    assert last["step"] == 2
    assert 1 <= last["val/generation_length"] <= 24
    episodes = [json.loads(line) for line in open(tmp_path / "samples" / "episodes_step_2.jsonl")]
    assert len(episodes) == 4 and all(e["generations"] for e in episodes)
    samples = [json.loads(line) for line in open(tmp_path / "samples" / "step_2.jsonl")]
    assert len(samples) == 3 and all(s["reference"].endswith("<|im_end|>") for s in samples)
    check_logged_rates(last, episodes, samples, [p.tool_rounds for p in val_prompts(4, seed=cfg.demo.seed)])
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.vocab_size % 64 == 0
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").eos_token == "<|im_end|>"
