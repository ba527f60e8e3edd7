"""Checks of the tool-call protocol on generated text, and the two validation rates.

Protocol: an assistant turn calls tools with one block per call,
`<tool_call>\n{"name": <tool name>, "arguments": <JSON object>}\n</tool_call>`; a turn without blocks is a final
answer.

Definitions (docs/demo.md repeats them):
- A call is *well formed* when its block is closed, its body parses as a JSON object with exactly the keys
  `name` (a string) and `arguments` (an object), the name is one of the offered tools, and the arguments fit
  that tool's JSON schema.
- `tool_call_parse_rate` = well-formed calls / units, where every block (closed or not, and every stray
  `</tool_call>`) is one unit, and a generation that should call a tool but has no block at all is one unit
  that fails. Generations that should answer count only the blocks they contain.
- `exact_answer_rate` = final answers equal to the reference after trimming and collapsing whitespace; a
  missing answer (None) counts as wrong.
"""

import json
import math
import re
from dataclasses import dataclass, replace
from typing import Optional, Sequence

from jsft.eval.schema import schema_error

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_TAGS = re.compile(f"{re.escape(OPEN)}|{re.escape(CLOSE)}")


@dataclass(frozen=True)
class ParsedCall:
    raw: str  # the block's body, or the offending text for tag errors
    name: Optional[str] = None
    arguments: Optional[dict] = None
    error: Optional[str] = None  # None: well formed (after `check_call`, also known and fitting its schema)


def parse_tool_calls(text: str) -> list[ParsedCall]:
    """Every `<tool_call>` block in `text`, in order, each parsed or carrying the reason it is not a call."""
    calls, body_start = [], None
    for tag in _TAGS.finditer(text):
        if tag.group() == OPEN:
            if body_start is not None:
                calls.append(ParsedCall(text[body_start:tag.start()], error=f"{OPEN} opened again before {CLOSE}"))
            body_start = tag.end()
        elif body_start is None:
            calls.append(ParsedCall(text[:tag.start()], error=f"{CLOSE} without {OPEN}"))
        else:
            calls.append(_parse_body(text[body_start:tag.start()]))
            body_start = None
    if body_start is not None:
        calls.append(ParsedCall(text[body_start:], error=f"{OPEN} never closed"))
    return calls


def _parse_body(body: str) -> ParsedCall:
    try:
        payload = json.loads(body)
    except json.JSONDecodeError as e:
        return ParsedCall(body, error=f"invalid JSON: {e}")
    if not isinstance(payload, dict) or set(payload) != {"name", "arguments"}:
        return ParsedCall(body, error='expected a JSON object with exactly the keys "name" and "arguments"')
    name, arguments = payload["name"], payload["arguments"]
    if not isinstance(name, str) or not isinstance(arguments, dict):
        return ParsedCall(body, error='"name" must be a string and "arguments" a JSON object')
    return ParsedCall(body, name, arguments)


def check_call(call: ParsedCall, tools: Sequence[dict]) -> ParsedCall:
    """`call` with `error` set if it is malformed, names no tool in `tools` or does not fit its schema."""
    if call.error:
        return call
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in tools}
    if call.name not in schemas:
        return replace(call, error=f"unknown tool {call.name!r}; known: {sorted(schemas)}")
    if error := schema_error(schemas[call.name], call.arguments, "arguments"):
        return replace(call, error=f"{call.name}: {error}")
    return call


def checked_calls(text: str, tools: Sequence[dict]) -> list[ParsedCall]:
    return [check_call(call, tools) for call in parse_tool_calls(text)]


def tool_call_parse_rate(generations: Sequence[str], tools: Sequence[dict],
                         expects_call: Optional[Sequence[bool]] = None) -> float:
    """Well-formed calls / units (module docstring); `expects_call` defaults to every generation should call.

    NaN when there is nothing to count (no blocks and no call expected).
    """
    expects_call = [True] * len(generations) if expects_call is None else expects_call
    if len(expects_call) != len(generations):
        raise ValueError(f"{len(generations)} generations but {len(expects_call)} expects_call flags")
    counts = [call_units(text, tools, expected) for text, expected in zip(generations, expects_call)]
    return ratio(counts)


def call_units(text: str, tools: Sequence[dict], expects_call: bool) -> tuple[int, int]:
    """(well-formed calls, units) of one generation, as `tool_call_parse_rate` counts them."""
    calls = checked_calls(text, tools)
    if not calls:
        return 0, int(expects_call)
    return sum(call.error is None for call in calls), len(calls)


def ratio(counts: Sequence[tuple[int, int]]) -> float:
    good, units = (sum(column) for column in zip(*counts)) if counts else (0, 0)
    return good / units if units else math.nan


def exact_answer_rate(final_answers: Sequence[Optional[str]], expected: Sequence[str]) -> float:
    """Share of answers equal to the reference after whitespace normalisation; None (no answer) is wrong."""
    if len(final_answers) != len(expected):
        raise ValueError(f"{len(final_answers)} answers but {len(expected)} references")
    if not expected:
        return math.nan
    return sum(map(answer_matches, final_answers, expected)) / len(expected)


def answer_matches(answer: Optional[str], expected: str) -> bool:
    return answer is not None and " ".join(answer.split()) == " ".join(expected.split())
