import math

import pytest

from jsft.demo.protocol import FORMAT, checked_calls, exact_answer_rate
from jsft.demo.tools import TOOLS
from jsft.eval.tool_calls import call_units, derive_format, tool_call_parse_rate


def rate(generations, expects_call=None):
    """The demo's tool_call_parse_rate of `generations` (by default every one should call)."""
    expects_call = [True] * len(generations) if expects_call is None else expects_call
    return tool_call_parse_rate(call_units(checked_calls(text, TOOLS), expected)
                                for text, expected in zip(generations, expects_call, strict=True))


def block(body):
    return f"<tool_call>\n{body}\n</tool_call>"


GOOD = block('{"name": "calculator", "arguments": {"op": "add", "a": 2, "b": 3}}')
GOOD_LOOKUP = block('{"name": "lookup", "arguments": {"country": "Avalor", "field": "capital"}}')
BAD = {
    "bad JSON": block('{"name": "calculator", "arguments": {"op": "add", "a": 2, "b": 3}'),
    "not a call object": block('["calculator", {"op": "add"}]'),
    "arguments as a string": block('{"name": "calculator", "arguments": "{\\"op\\": \\"add\\"}"}'),
    "unknown tool": block('{"name": "weather", "arguments": {"city": "Redhill"}}'),
    "wrong type": block('{"name": "calculator", "arguments": {"op": "add", "a": "2", "b": 3}}'),
    "not in enum": block('{"name": "lookup", "arguments": {"country": "France", "field": "capital"}}'),
    "missing argument": block('{"name": "calculator", "arguments": {"op": "add", "a": 2}}'),
    "extra argument": block('{"name": "calculator", "arguments": {"op": "add", "a": 2, "b": 3, "c": 4}}'),
    "never closed": '<tool_call>\n{"name": "calculator", "arguments": {"op": "add", "a": 2, "b": 3}}',
    "close without open": '{"name": "calculator", "arguments": {"op": "add", "a": 2, "b": 3}}\n</tool_call>',
}


def test_the_demo_format_is_what_the_trainer_derives_from_the_demo_template(demo_tokenizer):
    assert derive_format(demo_tokenizer, [demo_tokenizer.eos_token]) == FORMAT


def test_parse_reads_name_and_arguments_of_each_block():
    text = "Let me check.\n" + GOOD + "\n" + GOOD_LOOKUP
    assert [(c.name, c.arguments, c.error) for c in checked_calls(text, TOOLS)] == [
        ("calculator", {"op": "add", "a": 2, "b": 3}, None),
        ("lookup", {"country": "Avalor", "field": "capital"}, None),
    ]
    assert FORMAT.content(text) == "Let me check.\n" and FORMAT.content("The answer is 5.") == "The answer is 5."


def test_parse_reports_tag_errors():
    reopened = checked_calls("<tool_call>{}<tool_call>{}", TOOLS)
    assert len(reopened) == 1 and "expected a JSON object" in reopened[0].error
    (unclosed,) = checked_calls(GOOD.replace("</tool_call>", "") + GOOD, TOOLS)  # opened again before closed
    assert unclosed.name == "calculator" and "to end the calls" in unclosed.error
    assert checked_calls("The answer is 5.", TOOLS) == []


def test_good_generations_score_one():
    assert rate([GOOD, GOOD_LOOKUP, GOOD + "\n" + GOOD_LOOKUP]) == 1.0


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_bad_call_fails(case):
    assert rate([BAD[case]]) == 0.0


def test_rate_counts_calls_and_a_missing_call_as_one_failure():
    generations = [GOOD + "\n" + BAD["unknown tool"], "The answer is 5.", GOOD]
    assert rate(generations) == pytest.approx(2 / 4)
    # Where an answer is expected, a missing call is no failure.
    assert rate(generations, expects_call=[True, False, True]) == pytest.approx(2 / 3)
    assert math.isnan(rate(["The answer is 5."], expects_call=[False]))


def test_exact_answer_rate_normalises_whitespace_only():
    answers = [" The answer is 5.\n", "The answer is 6.", None, "the answer is 5."]
    assert exact_answer_rate(answers, ["The answer is 5."] * 4) == 0.25
    with pytest.raises(ValueError):
        exact_answer_rate(answers, [])
