"""The built-in demo job end to end, shrunk: generated data + tokenizer, random init, validation by generation
(generic and the demo's tool-executing episodes), samples, HF export. (The full job is `python -m jsft.train`;
it takes minutes.)"""

import json

import transformers

from jsft.config import DEFAULT_CONFIG, load_config
from jsft.demo.job import train


def test_demo_job_runs_end_to_end(tmp_path):
    cfg = load_config(DEFAULT_CONFIG, [
        f"trainer.default_local_dir={tmp_path}", "demo.num_train=32", "demo.num_val=4", "demo.max_new_tokens=24",
        "trainer.total_training_steps=2", "trainer.test_freq=2", "model.init.hidden_size=64",
        "model.init.intermediate_size=128", "model.init.num_hidden_layers=1", "data.micro_batch_size_per_gpu=1",
        "data.num_workers=0", "trainer.val_generations=3", "trainer.val_max_new_tokens=24",
    ])
    last = train(cfg)
    assert last["step"] == 2
    for name in ("episode_tool_call_parse_rate", "episode_exact_answer_rate", "exact_match", "stop_rate"):
        assert 0.0 <= last[f"val/{name}"] <= 1.0, name
    assert 1 <= last["val/generation_length"] <= 24
    episodes = [json.loads(line) for line in open(tmp_path / "samples" / "episodes_step_2.jsonl")]
    assert len(episodes) == 4 and all(e["generations"] for e in episodes)
    samples = [json.loads(line) for line in open(tmp_path / "samples" / "step_2.jsonl")]
    assert len(samples) == 3 and all(s["reference"].endswith("<|im_end|>") for s in samples)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.vocab_size % 64 == 0
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").eos_token == "<|im_end|>"
