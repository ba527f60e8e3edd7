"""Templates as they ship: DeepSeek-V3 / R1 (tool-call arguments concatenated as a JSON string, a call-only turn
tested with `content is none`) and GLM-4.5 (no end-of-turn token: generation stops on the next role's header,
listed in generation_config's eos_token_id). Masks are exact, and every trained span is what the model generates
after the inference prompt: the ids before each target span decode to add_generation_prompt's rendering of the
turns before it.

Templates: templates/deepseek_v3.jinja, deepseek_r1.jinja (deepseek-ai/DeepSeek-V3 and DeepSeek-R1
tokenizer_config.json chat_template), glm4_5.jinja (zai-org/GLM-4.5 tokenizer_config.json chat_template). The
tokenizers are stand-ins: the Qwen2.5 vocabulary plus each family's special tokens and its generation_config."""

import copy
import json

import numpy as np
import pytest

from jsft.data.chat import ChatOptions, ChatRenderer, call_form, render
from jsft.data.conversation import RowKeys, parse_row
from jsft.data.tokenizer import describe_stop_tokens, load_tokenizer, read_chat_template, stop_tokens

from .helpers import TEMPLATES, target_spans

DS_SPECIAL = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"]
DS_ADDED = ["<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
            "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>",
            "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"]
GLM_SPECIAL = ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
GLM_ADDED = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
             "</arg_value>", "<tool_response>", "</tool_response>"]


def _family(qwen, directory, template, special, added, eos_ids, **tokens):
    tok = copy.deepcopy(qwen)
    tok.add_special_tokens({"additional_special_tokens": special})
    tok.add_tokens(added)
    for name, value in tokens.items():
        setattr(tok, name, value)
    tok.chat_template = read_chat_template(str(TEMPLATES / template))
    tok.save_pretrained(directory)
    ids = tok.convert_tokens_to_ids(eos_ids)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": ids if len(ids) > 1 else ids[0]}))
    return load_tokenizer(str(directory))


@pytest.fixture(scope="module", params=["deepseek_v3.jinja", "deepseek_r1.jinja"])
def deepseek(qwen, tmp_path_factory, request):
    return _family(qwen, tmp_path_factory.mktemp("deepseek"), request.param, DS_SPECIAL, DS_ADDED,
                   ["<｜end▁of▁sentence｜>"], bos_token=DS_SPECIAL[0], eos_token=DS_SPECIAL[1])


@pytest.fixture(scope="module")
def glm(qwen, tmp_path_factory):
    return _family(qwen, tmp_path_factory.mktemp("glm"), "glm4_5.jinja", GLM_SPECIAL, GLM_ADDED,
                   ["<|endoftext|>", "<|user|>", "<|observation|>"], eos_token="<|endoftext|>")


def call(city, as_text):
    arguments = {"city": city}
    return {"type": "function", "function": {"name": "get_weather",
                                             "arguments": json.dumps(arguments, separators=(",", ":")) if as_text else arguments}}


def conversation(as_text=True):
    return [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call("Paris", as_text), call("Oslo", as_text)]},
        {"role": "tool", "content": "21"},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "Paris: 21, Oslo: 4."},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "You are welcome."},
    ]


def check_against_inference(tok, renderer, messages, sample):
    """Each target span follows exactly the inference prompt of its turn: the ids before it decode to
    add_generation_prompt=True's rendering of the messages before that assistant turn."""
    conv = parse_row({"messages": messages}, RowKeys())
    turns = [j for j, m in enumerate(conv.messages) if m["role"] == "assistant"]
    mask = np.asarray(sample.loss_mask)
    starts = [t for t in range(len(mask)) if mask[t] and (t == 0 or not mask[t - 1])]
    assert len(starts) == len(turns)
    for j, start in zip(turns, starts):
        prompt = renderer._render(conv, conv.messages[:j], True)
        assert tok.decode(sample.input_ids[:start]) == prompt


def test_deepseek_tool_arguments_render_as_the_rows_json_text(deepseek):
    assert call_form(deepseek) == (True, True)  # JSON-string arguments, null content kept
    assert stop_tokens(deepseek) == ("<｜end▁of▁sentence｜>",)
    renderer = ChatRenderer(deepseek, ChatOptions())
    messages = conversation(as_text=True)
    samples, split = renderer.samples(parse_row({"messages": messages}, RowKeys()))
    assert len(samples) == 1 and not split
    s = samples[0]
    assert target_spans(deepseek, s.input_ids, s.loss_mask) == [
        '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city":"Paris"}\n```'
        '<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city":"Oslo"}\n```'
        '<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>',
        "Paris: 21, Oslo: 4.<｜end▁of▁sentence｜>",
        "You are welcome.<｜end▁of▁sentence｜>",
    ]
    check_against_inference(deepseek, renderer, messages, s)
    # the sample is the template's own rendering of the row (as the rows were given: JSON-text arguments)
    full = render(deepseek, messages, None, False, True)
    assert deepseek.decode(s.input_ids) == full


def test_deepseek_mapping_arguments_render_as_json_text(deepseek):
    s = ChatRenderer(deepseek, ChatOptions()).samples(parse_row({"messages": conversation(as_text=False)}, RowKeys()))[0][0]
    assert '```json\n{"city": "Paris"}\n```' in target_spans(deepseek, s.input_ids, s.loss_mask)[0]


def test_glm45_turns_stop_on_the_next_roles_header(glm):
    assert call_form(glm) == (False, False)  # `tojson` per argument value of a mapping
    assert stop_tokens(glm) == ("<|endoftext|>", "<|user|>", "<|observation|>")
    assert "a turn's stop is the next role's header, <|user|>" in describe_stop_tokens(glm)
    renderer = ChatRenderer(glm, ChatOptions())
    messages = conversation(as_text=True)  # OpenAI JSON-text arguments: read as the mapping GLM renders
    samples, split = renderer.samples(parse_row({"messages": messages}, RowKeys()))
    assert len(samples) == 1 and not split
    s = samples[0]
    assert target_spans(glm, s.input_ids, s.loss_mask) == [
        "\n<think></think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
        "</tool_call>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Oslo</arg_value>\n</tool_call>"
        "<|observation|>",
        "\n<think></think>\nParis: 21, Oslo: 4.<|user|>",
        "\n<think></think>\nYou are welcome.<|user|>",  # the last turn stops as the model stops: on <|user|>
    ]
    check_against_inference(glm, renderer, messages, s)
    ids = glm.convert_tokens_to_ids(["<|observation|>", "<|user|>"])
    trained = np.asarray(s.input_ids)[np.asarray(s.loss_mask) == 1]
    assert list(trained).count(ids[0]) == 1 and list(trained).count(ids[1]) == 2  # one token each, as generated


def test_glm45_without_stop_ids_in_generation_config_is_refused(qwen, tmp_path):
    tok = copy.deepcopy(qwen)
    tok.add_special_tokens({"additional_special_tokens": GLM_SPECIAL})
    tok.chat_template = read_chat_template(str(TEMPLATES / "glm4_5.jinja"))
    tok.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="renders no end-of-turn token"):
        load_tokenizer(str(tmp_path))
