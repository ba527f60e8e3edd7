"""A raw row -> a validated `Conversation` (OpenAI-style messages, tools, template options).

Every problem raises `BadRow(kind, message)`; the message names the message index and the field, the
caller adds the file and row. Validation is strict on purpose: anything the chat template would render
differently from what the data author meant is rejected rather than trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from jsft.data.sources import BadRow

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class RowKeys:
    """The column names of `data.*` that locate a conversation in a row."""

    messages: str = "messages"
    tools: str = "tools"
    enable_thinking: str = "enable_thinking"
    prompt: str = "prompt"
    response: str = "response"
    prompt_path: tuple = ()  # veRL's data.prompt_dict_keys: keys into a nested prompt column
    response_path: tuple = ()  # veRL's data.response_dict_keys


@dataclass
class Conversation:
    messages: list[dict]  # exactly what the chat template sees
    tools: Optional[list[dict]] = None
    template_kwargs: dict = field(default_factory=dict)  # extra template variables (enable_thinking, data.apply_chat_template_kwargs)
    train: dict[int, bool] = field(default_factory=dict)  # message index -> the per-message `train` override
    # (message index, call index) -> the call's arguments as the JSON text the row gave (or json.dumps of its
    # mapping): what a template that concatenates `arguments` as a string (DeepSeek-V3/R1) renders
    argument_texts: dict = field(default_factory=dict)


def parse_row(record: dict, keys: RowKeys, template_kwargs: Optional[dict] = None) -> Conversation:
    """Validate one row and normalise it into the form chat templates expect; `template_kwargs`
    (data.apply_chat_template_kwargs) are passed to the template under the row's own enable_thinking."""
    texts: dict = {}
    messages = _messages(_raw_messages(record, keys), texts)
    # `train` is ours, not the template's: keep it out of what the template renders.
    train = {j: m.pop("train") for j, m in enumerate(messages) if "train" in m}
    kwargs = {**(template_kwargs or {}), **_template_kwargs(record, keys)}
    return Conversation(messages, _tools(record.get(keys.tools), keys.tools), kwargs, train, texts)


def _raw_messages(record: dict, keys: RowKeys) -> Any:
    if record.get(keys.messages) is not None:
        return _maybe_json(record[keys.messages], keys.messages, "messages_not_list")
    if record.get(keys.prompt) is not None or record.get(keys.response) is not None:
        return _single_turn(record, keys)
    raise BadRow(
        "missing_column",
        f"row has no '{keys.messages}' column (nor '{keys.prompt}' and '{keys.response}' for a single-turn row); "
        f"its columns: {', '.join(map(str, record)) or 'none'}. Set data.messages_key (veRL: "
        "data.multiturn.messages_key), or data.prompt_key and data.response_key",
    )


def _maybe_json(value: Any, name: str, kind: str) -> Any:
    # Parquet datasets often store nested columns as JSON strings.
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise BadRow(kind, f"'{name}' is a string that is not valid JSON: {e}") from None
    return value


def _single_turn(record: dict, keys: RowKeys) -> list[dict]:
    prompt = _column(record, keys.prompt, keys.prompt_path, "prompt")
    response = _column(record, keys.response, keys.response_path, "response")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _column(record: dict, key: str, path: tuple, which: str) -> str:
    """record[key], then down `path` (veRL's data.{which}_dict_keys) through nested objects; a string."""
    if record.get(key) is None:
        raise BadRow("missing_column", f"single-turn row has no '{key}' column; its columns: "
                     f"{', '.join(map(str, record)) or 'none'}. Set data.{which}_key (or data.messages_key)")
    # a nested column stored as a JSON string (some Parquet writers) is read as the object it holds
    value, where = (_maybe_json(record[key], key, "bad_content") if path else record[key]), key
    for name in path:
        if not isinstance(value, dict) or value.get(name) is None:
            found = ", ".join(map(str, value)) if isinstance(value, dict) else type(value).__name__
            raise BadRow("missing_column", f"'{where}' has no key '{name}' (it has: {found}); "
                         f"set data.{which}_dict_keys")
        value, where = value[name], f"{where}.{name}"
    if not isinstance(value, str):
        raise BadRow("bad_content", f"'{where}' must be a string, got {type(value).__name__}")
    return value


def _messages(messages: Any, texts: dict) -> list[dict]:
    if not isinstance(messages, list):
        raise BadRow("messages_not_list", f"messages must be a list, got {type(messages).__name__}")
    out = [_message(m, j, texts) for j, m in enumerate(messages)]
    if not any(m["role"] == "assistant" for m in out):
        raise BadRow("no_assistant", "conversation has no assistant message")
    return out


def _message(msg: Any, j: int, texts: dict) -> dict:
    if not isinstance(msg, dict):
        raise BadRow("bad_message", f"messages[{j}] is a {type(msg).__name__}, not an object")
    # A null field is an absent one (Parquet cannot tell them apart); content is always passed, as
    # OpenAI writes it, so a call-only message renders the same whether its content was null or absent.
    msg = {k: v for k, v in msg.items() if v is not None}
    msg.setdefault("content", None)
    role = msg.get("role")
    if role not in ROLES:
        raise BadRow("unknown_role", f"messages[{j}] has unknown role {role!r} (allowed: {', '.join(ROLES)})")
    if msg.get("tool_calls") == []:
        del msg["tool_calls"]  # OpenAI exports write an empty list for "no calls"
    if "tool_calls" in msg:
        if role != "assistant":
            raise BadRow("bad_tool_calls", f"messages[{j}] ({role}) has tool_calls; only assistant messages may")
        msg["tool_calls"] = [_tool_call(c, j, i, texts) for i, c in enumerate(_tool_call_list(msg["tool_calls"], j))]
    content = msg.get("content")
    if content is None and "tool_calls" not in msg:
        raise BadRow("missing_content", f"messages[{j}] ({role}) has no content and no tool_calls")
    if content is not None and not isinstance(content, str):
        raise BadRow("bad_content", f"messages[{j}] ({role}) content must be a string, got {type(content).__name__}")
    if "reasoning_content" in msg and not isinstance(msg["reasoning_content"], str):
        raise BadRow("bad_content", f"messages[{j}] reasoning_content must be a string")
    if "train" in msg and (not isinstance(msg["train"], bool) or (msg["train"] and role != "assistant")):
        raise BadRow("bad_train_flag", f"messages[{j}] ({role}) 'train' must be a boolean, and true only on assistant messages")
    return msg


def _tool_call_list(calls: Any, j: int) -> list:
    calls = _maybe_json(calls, f"messages[{j}].tool_calls", "bad_tool_calls")
    if not isinstance(calls, list):
        raise BadRow("bad_tool_calls", f"messages[{j}].tool_calls must be a list, got {type(calls).__name__}")
    return calls


def _tool_call(call: Any, j: int, i: int, texts: dict) -> dict:
    where = f"messages[{j}].tool_calls[{i}]"
    call = {k: v for k, v in call.items() if v is not None} if isinstance(call, dict) else {}
    fn = call.get("function")
    if not isinstance(fn, dict):
        raise BadRow("bad_tool_calls", f"{where} must be an object with a 'function' object")
    if call.get("type", "function") != "function":
        raise BadRow("bad_tool_calls", f"{where} has type {call['type']!r}; only 'function' is supported")
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise BadRow("bad_tool_calls", f"{where}.function.name must be a non-empty string")
    args = fn.get("arguments")
    # OpenAI stores arguments as a JSON string; chat templates render a mapping (`arguments | tojson`).
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise BadRow("bad_tool_calls", f"{where}.function.arguments is not valid JSON: {e}") from None
    if not isinstance(args, dict):
        raise BadRow("bad_tool_calls", f"{where}.function.arguments must be a JSON object")
    texts[(j, i)] = fn["arguments"] if isinstance(fn["arguments"], str) else json.dumps(args, ensure_ascii=False)
    return {**call, "function": {**fn, "arguments": args}}


def _tools(tools: Any, name: str) -> Optional[list[dict]]:
    tools = _maybe_json(tools, name, "bad_tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise BadRow("bad_tools", f"'{name}' must be a list of JSON schemas (objects)")
    return tools or None


def _template_kwargs(record: dict, keys: RowKeys) -> dict:
    value = record.get(keys.enable_thinking)
    if value is None:
        return {}  # not passed at all, so templates see `enable_thinking is not defined`
    if not isinstance(value, bool):
        raise BadRow("bad_content", f"'{keys.enable_thinking}' must be a boolean, got {value!r}")
    return {"enable_thinking": value}
