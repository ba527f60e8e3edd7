"""One tokenizer built per test session (about a second), shared by the tokenizer and episode tests."""

import pytest
from transformers import AutoTokenizer

from jsft.demo.tokenizer import build_tokenizer


@pytest.fixture(scope="session")
def demo_tokenizer_dir(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("demo_tokenizer"), seed=0)


@pytest.fixture(scope="session")
def demo_tokenizer(demo_tokenizer_dir):
    return AutoTokenizer.from_pretrained(demo_tokenizer_dir)
