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


from jsft_testing import short_conversations, make_tiny_hf  # noqa: E402


@pytest.fixture
def tiny_hf(tmp_path):
    """tiny_hf(kind, **config_overrides) -> (checkpoint dir, torch model)."""

    def make(kind: str, **overrides):
        path = tmp_path / f"hf_{kind}"
        return path, make_tiny_hf(path, kind, **overrides)

    return make


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
            for row in short_conversations(n, seed):
                f.write(json.dumps(row) + "\n")
    return {
        "model": str(root / "model"), "tokenizer": str(tokenizer),
        "train": str(root / "train.jsonl"), "val": str(root / "val.jsonl"), "root": root,
    }
