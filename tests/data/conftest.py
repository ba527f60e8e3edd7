"""Tokenizers for the data tests: the real Qwen2.5 one, variants carrying templates we wrote, and stand-ins
for other families: the Qwen2.5 vocabulary plus the family's real special tokens, its real chat template
(templates/gpt_oss.jinja: openai/gpt-oss-120b; command_r7b*.jinja: CohereForAI/c4ai-command-r7b-12-2024
default and tool_use; llama3_1.jinja: meta-llama/Llama-3.1-8B-Instruct; as vendored by llama.cpp in
models/templates/) and its generation_config.json `eos_token_id`, saved and loaded as a checkpoint is."""

import copy
import json

import pytest

from jsft.data.tokenizer import load_tokenizer, read_chat_template

from .helpers import TEMPLATES


@pytest.fixture(scope="session")
def qwen(qwen_tokenizer_dir):
    return load_tokenizer(str(qwen_tokenizer_dir))


def _variant(qwen, template, special_tokens=(), eos_token=None, bos_token=None):
    tok = copy.deepcopy(qwen)
    if special_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    if eos_token:
        tok.eos_token = eos_token
    if bos_token:
        tok.bos_token = bos_token
    tok.chat_template = read_chat_template(str(TEMPLATES / template))
    return tok


def _family(qwen, directory, template, specials, eos_ids, **tokens):
    """A family stand-in saved to `directory` with `generation_config.json` stopping on `eos_ids` (token
    texts), then loaded through `load_tokenizer` as a real checkpoint's tokenizer is."""
    tok = _variant(qwen, template, specials, **tokens)
    tok.save_pretrained(directory)
    ids = tok.convert_tokens_to_ids(eos_ids)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": ids if len(ids) > 1 else ids[0]}))
    return directory


HARMONY_SPECIALS = ["<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>"]
COHERE_SPECIALS = ["<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|USER_TOKEN|>",
                   "<|CHATBOT_TOKEN|>", "<|START_RESPONSE|>", "<|END_RESPONSE|>", "<|START_THINKING|>", "<|END_THINKING|>",
                   "<|START_ACTION|>", "<|END_ACTION|>", "<|START_TOOL_RESULT|>", "<|END_TOOL_RESULT|>"]
LLAMA31_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]


@pytest.fixture(scope="session")
def harmony_dir(qwen, tmp_path_factory):
    """gpt-oss: EOS <|return|>; generation_config stops on <|return|>, <|endoftext|>, <|call|>."""
    return _family(qwen, tmp_path_factory.mktemp("harmony"), "gpt_oss.jinja", HARMONY_SPECIALS,
                   ["<|return|>", "<|endoftext|>", "<|call|>"], eos_token="<|return|>")


@pytest.fixture(scope="session")
def harmony(harmony_dir):
    return load_tokenizer(str(harmony_dir))


@pytest.fixture(scope="session")
def cohere2_dir(qwen, tmp_path_factory):
    """Command R7B (Cohere 2): the default template, and the tool_use one transformers picks when tools are
    passed; EOS and generation_config stop on <|END_OF_TURN_TOKEN|>, not on <|END_RESPONSE|>."""
    directory = tmp_path_factory.mktemp("cohere2")
    tok = _variant(qwen, "command_r7b.jinja", COHERE_SPECIALS, eos_token="<|END_OF_TURN_TOKEN|>", bos_token="<BOS_TOKEN>")
    tok.chat_template = {"default": tok.chat_template, "tool_use": read_chat_template(str(TEMPLATES / "command_r7b_tool_use.jinja"))}
    tok.save_pretrained(directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": tok.convert_tokens_to_ids("<|END_OF_TURN_TOKEN|>")}))
    return directory


@pytest.fixture(scope="session")
def cohere2(cohere2_dir):
    return load_tokenizer(str(cohere2_dir))


def _llama31(qwen, directory, template):
    return _family(qwen, directory, template, LLAMA31_SPECIALS, ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
                   eos_token="<|eot_id|>", bos_token="<|begin_of_text|>")


@pytest.fixture(scope="session")
def llama31(qwen, tmp_path_factory):
    """Llama 3.1 Instruct: EOS <|eot_id|>; generation_config stops on <|end_of_text|>, <|eom_id|>, <|eot_id|>."""
    return load_tokenizer(str(_llama31(qwen, tmp_path_factory.mktemp("llama31"), "llama3_1.jinja")))


@pytest.fixture(scope="session")
def llama31_builtin_dir(qwen, tmp_path_factory):
    """The same with built-in tools enabled (the template's `builtin_tools`, set in front of the real
    template): tool calls then end with <|eom_id|>, final answers with <|eot_id|>."""
    template = tmp_path_factory.mktemp("templates") / "llama3_1_builtin.jinja"
    template.write_text('{%- set builtin_tools = ["brave_search", "wolfram_alpha"] %}\n' + (TEMPLATES / "llama3_1.jinja").read_text())
    return _llama31(qwen, tmp_path_factory.mktemp("llama31_builtin"), str(template))


@pytest.fixture(scope="session")
def llama31_builtin(llama31_builtin_dir):
    return load_tokenizer(str(llama31_builtin_dir))


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
