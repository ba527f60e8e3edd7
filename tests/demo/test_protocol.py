import math

import pytest

from jsft.demo.protocol import exact_answer_rate, parse_tool_calls, tool_call_parse_rate
from jsft.demo.tools import TOOLS


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


def test_parse_reads_name_and_arguments_of_each_block():
    calls = parse_tool_calls("Let me check.\n" + GOOD + "\n" + GOOD_LOOKUP)
    assert [(c.name, c.arguments, c.error) for c in calls] == [
        ("calculator", {"op": "add", "a": 2, "b": 3}, None),
        ("lookup", {"country": "Avalor", "field": "capital"}, None),
    ]


def test_parse_reports_tag_errors():
    assert [c.error for c in parse_tool_calls("<tool_call>{}<tool_call>{}")] == [
        "<tool_call> opened again before </tool_call>", "<tool_call> never closed"]
    assert parse_tool_calls("The answer is 5.") == []


def test_good_generations_score_one():
    assert tool_call_parse_rate([GOOD, GOOD_LOOKUP, GOOD + "\n" + GOOD_LOOKUP], TOOLS) == 1.0


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_bad_call_fails(case):
    assert tool_call_parse_rate([BAD[case]], TOOLS) == 0.0


def test_rate_counts_calls_and_a_missing_call_as_one_failure():
    generations = [GOOD + "\n" + BAD["unknown tool"], "The answer is 5.", GOOD]
    assert tool_call_parse_rate(generations, TOOLS) == pytest.approx(2 / 4)
    # Where an answer is expected, a missing call is no failure.
    assert tool_call_parse_rate(generations, TOOLS, expects_call=[True, False, True]) == pytest.approx(2 / 3)
    assert math.isnan(tool_call_parse_rate(["The answer is 5."], TOOLS, expects_call=[False]))
    with pytest.raises(ValueError):
        tool_call_parse_rate(generations, TOOLS, expects_call=[True])


def test_exact_answer_rate_normalises_whitespace_only():
    answers = [" The answer is 5.\n", "The answer is 6.", None, "the answer is 5."]
    assert exact_answer_rate(answers, ["The answer is 5."] * 4) == 0.25
    with pytest.raises(ValueError):
        exact_answer_rate(answers, [])
