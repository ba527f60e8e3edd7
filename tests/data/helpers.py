"""Shared helpers for the data tests: decode target spans, write rows, build configs and tokenizers."""

from __future__ import annotations

import itertools
import json
import pathlib

import numpy as np

from jsft.data.chat import ChatOptions, ChatRenderer
from jsft.data.config import DataConfig
from jsft.data.conversation import RowKeys, parse_row

TEMPLATES = pathlib.Path(__file__).parent / "templates"


def target_spans(tokenizer, ids, mask) -> list[str]:
    """Each maximal run of target tokens, decoded."""
    ids, mask = np.asarray(ids), np.asarray(mask)
    runs = itertools.groupby(range(len(ids)), key=lambda t: mask[t])
    return [tokenizer.decode(ids[list(r)]) for target, r in runs if target]


def samples_of(tokenizer, messages, tools=None, enable_thinking=None, **options):
    """The samples of one conversation row, parsed and validated as the pipeline does."""
    record = {"messages": messages, "tools": tools, "enable_thinking": enable_thinking}
    return ChatRenderer(tokenizer, ChatOptions(**options)).samples(parse_row(record, RowKeys()))


def write_jsonl(path: pathlib.Path, rows) -> str:
    """Rows are dicts (dumped as JSON) or raw strings (written as they are)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def config(tmp_path, **overrides) -> DataConfig:
    return DataConfig(**{"cache_dir": str(tmp_path / "cache"), "num_workers": 0, **overrides})


def tool_call(name, arguments, as_string=False):
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments) if as_string else arguments}}


def chat(n_turns: int, prefix: str = "") -> dict:
    """A simple multi-turn row: user/assistant pairs."""
    messages = []
    for k in range(n_turns):
        messages += [{"role": "user", "content": f"{prefix}question {k}"}, {"role": "assistant", "content": f"{prefix}answer {k}"}]
    return {"messages": messages}
