"""Masks: the exact supervised ids of each conversation shape, with the real Qwen2.5 template and ours."""

import copy
import json
import shutil

import pytest

from jsft.data.chat import ChatOptions, ChatRenderer
from jsft.data.sources import BadRow
from jsft.data.tokenizer import load_tokenizer, stop_tokens

from .helpers import TEMPLATES, samples_of, target_spans, tool_call

WEATHER_TOOL = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def one_sample(tokenizer, messages, **kw):
    samples, split = samples_of(tokenizer, messages, **kw)
    assert len(samples) == 1 and not split
    return samples[0]


def test_qwen_end_of_turn_is_detected(qwen, llama3_style, plain_eos):
    assert stop_tokens(qwen) == ("<|im_end|>",)
    # Found from the template, although the tokenizer's EOS is another token.
    assert stop_tokens(llama3_style) == ("<|eot_id|>", "<|im_end|>")
    assert stop_tokens(plain_eos) == ("<|endoftext|>",)


@pytest.mark.parametrize(
    "template, error",
    [
        ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}", "no end-of-turn token"),
        ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}", "ignores add_generation_prompt"),
    ],
    ids=["no_end_of_turn", "ignores_generation_prompt"],
)
def test_unusable_templates_are_refused(qwen, template, error):
    tok = copy.deepcopy(qwen)
    tok.chat_template = template
    with pytest.raises(ValueError, match=error):
        ChatRenderer(tok, ChatOptions())


def test_tool_calls_parallel_and_consecutive_tool_messages(qwen):
    messages = [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [tool_call("get_weather", {"city": "Paris"}), tool_call("get_weather", {"city": "Oslo"})]},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "tool", "content": '{"temp": 4}'},
        {"role": "assistant", "content": "Paris: 21°C, Oslo: 4°C."},
    ]
    s = one_sample(qwen, messages, tools=WEATHER_TOOL)
    assert target_spans(qwen, s.input_ids, s.loss_mask) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>',
        "Paris: 21°C, Oslo: 4°C.<|im_end|>",
    ]
    # The sample is the whole conversation as the template renders it, up to the last EOS: the two tool
    # results share one user block, and the glue "\n" after each EOS is context.
    full = qwen.apply_chat_template(messages, tools=WEATHER_TOOL, tokenize=False)
    assert qwen.decode(s.input_ids) == full[: -len("\n")]
    assert s.mismatch == -1


def test_tool_call_with_content(qwen):
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [tool_call("get_weather", {"city": "Paris"}, as_string=True)]},
    ]
    s = one_sample(qwen, messages, tools=WEATHER_TOOL)
    assert target_spans(qwen, s.input_ids, s.loss_mask) == [
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    ]


def test_role_headers_and_glue_are_context(qwen):
    s = one_sample(qwen, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}])
    assert target_spans(qwen, s.input_ids, s.loss_mask) == ["b<|im_end|>", "d<|im_end|>"]
    eos = qwen.convert_tokens_to_ids("<|im_end|>")
    ends = [t for t, i in enumerate(s.input_ids) if i == eos]
    # system, user, assistant b, user, assistant d: only the assistants' EOS are targets, and the sample
    # ends on the last one (nothing after it can be trained).
    assert [int(s.loss_mask[t]) for t in ends] == [0, 0, 1, 0, 1]
    assert ends[-1] == len(s.input_ids) - 1
    assert qwen.decode(s.input_ids[ends[2] + 1 : ends[2] + 3]) == "\n<|im_start|>"


def test_unicode_and_newline_edges_with_alignment_check(qwen):
    content = "\n\nÜnïcödé 日本語 🚀\n"
    s = one_sample(qwen, [{"role": "user", "content": "\nhi\n"}, {"role": "assistant", "content": content}])
    assert target_spans(qwen, s.input_ids, s.loss_mask) == [content + "<|im_end|>"]
    # The targets are G tokenized on its own, exactly.
    assert s.input_ids[s.loss_mask == 1].tolist() == qwen.encode(content + "<|im_end|>", add_special_tokens=False)
    # One-pass tokenization merges the header's "\n" with the content's "\n\n"; the piecewise ids (what the
    # model emits after the prompt) are kept and the mismatch is reported where the prompt's last token is.
    prompt_len = int(s.loss_mask.argmax())
    assert s.mismatch == prompt_len - 1


def test_train_turns_last(qwen):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    s = one_sample(qwen, messages, train_turns="last")
    assert target_spans(qwen, s.input_ids, s.loss_mask) == ["d<|im_end|>"]
    assert "b<|im_end|>" in qwen.decode(s.input_ids)  # earlier turns stay as context


def test_train_tool_calls_false_and_per_message_override(qwen):
    call = {"role": "assistant", "content": None, "tool_calls": [tool_call("get_weather", {"city": "Oslo"})]}
    messages = [{"role": "user", "content": "w?"}, call, {"role": "tool", "content": "4"}, {"role": "assistant", "content": "4°C"}]
    s = one_sample(qwen, messages, tools=WEATHER_TOOL, train_tool_calls=False)
    assert target_spans(qwen, s.input_ids, s.loss_mask) == ["4°C<|im_end|>"]
    # `train` on a message overrides both train_tool_calls and train_turns.
    forced = [messages[0], {**call, "train": True}, messages[2], {**messages[3], "train": False}]
    s = one_sample(qwen, forced, tools=WEATHER_TOOL, train_tool_calls=False, train_turns="last")
    assert target_spans(qwen, s.input_ids, s.loss_mask) == ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>']
    assert "4°C" not in qwen.decode(s.input_ids)  # turns after the last trained one are not rendered


def test_no_trained_turn_gives_no_sample(qwen):
    samples, split = samples_of(qwen, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "train": False}])
    assert samples == [] and not split


def test_content_containing_end_of_turn_is_a_bad_row(qwen):
    with pytest.raises(BadRow) as e:
        samples_of(qwen, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b<|im_end|>c"}])
    assert e.value.kind == "content_has_end_of_turn"


def test_llama3_style_template(llama3_style):
    tok = llama3_style
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [tool_call("get_weather", {"city": "Paris"})]},
        {"role": "tool", "content": "21"},
        {"role": "assistant", "content": "  It is 21.  "},
    ]
    s = one_sample(tok, messages, tools=WEATHER_TOOL)
    assert target_spans(tok, s.input_ids, s.loss_mask) == ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', "It is 21.<|eot_id|>"]
    assert tok.decode(s.input_ids) == tok.apply_chat_template(messages, tools=WEATHER_TOOL, tokenize=False)
    assert tok.decode(s.input_ids[:1]) == "<|begin_of_text|>" and s.loss_mask[0] == 0


def test_plain_template_with_eos_and_text_glue(plain_eos):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    s = one_sample(plain_eos, messages)
    assert target_spans(plain_eos, s.input_ids, s.loss_mask) == ["b<|endoftext|>", "d<|endoftext|>"]
    assert plain_eos.decode(s.input_ids) == "### user:\na\n\n### assistant:\nb<|endoftext|>\n\n### user:\nc\n\n### assistant:\nd<|endoftext|>"


REASONING = [
    {"role": "user", "content": "q1"},
    {"role": "assistant", "content": "a1", "reasoning_content": "think 1"},
    {"role": "user", "content": "q2"},
    {"role": "assistant", "content": "a2", "reasoning_content": "think 2"},
]


def test_non_prefix_preserving_template_is_split_per_turn(qwen3_style):
    tok = qwen3_style
    samples, split = samples_of(tok, REASONING)
    assert split and [s.turn_index for s in samples] == [0, 1]
    assert [target_spans(tok, s.input_ids, s.loss_mask) for s in samples] == [
        ["<think>\nthink 1\n</think>\n\na1<|im_end|>"],
        ["<think>\nthink 2\n</think>\n\na2<|im_end|>"],
    ]
    # Turn 1's context is exactly P_1, where the template dropped turn 0's reasoning.
    p1 = tok.apply_chat_template(REASONING[:3], tokenize=False, add_generation_prompt=True)
    assert tok.decode(samples[1].input_ids) == p1 + "<think>\nthink 2\n</think>\n\na2<|im_end|>"
    assert "think 1" not in p1


def test_reasoning_kept_within_one_user_turn_stays_one_sample(qwen3_style):
    tok = qwen3_style
    messages = [
        {"role": "user", "content": "w?"},
        {"role": "assistant", "content": "", "reasoning_content": "need a tool", "tool_calls": [tool_call("get_weather", {"city": "Oslo"})]},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "4°C", "reasoning_content": "got it"},
    ]
    s = one_sample(tok, messages)
    assert target_spans(tok, s.input_ids, s.loss_mask) == [
        '<think>\nneed a tool\n</think>\n\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>',
        "<think>\ngot it\n</think>\n\n4°C<|im_end|>",
    ]


def test_enable_thinking_false_puts_the_empty_think_block_in_the_prompt(qwen3_style):
    tok = qwen3_style
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    thinking = one_sample(tok, messages)
    assert target_spans(tok, thinking.input_ids, thinking.loss_mask) == ["<think>\n\n</think>\n\na<|im_end|>"]
    plain = one_sample(tok, messages, enable_thinking=False)
    assert target_spans(tok, plain.input_ids, plain.loss_mask) == ["a<|im_end|>"]
    assert tok.decode(plain.input_ids).endswith("assistant\n<think>\n\n</think>\n\na<|im_end|>")


def test_multiturn_policies(qwen, qwen3_style):
    with pytest.raises(BadRow) as e:
        samples_of(qwen3_style, REASONING, multiturn_policy="single")
    assert e.value.kind == "not_prefix_preserving" and "turn 1" in e.value.message
    samples, split = samples_of(qwen, REASONING, multiturn_policy="split")
    assert split and len(samples) == 2
    samples, split = samples_of(qwen, REASONING, multiturn_policy="single")
    assert not split and len(samples) == 1


def test_chat_template_sources(tmp_path, qwen_tokenizer_dir):
    no_template = tmp_path / "tok"
    shutil.copytree(qwen_tokenizer_dir, no_template)
    config_file = no_template / "tokenizer_config.json"
    config_file.write_text(json.dumps({k: v for k, v in json.loads(config_file.read_text()).items() if k != "chat_template"}))
    with pytest.raises(ValueError, match=f"the tokenizer at {no_template} has no chat template; set data.chat_template"):
        load_tokenizer(str(no_template))
    from_file = load_tokenizer(str(no_template), str(TEMPLATES / "plain_eos.jinja"))
    assert from_file.chat_template == (TEMPLATES / "plain_eos.jinja").read_text()
    inline = "{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    assert load_tokenizer(str(no_template), inline).chat_template == inline
    with pytest.raises(ValueError, match="neither an existing file nor a Jinja template"):
        load_tokenizer(str(no_template), "templates/missing.jinja")


def test_ablation_trains_the_tool_outputs(qwen):
    """The deliberately wrong mask of the demo's ablation: the block between generations becomes a target."""
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [tool_call("get_weather", {"city": "Paris"})]},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "21°C."},
    ]
    right = one_sample(qwen, messages, tools=WEATHER_TOOL)
    wrong = one_sample(qwen, messages, tools=WEATHER_TOOL, ablation_train_tool_outputs=True)
    assert (right.input_ids == wrong.input_ids).all()
    spans = target_spans(qwen, wrong.input_ids, wrong.loss_mask)
    assert len(spans) == 1 and '<tool_response>\n{"temp": 21}\n</tool_response>' in spans[0]
    assert not any("tool_response" in s for s in target_spans(qwen, right.input_ids, right.loss_mask))
