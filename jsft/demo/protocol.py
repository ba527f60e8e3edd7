"""The demo's tool-call protocol, read with the trainer's parser (jsft/eval/tool_calls.py), and the answer rate.

Protocol: an assistant turn calls tools with one block per call,
`<tool_call>\n{"name": <tool name>, "arguments": <JSON object>}\n</tool_call>` (Qwen2.5's, which the demo's chat
template writes: `FORMAT` is what `derive_format` finds in it); a turn without calls is a final answer.

Definitions (docs/demo.md repeats them):
- `tool_call_parse_rate`: jsft/eval/tool_calls.py's one definition (well-formed calls / units), with a call
  expected at turn t of an episode whose reference calls tools in its first `tool_rounds` turns.
- `exact_answer_rate` = final answers equal to the reference after trimming and collapsing whitespace; a
  missing answer (None) counts as wrong.
"""

import math
from typing import Optional, Sequence

from jsft.eval.tool_calls import ToolCall, ToolCallFormat, check_calls

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FORMAT = ToolCallFormat(f"{OPEN}\n", f"\n{CLOSE}", f"\n{CLOSE}\n{OPEN}\n", "name", "arguments")


def checked_calls(text: str, tools: Sequence[dict]) -> list[ToolCall]:
    """The calls of one generation in the demo's format, each with `error` set where it is not well formed."""
    return check_calls(FORMAT.parse(text), tools)


def exact_answer_rate(final_answers: Sequence[Optional[str]], expected: Sequence[str]) -> float:
    """Share of answers equal to the reference after whitespace normalisation; None (no answer) is wrong."""
    if len(final_answers) != len(expected):
        raise ValueError(f"{len(final_answers)} answers but {len(expected)} references")
    if not expected:
        return math.nan
    return sum(map(answer_matches, final_answers, expected)) / len(expected)


def answer_matches(answer: Optional[str], expected: str) -> bool:
    return answer is not None and " ".join(answer.split()) == " ".join(expected.split())
