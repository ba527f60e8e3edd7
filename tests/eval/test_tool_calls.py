"""The tool-call format derived from chat templates (Qwen2.5, Llama 3.1, Mistral, harmony) and its parser."""

import copy

import pytest
from transformers import AutoTokenizer

from jsft.eval.tool_calls import FormatError, ToolCall, ToolCallFormat, check_calls, derive_format

# Tool-call parts of each family's template, as the real templates write them (headers shortened).
LLAMA31 = """{{- '<|begin_of_text|>' }}
{%- for message in messages %}
    {%- if 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- else %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"""

MISTRAL = """{{- '<s>' }}
{%- for message in messages %}
    {%- if message.role == 'user' %}{{- '[INST]' + message.content + '[/INST]' }}
    {%- elif message.tool_calls %}
        {{- '[TOOL_CALLS][' }}
        {%- for tool_call in message.tool_calls %}
            {{- {"name": tool_call.function.name, "arguments": tool_call.function.arguments, "id": tool_call.id} | tojson }}
            {%- if not loop.last %}{{- ', ' }}{%- endif %}
        {%- endfor %}
        {{- ']</s>' }}
    {%- else %}{{- message.content + '</s>' }}
    {%- endif %}
{%- endfor %}"""

HARMONY = """{%- for message in messages %}
    {%- if message.role == 'user' %}{{- '<|start|>user<|message|>' + message.content + '<|end|>' }}
    {%- elif message.tool_calls %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start|>assistant to=functions.' + tool_call.name + '<|channel|>commentary json<|message|>' }}
        {{- tool_call.arguments | tojson + '<|call|>' }}
    {%- else %}{{- '<|start|>assistant<|channel|>final<|message|>' + message.content + '<|end|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start|>assistant' }}{%- endif %}"""

NO_TOOLS = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"

QWEN_FORMAT = ToolCallFormat("<tool_call>\n", "\n</tool_call>", "\n</tool_call>\n<tool_call>\n", "name", "arguments")


@pytest.fixture(scope="module")
def base_tokenizer(sft_setup):
    return AutoTokenizer.from_pretrained(sft_setup["tokenizer"])  # any tokenizer: only its template is used


def _with_template(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def test_qwen25_format_is_derived_from_the_real_template(qwen_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    assert derive_format(tok, ["<|im_end|>"]) == QWEN_FORMAT


def test_qwen_format_parses_parallel_calls_with_any_spacing():
    text = ('I will look.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>{"arguments":{},"name":"b"}</tool_call>')
    assert QWEN_FORMAT.parse(text) == [ToolCall("a", {"x": 1}), ToolCall("b", {})]
    assert QWEN_FORMAT.parse("Just an answer.") == []


@pytest.mark.parametrize("text, fragment", [
    ('<tool_call>\n{"name": "a", "arguments": {"x": 1}\n</tool_call>', "invalid JSON"),
    ('<tool_call>\n{"name": "a", "args": {}}\n</tool_call>', '"arguments" (an object)'),
    ('<tool_call>\n{"name": "a", "arguments": {}}', "expected '\\n</tool_call>'"),
    ('<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call> and more', "to end the calls"),
    ('<tool_call>\n["a"]\n</tool_call>', "expected a JSON object"),
])
def test_malformed_calls_carry_the_reason(text, fragment):
    *_, last = QWEN_FORMAT.parse(text)
    assert last.error is not None and fragment in last.error, last


def test_llama31_bare_json_with_one_call_per_turn(base_tokenizer):
    fmt = derive_format(_with_template(base_tokenizer, LLAMA31), ["<|eot_id|>"])
    assert fmt == ToolCallFormat("", "", None, "name", "parameters")
    assert fmt.parse('{"name": "a", "parameters": {"x": "y"}}') == [ToolCall("a", {"x": "y"})]
    assert fmt.parse("The answer is 4.") == []
    two = fmt.parse('{"name": "a", "parameters": {}}{"name": "b", "parameters": {}}')
    assert len(two) == 1 and "to end the calls" in two[0].error  # the template renders one call per turn


def test_mistral_json_list(base_tokenizer):
    fmt = derive_format(_with_template(base_tokenizer, MISTRAL), ["</s>"])
    assert (fmt.open, fmt.close, fmt.separator, fmt.name_key, fmt.arguments_key) == (
        "[TOOL_CALLS][", "]", ", ", "name", "arguments")
    text = '[TOOL_CALLS][{"name": "a", "arguments": {"x": [1, 2]}, "id": "abcdefghi"}, {"name": "b", "arguments": {}}]'
    assert fmt.parse(text) == [ToolCall("a", {"x": [1, 2]}), ToolCall("b", {})]


def test_harmony_name_in_the_header(base_tokenizer):
    fmt = derive_format(_with_template(base_tokenizer, HARMONY), ["<|return|>"])
    assert fmt == ToolCallFormat(" to=functions.", "<|call|>", None, None, None, "<|channel|>commentary json<|message|>")
    text = ' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Oslo"}<|call|>'
    assert fmt.parse(text) == [ToolCall("get_weather", {"city": "Oslo"})]
    # with <|call|> as a stop token it is not part of the parsed text
    assert derive_format(_with_template(base_tokenizer, HARMONY), ["<|call|>"]).close == ""
    bad = fmt.parse(' to=functions.get weather<|channel|>commentary json<|message|>{}<|call|>')
    assert "expected a tool name" in bad[0].error


def test_a_template_without_tool_calls_fails_clearly(base_tokenizer):
    with pytest.raises(FormatError, match="could not find the probe call"):
        derive_format(_with_template(base_tokenizer, NO_TOOLS), ["\n"])


TOOLS = [{"type": "function", "function": {"name": "calc", "parameters": {
    "type": "object", "properties": {"op": {"type": "string", "enum": ["add", "sub"]}, "a": {"type": "integer"}},
    "required": ["op", "a"], "additionalProperties": False}}}]


@pytest.mark.parametrize("call, fragment", [
    (ToolCall("calc", {"op": "add", "a": 1}), None),
    (ToolCall("nope", {}), "unknown tool 'nope'"),
    (ToolCall("calc", {"op": "add", "a": "1"}), "arguments.a: expected integer"),
    (ToolCall("calc", {"op": "add"}), "missing required property 'a'"),
    (ToolCall("calc", {"op": "mul", "a": 1}), "not one of"),
    (ToolCall("calc", {"op": "add", "a": 1, "b": 2}), "unexpected property 'b'"),
])
def test_calls_are_checked_against_the_rows_tools(call, fragment):
    [checked] = check_calls([call], TOOLS)
    assert checked.error is None if fragment is None else fragment in checked.error


def test_a_row_without_tools_makes_every_call_unknown():
    [checked] = check_calls([ToolCall("calc", {"op": "add", "a": 1})], None)
    assert "unknown tool" in checked.error
