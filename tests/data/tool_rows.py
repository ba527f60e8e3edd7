"""Tool-use rows for the format tests: several tools with different argument schemas, parallel calls,
rows without tools, messages with and without tool_calls, reasoning on some messages only; and a probe of
the Python memory a read holds."""

import json
import tracemalloc

from jsft.data.tokenizer import load_tokenizer

from .helpers import tool_call


def _tool(name, properties, required=(), description=None):
    function = {"name": name, **({"description": description} if description else {})}
    parameters = {"type": "object", "properties": properties, **({"required": list(required)} if required else {})}
    return {"type": "function", "function": {**function, "parameters": parameters}}


# Tools with different argument schemas: Arrow's union of them is what a struct column stores.
WEATHER = _tool("get_weather", {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}}, ["city"], "Current weather")
SEARCH = _tool("search", {"query": {"type": "string"}, "limit": {"type": "integer", "minimum": 1}}, ["query"], "Web search")
EMAIL = _tool("send_email", {"to": {"type": "array", "items": {"type": "string"}}, "subject": {"type": "string"}, "body": {"type": "string"}}, ["to", "body"])
CLOCK = _tool("get_time", {}, description="Current UTC time")


def user(text):
    return {"role": "user", "content": text}


ROWS = [
    {  # parallel calls with ids, tool messages with names; the first row has every column (datasets.from_list)
        "messages": [
            {"role": "system", "content": "You are terse."},
            user("Weather in Paris, and news about it?"),
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", **tool_call("get_weather", {"city": "Paris", "unit": "c"})},
                {"id": "c2", **tool_call("search", {"query": "Paris news", "limit": 3})},
            ]},
            {"role": "tool", "name": "get_weather", "tool_call_id": "c1", "content": "18 C, cloudy"},
            {"role": "tool", "name": "search", "tool_call_id": "c2", "content": "Museum reopens"},
            {"role": "assistant", "content": "18 C and cloudy; a museum reopens."},
        ],
        "tools": [WEATHER, SEARCH],
        "enable_thinking": False,
    },
    {  # no tools; reasoning on one assistant message only
        "messages": [
            user("2 + 2?"),
            {"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."},
            user("And 3 + 3?"),
            {"role": "assistant", "content": "6"},
        ],
    },
    {  # reasoning with a call, content absent on a call-only message, a call with no arguments
        "messages": [
            user("Mail Bob the time."),
            {"role": "assistant", "reasoning_content": "I need the time first.", "tool_calls": [tool_call("get_time", {})]},
            {"role": "tool", "content": "12:00"},
            {"role": "assistant", "content": "Sending now.", "tool_calls": [
                tool_call("send_email", {"to": ["bob@example.com"], "subject": "Time", "body": "It is 12:00."})]},
            {"role": "tool", "content": "sent"},
            {"role": "assistant", "content": "Done."},
        ],
        "tools": [EMAIL, CLOCK, WEATHER],
    },
    {  # one tool; an argument left out
        "messages": [
            user("Find jax docs"),
            {"role": "assistant", "content": "", "tool_calls": [tool_call("search", {"query": "jax docs"})]},
            {"role": "tool", "content": "jax.readthedocs.io"},
            {"role": "assistant", "content": "See jax.readthedocs.io."},
        ],
        "tools": [SEARCH],
        "enable_thinking": True,
    },
    {"messages": [{"role": "system", "content": "Be kind."}, user("Hi"), {"role": "assistant", "content": "Hello!"}]},
]
TOOL_ROWS = [0, 2, 3]


def build_tokenizer(directory):
    """A byte-level BPE tokenizer trained here on these rows (the demo's builder: a Qwen2.5-style tool template)."""
    from jsft.demo import build_tokenizer

    return load_tokenizer(str(build_tokenizer(directory, texts=[json.dumps(r) for r in ROWS] * 20)))


def all_samples(ds):
    """Every sample of a TokenizedDataset as (row, turn, input_ids bytes, loss_mask bytes)."""
    return [(int(ds.source_index[i]), int(ds.turn_index[i]), *map(bytes, ds.sample(i))) for i in range(len(ds))]


def without_null_fields(row):
    """The row as jsft reads it from any format: a message's null field is an absent one."""
    messages = [{k: v for k, v in m.items() if v is not None} for m in row["messages"]]
    return {**row, "messages": messages}


def python_bytes(read) -> int:
    """Peak bytes of Python objects allocated while `read()` runs (Arrow's own buffers are not counted)."""
    tracemalloc.start()
    try:
        read()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
