"""Rows -> validated, tokenized, cached samples: bad rows, truncation, parquet, cache, worker processes."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jsft.data import dataset as dataset_module
from jsft.data.dataset import DataError, load_dataset
from jsft.data.summary import format_summary, summarize

from .helpers import chat, config, target_spans, tool_call, write_jsonl

GOOD = chat(1)
CALL = {"role": "assistant", "content": None, "tool_calls": [tool_call("f", {"x": 1})]}
USER = {"role": "user", "content": "u"}

# (row as written to the JSONL file, bad-row kind, part of the message)
BAD_ROWS = [
    ("{not json", "invalid_json", "invalid JSON"),
    ("[1, 2]", "not_an_object", "not an object"),
    ({"text": "hi"}, "missing_column", "no 'messages' column"),
    ({"prompt": "hi"}, "missing_column", "no 'response' column"),
    ({"messages": {"role": "user"}}, "messages_not_list", "must be a list"),
    ({"messages": ["hi"]}, "bad_message", "messages[0] is a str"),
    ({"messages": [USER, {"role": "bot", "content": "x"}]}, "unknown_role", "unknown role 'bot'"),
    ({"messages": [USER, {"role": "assistant"}]}, "missing_content", "messages[1] (assistant) has no content"),
    ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]}, "missing_content", "messages[0] (user)"),
    ({"messages": [USER, {"role": "assistant", "content": ["a"]}]}, "bad_content", "must be a string"),
    ({"messages": [USER, {**CALL, "tool_calls": {"name": "f"}}]}, "bad_tool_calls", "must be a list"),
    ({"messages": [USER, {**CALL, "tool_calls": [{"name": "f", "arguments": {}}]}]}, "bad_tool_calls", "'function' object"),
    ({"messages": [USER, {**CALL, "tool_calls": [tool_call("", {})]}]}, "bad_tool_calls", "name must be a non-empty string"),
    ({"messages": [USER, {**CALL, "tool_calls": [tool_call("f", "{x")]}]}, "bad_tool_calls", "arguments is not valid JSON"),
    ({"messages": [USER, {**CALL, "tool_calls": [tool_call("f", [1])]}]}, "bad_tool_calls", "must be a JSON object"),
    ({"messages": [{**USER, "tool_calls": [tool_call("f", {})]}, {"role": "assistant", "content": "a"}]}, "bad_tool_calls", "only assistant"),
    ({**GOOD, "tools": {"name": "f"}}, "bad_tools", "list of JSON schemas"),
    ({"messages": [USER, {"role": "assistant", "content": "a", "train": "yes"}]}, "bad_train_flag", "'train' must be a boolean"),
    ({"messages": [{**USER, "train": True}, {"role": "assistant", "content": "a"}]}, "bad_train_flag", "true only on assistant"),
    ({"messages": [USER]}, "no_assistant", "no assistant message"),
    ({"messages": [USER, {"role": "assistant", "content": "a<|im_end|>b"}]}, "content_has_end_of_turn", "end-of-turn token"),
    ({**GOOD, "enable_thinking": "no"}, "bad_content", "must be a boolean"),
]


def bad_rows_file(tmp_path):
    """Good rows on odd lines, one bad row of each kind on even lines (line = 2 * k + 2)."""
    rows = []
    for bad, _, _ in BAD_ROWS:
        rows += [GOOD, bad]
    return write_jsonl(tmp_path / "bad.jsonl", rows)


def test_every_bad_row_kind_is_named_with_file_and_line(tmp_path, qwen):
    path = bad_rows_file(tmp_path)
    with pytest.raises(DataError) as e:
        load_dataset(config(tmp_path), qwen, path)
    message = str(e.value)
    assert f"{len(BAD_ROWS)} bad row(s)" in message and "data.on_bad_row=skip" in message
    listed = dataset_module.MAX_LISTED_ERRORS
    for k, (_, _, text) in enumerate(BAD_ROWS[:listed]):
        assert f"{path}:{2 * k + 2}: " in message and text in message, (k, text)
    # skip: each kind is counted, and every good row is kept.
    ds = load_dataset(config(tmp_path, on_bad_row="skip"), qwen, path)
    assert len(ds) == len(BAD_ROWS) and ds.stats.rows == 2 * len(BAD_ROWS)
    for k, (_, kind, text) in enumerate(BAD_ROWS):
        record = ds.stats.skipped[k]
        assert (record.where, record.kind) == (f"{path}:{2 * k + 2}", kind) and text in record.message
    counts = summarize(ds)["skipped_by_kind"]
    assert counts["missing_column"] == 2 and sum(counts.values()) == len(BAD_ROWS)


def test_template_errors_are_bad_rows(tmp_path, plain_eos):
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD, {"messages": [{"role": "system", "content": "s"}, *GOOD["messages"]]}])
    with pytest.raises(DataError, match=rf"{path}:2: chat template failed .*this template has no system role"):
        load_dataset(config(tmp_path), plain_eos, path)


def test_policy_single_and_error(tmp_path, qwen3_style):
    reasoning = {"messages": [USER, {"role": "assistant", "content": "a", "reasoning_content": "r"}, USER, {"role": "assistant", "content": "b"}]}
    path = write_jsonl(tmp_path / "r.jsonl", [GOOD, reasoning])
    ds = load_dataset(config(tmp_path, multiturn_policy="single", on_bad_row="skip"), qwen3_style, path)
    assert [b.kind for b in ds.stats.skipped] == ["not_prefix_preserving"]
    # `error` stops on such a conversation even with on_bad_row=skip: it is a template property.
    with pytest.raises(DataError, match=rf"not prefix-preserving row.*\n  {path}:2: "):
        load_dataset(config(tmp_path, multiturn_policy="error", on_bad_row="skip"), qwen3_style, path)
    ds = load_dataset(config(tmp_path), qwen3_style, path)
    assert len(ds) == 3 and ds.stats.split_conversations == 1 and list(ds.turn_index) == [-1, 0, 1]


def long_row(n_words):
    return {"messages": [{"role": "user", "content": "word " * n_words}, {"role": "assistant", "content": "the answer"}]}


def test_truncation(tmp_path, qwen):
    path = write_jsonl(tmp_path / "long.jsonl", [GOOD, long_row(200)])
    full = load_dataset(config(tmp_path, max_length=4096), qwen, path)
    ids, mask = full.sample(1)
    n = len(ids)

    with pytest.raises(DataError, match=rf"{path}:2: sample of {n} tokens is longer than data.max_length=100"):
        load_dataset(config(tmp_path, max_length=100), qwen, path)
    skipped = load_dataset(config(tmp_path, max_length=100, on_bad_row="skip"), qwen, path)
    assert len(skipped) == 1 and [b.kind for b in skipped.stats.skipped] == ["too_long"]

    left = load_dataset(config(tmp_path, max_length=100, truncation="left"), qwen, path)
    l_ids, l_mask = left.sample(1)
    assert np.array_equal(l_ids, ids[-100:]) and np.array_equal(l_mask, mask[-100:])
    assert target_spans(qwen, l_ids, l_mask) == ["the answer<|im_end|>"] and left.targets[1] == l_mask.sum()
    assert left.stats.truncated == 1

    # right truncation cuts the answer off: the sample has no target left, so it is dropped and counted.
    right = load_dataset(config(tmp_path, max_length=100, truncation="right"), qwen, path)
    assert len(right) == 1 and right.stats.dropped_truncated == 1 and right.stats.truncated == 0
    keep = load_dataset(config(tmp_path, max_length=n - 2, truncation="right"), qwen, path)
    k_ids, k_mask = keep.sample(1)
    assert np.array_equal(k_ids, ids[: n - 2]) and keep.targets[1] == mask[: n - 2].sum() > 0


def test_parquet_and_single_turn_rows(tmp_path, qwen):
    messages = [
        [USER, {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]}, {"role": "tool", "content": "1"}, {"role": "assistant", "content": "done"}],
        [USER, {"role": "bot", "content": "x"}],
    ]
    # Parquet unifies struct fields: absent ones (tool_calls on plain messages) come back as None.
    pq.write_table(pa.table({"messages": messages}), tmp_path / "a.parquet")
    single = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "response": "r"}])
    ds = load_dataset(config(tmp_path, on_bad_row="skip"), qwen, [str(tmp_path / "a.parquet"), single])
    assert [target_spans(qwen, *ds.sample(i)) for i in range(2)] == [
        ['<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call><|im_end|>', "done<|im_end|>"],
        ["r<|im_end|>"],
    ]
    assert list(ds.source_index) == [0, 2]
    assert ds.stats.skipped[0].where == f"{tmp_path / 'a.parquet'} row 1 (0-based)"


def test_custom_column_names(tmp_path, qwen):
    path = write_jsonl(tmp_path / "c.jsonl", [{"conv": GOOD["messages"]}, {"q": "p", "a": "r"}])
    ds = load_dataset(config(tmp_path, messages_key="conv", prompt_key="q", response_key="a"), qwen, path)
    assert [target_spans(qwen, *ds.sample(i)) for i in range(2)] == [["answer 0<|im_end|>"], ["r<|im_end|>"]]


def test_cache_is_reused_and_keyed_by_options(tmp_path, qwen, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(2), chat(1)])
    first = load_dataset(config(tmp_path), qwen, path)
    tokenize = dataset_module._tokenize
    monkeypatch.setattr(dataset_module, "_tokenize", lambda *a: pytest.fail("cache miss"))
    again = load_dataset(config(tmp_path, max_length=64, truncation="left", on_bad_row="skip"), qwen, path)
    assert np.array_equal(np.asarray(first.input_ids), np.asarray(again.input_ids))
    monkeypatch.setattr(dataset_module, "_tokenize", tokenize)
    last = load_dataset(config(tmp_path, train_turns="last"), qwen, path)
    assert last.targets.sum() < first.targets.sum()
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_worker_processes_give_the_same_samples(tmp_path, qwen, monkeypatch):
    rows = [chat(k % 3 + 1, prefix=f"row {k} ") for k in range(12)] + ["{bad"]
    path = write_jsonl(tmp_path / "w.jsonl", rows)
    in_process = load_dataset(config(tmp_path / "a", on_bad_row="skip"), qwen, path)
    monkeypatch.setattr(dataset_module, "MIN_ROWS_PER_WORKER", 1)
    workers = load_dataset(config(tmp_path / "b", on_bad_row="skip", num_workers=2), qwen, path)
    assert np.array_equal(np.asarray(in_process.input_ids), np.asarray(workers.input_ids))
    assert np.array_equal(np.asarray(in_process.loss_mask), np.asarray(workers.loss_mask))
    assert np.array_equal(in_process.source_index, workers.source_index)
    assert [b.where for b in workers.stats.skipped] == [f"{path}:13"]


def test_summary(tmp_path, qwen):
    rows = [GOOD, {"messages": [USER, {"role": "assistant", "content": "a", "train": False}]}, "{bad", long_row(200)]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    ds = load_dataset(config(tmp_path, on_bad_row="skip", max_length=100, truncation="left"), qwen, path)
    s = summarize(ds)
    assert s["rows"] == 4 and s["samples"] == 2 and s["zero_target_rows"] == 1 and s["skipped_bad_rows"] == 1
    assert s["tokens"] == int(ds.lengths.sum()) and s["target_tokens"] == int(ds.targets.sum())
    assert s["truncated_samples"] == 1 and sum(s["target_ratio_histogram"]) == 2
    json.dumps(s)
    text = format_summary(ds, "train")
    assert text.startswith("train: 4 rows from 1 file(s) -> 2 samples")
    assert f"{path}:3: invalid JSON" in text and "zero-target rows" in text
