"""Every test sees 8 fake CPU devices, so sharded code is exercised exactly as on a multi-GPU host."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a model hub

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
QWEN_TOKENIZER = SHARED / "tokenizers" / "qwen2.5"


@pytest.fixture(scope="session")
def qwen_tokenizer_dir():
    """The real Qwen2.5 tokenizer from ../shared; tests using it skip where it is absent."""
    if not (QWEN_TOKENIZER / "tokenizer_config.json").exists():
        pytest.skip(f"real tokenizer not found at {QWEN_TOKENIZER}")
    return QWEN_TOKENIZER


TINY = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)
LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
}


def make_tiny_hf(path, kind: str, seed: int = 0, **overrides):
    """A tiny random HF checkpoint (fp32 safetensors) with norms and biases moved away from their init."""
    import torch
    import transformers

    kw = {**TINY, **overrides}
    if kind == "qwen2":
        config = transformers.Qwen2Config(**kw)
    elif kind == "qwen3":
        config = transformers.Qwen3Config(**{"head_dim": 48, **kw})
    elif kind == "llama3":
        config = transformers.LlamaConfig(**{"rope_parameters": LLAMA3_ROPE, **kw})
    elif kind == "mistral":
        config = transformers.MistralConfig(**{"sliding_window": None, **kw})
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model


@pytest.fixture
def tiny_hf(tmp_path):
    """tiny_hf(kind, **config_overrides) -> (checkpoint dir, torch model)."""

    def make(kind: str, **overrides):
        path = tmp_path / f"hf_{kind}"
        return path, make_tiny_hf(path, kind, **overrides)

    return make


def _short_conversations(n: int, seed: int = 0) -> list[dict]:
    """Short multi-turn chats (some with a tool call) so trainer tests run at small max_length."""
    import random

    rng = random.Random(seed)
    words = "alpha beta gamma delta sun moon river stone red blue seven three".split()
    rows = []
    for i in range(n):
        msgs = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
        for _ in range(1 + i % 2):
            q = " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))
            a = " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
            msgs += [{"role": "user", "content": q + "?"}, {"role": "assistant", "content": a + "."}]
        if i % 4 == 1:
            x, y = rng.randint(1, 99), rng.randint(1, 99)
            msgs += [
                {"role": "user", "content": f"add {x} {y}"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "calculator", "arguments": {"op": "add", "a": x, "b": y}}}]},
                {"role": "tool", "content": str(x + y)},
                {"role": "assistant", "content": f"{x + y}."},
            ]
        rows.append({"messages": msgs})
    return rows


@pytest.fixture(scope="session")
def sft_setup(tmp_path_factory):
    """A tiny Qwen2 checkpoint, the built-in demo tokenizer and short train/val JSONL files."""
    import json

    from jsft.demo import build_tokenizer

    root = tmp_path_factory.mktemp("sft")
    tokenizer = build_tokenizer(root / "tokenizer")
    make_tiny_hf(root / "model", "qwen2", vocab_size=768, hidden_size=64, intermediate_size=128)
    for name, n, seed in (("train", 48, 0), ("val", 8, 1)):
        with open(root / f"{name}.jsonl", "w") as f:
            for row in _short_conversations(n, seed):
                f.write(json.dumps(row) + "\n")
    return {
        "model": str(root / "model"), "tokenizer": str(tokenizer),
        "train": str(root / "train.jsonl"), "val": str(root / "val.jsonl"), "root": root,
    }


def sft_overrides(setup: dict, run_dir, **extra) -> list[str]:
    """The trainer's key=value overrides for sft_setup, fp32 and small shapes."""
    base = {
        "model.path": setup["model"], "data.tokenizer": setup["tokenizer"],
        "data.train_files": setup["train"], "data.max_length": 256, "data.train_batch_size": 8,
        "data.micro_batch_size_per_gpu": 1, "data.num_workers": 0, "data.cache_dir": str(setup["root"] / "cache"),
        "model.dtype": "float32", "optim.lr": 1e-3, "trainer.default_local_dir": str(run_dir),
        "trainer.logger": "[]",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
