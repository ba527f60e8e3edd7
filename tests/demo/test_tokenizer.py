import json

import pytest

from jsft.demo.dataset import rows
from jsft.demo.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, TAG_TOKENS, build_tokenizer, render
from jsft.demo.tools import TOOLS

ROWS = rows(200, seed=0) + rows(50, seed=0, split="val")


def test_building_twice_gives_identical_files(tmp_path, demo_tokenizer_dir):
    again = build_tokenizer(tmp_path / "again", seed=0)
    names = sorted(p.name for p in demo_tokenizer_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(names)
    for name in names:
        assert (demo_tokenizer_dir / name).read_bytes() == (again / name).read_bytes(), name


def test_vocabulary_is_small_and_roles_are_set(demo_tokenizer):
    assert 512 <= len(demo_tokenizer) <= 1024
    assert demo_tokenizer.eos_token == "<|im_end|>" and demo_tokenizer.pad_token == "<|endoftext|>"


@pytest.mark.parametrize("token", SPECIAL_TOKENS + TAG_TOKENS)
def test_added_tokens_are_single_ids(demo_tokenizer, token):
    ids = demo_tokenizer.encode(f"x{token}y", add_special_tokens=False)
    assert len(ids) == 3 and demo_tokenizer.convert_ids_to_tokens(ids[1]) == token


def test_tool_call_tags_survive_skipping_special_tokens(demo_tokenizer):
    ids = demo_tokenizer.encode("<|im_start|>a<tool_call>b</tool_call><|im_end|>", add_special_tokens=False)
    assert demo_tokenizer.decode(ids, skip_special_tokens=True) == "a<tool_call>b</tool_call>"


def test_saved_template_renders_every_row_as_qwen25s_own_template(demo_tokenizer, demo_tokenizer_dir,
                                                                   qwen_tokenizer_dir):
    """The demo speaks Qwen2.5's protocol: the saved tokenizer's template renders every demo row, with and
    without the generation prompt, exactly as the real Qwen2.5 tokenizer's template does."""
    from transformers import AutoTokenizer

    assert (demo_tokenizer_dir / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    qwen = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    for row in ROWS:
        for prompt in (False, True):
            ours = demo_tokenizer.apply_chat_template(row["messages"], tools=row["tools"], tokenize=False,
                                                      add_generation_prompt=prompt)
            assert ours == qwen.apply_chat_template(row["messages"], tools=row["tools"], tokenize=False,
                                                    add_generation_prompt=prompt)


def test_every_rendered_conversation_round_trips(demo_tokenizer):
    for row in ROWS:
        text = render(row["messages"], row["tools"])
        ids = demo_tokenizer.encode(text, add_special_tokens=False)
        assert demo_tokenizer.decode(ids) == text
    digits = demo_tokenizer.encode(" 90210", add_special_tokens=False)
    assert len(digits) == 6  # the space, then one id per digit


def test_template_renders_the_qwen_tool_protocol():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "calculator", "arguments": {"op": "add", "a": 2, "b": 3}}}]},
        {"role": "tool", "name": "calculator", "content": '{"result": 5}'},
        {"role": "assistant", "content": "2 plus 3 is 5."},
    ]
    text = render(messages, TOOLS)
    system, rest = text.split("<|im_end|>\n", 1)
    assert system.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert "\n<tools>\n" + "\n".join(json.dumps(t) for t in TOOLS) + "\n</tools>\n" in system
    assert rest == (
        "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "calculator", "arguments": {"op": "add", "a": 2, "b": 3}}\n'
        "</tool_call><|im_end|>\n"
        '<|im_start|>user\n<tool_response>\n{"result": 5}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n2 plus 3 is 5.<|im_end|>\n"
    )


def _generated_text(message):
    """What the model emits for an assistant message: its content, or one block per call."""
    if not message.get("tool_calls"):
        return message["content"]
    return "\n".join(f"<tool_call>\n{json.dumps(c['function'])}\n</tool_call>" for c in message["tool_calls"])


def test_template_is_prefix_preserving_at_assistant_boundaries(demo_tokenizer):
    """History renders exactly as each assistant turn was generated: prompt + turn + <|im_end|>\\n."""
    for row in ROWS:
        messages, tools = row["messages"], row["tools"]
        for turn in (i for i, m in enumerate(messages) if m["role"] == "assistant"):
            prompt = render(messages[:turn], tools, add_generation_prompt=True)
            full = render(messages[:turn + 1], tools)
            assert full == prompt + _generated_text(messages[turn]) + "<|im_end|>\n"
            assert render(messages, tools).startswith(full)
            prompt_ids = demo_tokenizer.encode(prompt, add_special_tokens=False)
            full_ids = demo_tokenizer.encode(full, add_special_tokens=False)
            assert full_ids[:len(prompt_ids)] == prompt_ids
