"""Every test sees 8 fake CPU devices, so sharded code is exercised exactly as on a multi-GPU host."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
