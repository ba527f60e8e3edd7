"""Tokenizers for the data tests: the real Qwen2.5 one and variants carrying templates we wrote."""

import copy

import pytest

from jsft.data.tokenizer import load_tokenizer, read_chat_template

from .helpers import TEMPLATES


@pytest.fixture(scope="session")
def qwen(qwen_tokenizer_dir):
    return load_tokenizer(str(qwen_tokenizer_dir))


def _variant(qwen, template, special_tokens=(), eos_token=None):
    tok = copy.deepcopy(qwen)
    if special_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    if eos_token:
        tok.eos_token = eos_token
    tok.chat_template = read_chat_template(str(TEMPLATES / template))
    return tok


@pytest.fixture(scope="session")
def llama3_style(qwen):
    """Llama-3-style headers; turns end with <|eot_id|> while the tokenizer's EOS stays <|im_end|>."""
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    return _variant(qwen, "llama3_style.jinja", specials)


@pytest.fixture(scope="session")
def qwen3_style(qwen):
    """Qwen3-style reasoning template: not prefix-preserving across user turns."""
    return _variant(qwen, "qwen3_style.jinja")


@pytest.fixture(scope="session")
def plain_eos(qwen):
    """Plain-text roles ending assistant turns with EOS = <|endoftext|>."""
    return _variant(qwen, "plain_eos.jinja", eos_token="<|endoftext|>")
