"""Tool calls in generated text, parsed in the format the chat template itself writes them.

The format is derived, not hard-coded: `derive_format` renders a probe assistant turn with known calls
(sentinel names and arguments) and locates them in the rendered text. Two shapes cover the families:

    name and arguments in one JSON object   <tool_call>\\n{"name": N, "arguments": {..}}\\n</tool_call>  Qwen/Hermes
                                            {"name": N, "parameters": {..}}                       Llama 3.1
                                            [TOOL_CALLS][{"name": N, "arguments": {..}}, ..]      Mistral
    the name as text, then the arguments    to=functions.N<|channel|>commentary json<|message|>{..}  harmony

From one probe call come the text before the calls (`open`), after them (`close`) and, for the second
shape, between the name and the arguments; a probe with two calls gives the text between calls
(`separator`; None where the template renders one call per turn). Parsing matches those literals with
any run of whitespace standing for any other, so `{"name": ...}` spacing and newlines do not matter,
but the markers do. Limitation: a format the template does not render (harmony's other header order, a
call written inside content) is not recognised.

`tool_call_parse_rate` (the one definition, used by validation by generation and the demo's episodes) =
well-formed calls / units over generations: every call found is a unit (parsing stops at the first malformed
one, which is a failed unit); a generation without calls where a call is expected is one failed unit, where
an answer is expected it counts nothing. A call is well formed when it parses in the template's format,
names a tool of the row's `tools` and its arguments fit that tool's JSON schema (`check_calls`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
import math
from typing import Iterable, Optional, Sequence

from jsft.eval.schema import schema_error

PROBE_NAMES = ("jsft_probe_alpha", "jsft_probe_beta")
PROBE_ARGUMENTS = ({"jsft_arg": "JSFT_VALUE_ALPHA"}, {"jsft_arg": "JSFT_VALUE_BETA"})
_NAME = re.compile(r"[\w.\-]+")
_DECODER = json.JSONDecoder()


class FormatError(ValueError):
    """The chat template's tool-call format could not be derived."""


@dataclass(frozen=True)
class ToolCall:
    name: Optional[str]
    arguments: Optional[dict]
    error: Optional[str] = None  # None: parsed (after `check_calls`, also a known tool with fitting arguments)


@dataclass(frozen=True)
class ToolCallFormat:
    """How one chat template writes an assistant turn's tool calls."""

    open: str  # text before the first call ("" for a bare JSON call)
    close: str  # text after the last call, before the stop token
    separator: Optional[str]  # text between two calls; None: the template renders at most one call per turn
    name_key: Optional[str]  # JSON key of the name ("name"); None: the name is text before the arguments
    arguments_key: Optional[str]  # JSON key of the arguments ("arguments", "parameters")
    name_to_arguments: str = ""  # name_key None: the text between the name and the arguments object

    def parse(self, text: str) -> list[ToolCall]:
        """Every call in a generation (text without its stop token), in order; the first malformed one ends
        the list and carries the reason. No calls: the turn is an answer."""
        pos = self._start(text)
        calls = []
        while pos is not None:
            call, pos = self._parse_one(text, pos)
            calls.append(call)
            if call.error:
                break
            pos, error = self._after_call(text, pos)
            if error:
                calls[-1] = replace(call, error=error)
                break
        return calls

    def content(self, text: str) -> str:
        """The text of a generation before its first call (all of it when it has none)."""
        span = self._open_span(text)
        return text if span is None else text[:span[0]]

    def _start(self, text: str) -> Optional[int]:
        span = self._open_span(text)
        return None if span is None else span[1]

    def _open_span(self, text: str) -> Optional[tuple[int, int]]:
        if self.open.split():
            return _find(text, self.open)
        start = len(text) - len(text.lstrip())
        # a bare JSON call (Llama 3.1): the turn is a call when it starts with an object
        return (start, start) if self.name_key is not None and text[start:start + 1] == "{" else None

    def _parse_one(self, text: str, pos: int) -> tuple[ToolCall, int]:
        if self.name_key is None:
            return self._parse_named(text, pos)
        obj, end, error = _decode_object(text, pos)
        if error:
            return ToolCall(None, None, error), pos
        name, arguments = obj.get(self.name_key), obj.get(self.arguments_key)
        if not isinstance(name, str) or not isinstance(arguments, dict):
            return ToolCall(None, None, f'expected a JSON object with "{self.name_key}" (a string) and '
                                        f'"{self.arguments_key}" (an object), got {_clip(text[pos:end])}'), end
        return ToolCall(name, arguments), end

    def _parse_named(self, text: str, pos: int) -> tuple[ToolCall, int]:
        chunks = self.name_to_arguments.split()
        if chunks:
            at = text.find(chunks[0], pos)
            if at < 0:
                return ToolCall(None, None, f"no {chunks[0]!r} after the tool name"), pos
            name, pos = text[pos:at].strip(), _match(text, at, self.name_to_arguments)
        else:
            found = _NAME.match(text, pos)
            name, pos = (found.group(), found.end()) if found else ("", pos)
        if pos is None or not _NAME.fullmatch(name):
            return ToolCall(None, None, f"expected a tool name and {self.name_to_arguments!r}, got {_clip(text)}"), 0
        arguments, end, error = _decode_object(text, pos)
        if error:
            return ToolCall(name, None, f"arguments: {error}"), pos
        return ToolCall(name, arguments), end

    def _after_call(self, text: str, pos: int) -> tuple[Optional[int], Optional[str]]:
        """(start of the next call or None after the last, error)."""
        if self.separator is not None:
            nxt = _match(text, pos, self.separator)
            if nxt is not None and (self.separator.split() or text[nxt:].lstrip()[:1] == "{"):
                return nxt, None
        end = _match(text, pos, self.close)
        if end is None or text[end:].strip():
            rest = text[pos:] if end is None else text[end:]
            return None, f"expected {self.close!r} to end the calls, got {_clip(rest)}"
        return None, None


def check_calls(calls: Sequence[ToolCall], tools: Optional[Sequence[dict]]) -> list[ToolCall]:
    """`calls` with `error` set on each that names no tool of `tools` or whose arguments do not fit its schema."""
    schemas = {}
    for tool in tools or ():
        fn = tool.get("function", tool)  # OpenAI {"type": "function", "function": {...}} or the bare function
        schemas[fn.get("name")] = fn.get("parameters") or {}
    out = []
    for call in calls:
        if call.error is None and call.name not in schemas:
            call = replace(call, error=f"unknown tool {call.name!r}; the row offers {sorted(map(str, schemas))}")
        elif call.error is None:
            try:
                error = schema_error(schemas[call.name], call.arguments, "arguments")
            except ValueError as e:  # a schema outside the supported subset cannot vouch for the call
                error = f"cannot check the schema: {e}"
            if error:
                call = replace(call, error=f"{call.name}: {error}")
        out.append(call)
    return out


def call_units(calls: Sequence[ToolCall], expects_call: bool) -> tuple[int, int]:
    """(well-formed calls, units) of one generation's checked calls, as `tool_call_parse_rate` counts them."""
    return sum(call.error is None for call in calls), len(calls) or int(expects_call)


def tool_call_parse_rate(units: Iterable[tuple[int, int]]) -> float:
    """Well-formed calls / units over generations (`call_units` of each, module docstring); NaN when there is
    nothing to count."""
    good = total = 0
    for g, u in units:
        good, total = good + g, total + u
    return good / total if total else math.nan


# ---- derivation from the template --------------------------------------------------------------------------------


def derive_format(tokenizer, stop_texts: Sequence[str]) -> ToolCallFormat:
    """The tool-call format `tokenizer`'s chat template writes; `stop_texts` end the assistant turn."""
    one = _probe_generation(tokenizer, 1)
    if one is None:
        raise FormatError("the chat template fails on an assistant message with tool_calls")
    start, end, keys, between = _locate(one, 0, 0)
    close = one[end:]
    cut = min((close.index(s) for s in stop_texts if s and s in close), default=len(close))
    fmt = ToolCallFormat(one[:start], close[:cut], None, *keys, name_to_arguments=between)
    two = _probe_generation(tokenizer, 2)
    try:
        s1, e1, *_ = _locate(two or "", 0, 0)
        s2, e2, *_ = _locate(two, 1, e1)
    except FormatError:  # the template refused two calls, or rendered only one
        return fmt
    if two[:s1] == fmt.open and two[e2:].startswith(fmt.close):
        return replace(fmt, separator=two[e1:s2])
    return fmt


def _probe_generation(tokenizer, n_calls: int) -> Optional[str]:
    """The text the template renders for an assistant turn with `n_calls` probe calls (None if it refuses)."""
    tools = [{"type": "function", "function": {
        "name": name, "description": "probe",
        "parameters": {"type": "object", "properties": {"jsft_arg": {"type": "string"}}, "required": ["jsft_arg"]},
    }} for name in PROBE_NAMES]
    calls = [{"id": f"probe{i:04d}", "type": "function", "function": {"name": n, "arguments": a}}
             for i, (n, a) in enumerate(zip(PROBE_NAMES[:n_calls], PROBE_ARGUMENTS[:n_calls]))]
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "tool_calls": calls}]
    try:
        prompt = tokenizer.apply_chat_template(messages[:1], tools=tools, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    except Exception:  # any template failure: raise_exception, TemplateError, TypeError
        return None
    if not full.startswith(prompt):
        raise FormatError("the rendered tool-call turn does not start with the generation prompt")
    return full[len(prompt):]


def _locate(text: str, i: int, after: int) -> tuple[int, int, tuple[Optional[str], Optional[str]], str]:
    """Probe call i in `text` (from `after`): (start, end, (name key, arguments key), name-to-arguments text)."""
    name, arguments = PROBE_NAMES[i], PROBE_ARGUMENTS[i]
    objects = _objects(text, after)
    for start, end, obj in sorted(objects, key=lambda o: o[1] - o[0]):  # the innermost object holding both
        name_keys = [k for k, v in obj.items() if v == name]
        arg_keys = [k for k, v in obj.items() if v == arguments]
        if name_keys and arg_keys:
            return start, end, (name_keys[0], arg_keys[0]), ""
    for start, end, obj in objects:
        if obj == arguments:
            at = text.rfind(name, after, start)
            if at >= 0:
                return at, end, (None, None), text[at + len(name):start]
    raise FormatError(f"could not find the probe call {name}({json.dumps(arguments)}) as JSON in the rendered "
                      f"turn {text!r}")


def _objects(text: str, after: int) -> list[tuple[int, int, dict]]:
    out = []
    for at in (m.start() for m in re.finditer(r"\{", text[after:])):
        obj, end, error = _decode_object(text, after + at)
        if not error:
            out.append((after + at, end, obj))
    return out


# ---- text helpers ------------------------------------------------------------------------------------------------


def _decode_object(text: str, pos: int) -> tuple[Optional[dict], int, Optional[str]]:
    pos += len(text[pos:]) - len(text[pos:].lstrip())
    try:
        obj, end = _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError as e:
        return None, pos, f"invalid JSON ({e.msg}) at {_clip(text[pos:])}"
    if not isinstance(obj, dict):
        return None, end, f"expected a JSON object, got {_clip(text[pos:end])}"
    return obj, end, None


def _match(text: str, pos: int, literal: str) -> Optional[int]:
    """The end of `literal` matched at text[pos:], any whitespace run matching any other (or none)."""
    for chunk in literal.split():
        pos += len(text[pos:]) - len(text[pos:].lstrip())
        if not text.startswith(chunk, pos):
            return None
        pos += len(chunk)
    return pos


def _find(text: str, literal: str) -> Optional[tuple[int, int]]:
    """(start, end) of the first match of `literal` in `text` (whitespace-tolerant, see `_match`), or None."""
    first = literal.split()[0]
    at = text.find(first)
    while at >= 0:
        end = _match(text, at, literal)
        if end is not None:
            return at, end
        at = text.find(first, at + 1)
    return None


def _clip(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")
