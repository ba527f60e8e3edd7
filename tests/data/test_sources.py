"""Parquet read as the JSON rows it was written from (pandas' to_parquet): samples byte for byte, Arrow types,
file:row errors, random access, batched reading."""

import copy
import pickle

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jsft.data import sources
from jsft.data.arrow_rows import to_rows
from jsft.data.chat import ChatOptions, ChatRenderer
from jsft.data.dataset import DataError, load_dataset
from jsft.data.sources import RawRow, RowSource
from jsft.data.tokenizer import read_chat_template

from .helpers import TEMPLATES, config, tool_call, write_jsonl
from .tool_rows import ROWS, TOOL_ROWS, all_samples, build_tokenizer, python_bytes, user, without_null_fields


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(params=["built", "built+qwen3_style", "qwen2.5", "qwen2.5+qwen3_style"])
def tokenizer(request, built):
    """Templates rendering `tools | tojson`, tool-call `arguments | tojson` and (qwen3_style) reasoning."""
    name, _, template = request.param.partition("+")
    tok = built if name == "built" else request.getfixturevalue("qwen")
    if template:
        tok = copy.deepcopy(tok)
        tok.chat_template = read_chat_template(str(TEMPLATES / f"{template}.jinja"))
    return tok


def write_parquet(path, rows, **kwargs) -> str:
    """As users write it: a pandas DataFrame of the rows."""
    pd.DataFrame(rows).to_parquet(path, **kwargs)
    return str(path)


def rendered(renderer, record):
    return [(bytes(s.input_ids), bytes(s.loss_mask)) for s in renderer(RawRow(0, "", record)).samples]


def test_parquet_rows_give_the_json_rows_samples(tmp_path, tokenizer):
    jsonl = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    parquet = write_parquet(tmp_path / "rows.parquet", ROWS)
    expected = all_samples(load_dataset(config(tmp_path), tokenizer, jsonl))
    assert {s[0] for s in expected} == set(range(len(ROWS)))
    assert all_samples(load_dataset(config(tmp_path), tokenizer, parquet)) == expected

    # The test can fail: read plainly, the file holds invented nulls, and they change the rendered tokens.
    plain = pq.read_table(parquet).to_pylist()
    assert plain[0]["messages"][2]["tool_calls"][0]["function"]["arguments"]["to"] is None
    renderer = ChatRenderer(tokenizer, ChatOptions())
    differs = [r for r in range(len(ROWS)) if rendered(renderer, plain[r]) != rendered(renderer, ROWS[r])]
    assert set(TOOL_ROWS) <= set(differs)


def test_parquet_row_reads_as_its_json_row(tmp_path):
    parquet = write_parquet(tmp_path / "rows.parquet", ROWS)
    assert [row.record for row in RowSource([parquet])] == [without_null_fields(r) for r in ROWS]


def test_json_string_arguments_pass_through_with_their_nulls(tmp_path, built):
    rows = [{"messages": [user("u"), {"role": "assistant", "content": None, "tool_calls": [tool_call("f", args, as_string=True)]}]}
            for args in ({"x": None, "y": 1}, {"z": "a"})]
    parquet = write_parquet(tmp_path / "s.parquet", rows)
    assert [r.record for r in RowSource([parquet])] == [without_null_fields(r) for r in rows]
    ds = load_dataset(config(tmp_path), built, parquet)
    assert '"arguments": {"x": null, "y": 1}' in built.decode(ds.sample(0)[0])


def test_arrow_types_convert_as_json_reads():
    """Struct fields: nulls dropped at every depth. Maps, list items, arrow.json: the row's own nulls kept."""
    ef = pa.struct([("e", pa.int64()), ("f", pa.int64())])
    struct = pa.struct([("a", pa.int64()), ("b", pa.struct([("c", pa.string()), ("d", pa.list_(ef))]))])
    table = pa.table({
        "s": pa.array([{"a": 1, "b": {"c": None, "d": [{"e": 1, "f": None}, None]}}, {"a": None, "b": None}], struct),
        "m": pa.array([[("k", None), ("j", 2)], None], pa.map_(pa.string(), pa.int64())),
        "l": pa.array([[None, 1], []], pa.large_list(pa.int64())),
        "j": pa.array(['{"x": null, "y": [1]}', None], pa.json_()),
        "t": pa.array(['{"x": null}', "plain"]),
        "v": pa.array([[{"e": 1, "f": None}], None], pa.list_view(ef)),
        "f": pa.array([[{"e": None, "f": 2}], [None]], pa.list_(ef, 1)),
    })
    assert to_rows(table) == [
        {"s": {"a": 1, "b": {"d": [{"e": 1}, None]}}, "m": {"k": None, "j": 2}, "l": [None, 1], "j": {"x": None, "y": [1]},
         "t": '{"x": null}', "v": [{"e": 1}], "f": [{"f": 2}]},
        {"s": {}, "l": [], "t": "plain", "f": [None]},
    ]


def test_parquet_random_access_over_groups_and_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "BATCH_ROWS", 3)
    rows = [{"messages": [user(f"q{i}"), {"role": "assistant", "content": f"a{i}", **({"reasoning_content": "r"} if i % 2 else {})}]} for i in range(23)]
    parquet = write_parquet(tmp_path / "g.parquet", rows, row_group_size=10)
    source = RowSource([parquet])
    order = [0, 22, 5, 4, 11, 10, 12, 21, 9, 1, 2, 3] + list(range(23))
    for i in order:
        row = source[i]
        assert row.record == rows[i] and row.where == f"{parquet} row {i} (0-based)"
        if i == 11:
            source = pickle.loads(pickle.dumps(source))  # as it reaches the tokenization workers


def test_bad_parquet_row_is_named_by_file_and_row(tmp_path, built):
    rows = [ROWS[4], {"messages": [user("u"), {"role": "bot", "content": "x"}]}]
    parquet = write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(DataError, match=rf"{parquet} row 1 \(0-based\): messages\[1\] has unknown role 'bot'"):
        load_dataset(config(tmp_path), built, parquet)
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="broken.parquet: not a readable Parquet file"):
        load_dataset(config(tmp_path), built, str(tmp_path / "broken.parquet"))


def test_parquet_is_read_a_batch_at_a_time(tmp_path):
    n = 20_000
    messages = [[{"role": "user", "content": f"question {i} " * 4}, {"role": "assistant", "content": f"answer {i} " * 4}] for i in range(n)]
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"messages": messages}), path)  # one row group
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    source = RowSource([str(path)])
    whole = python_bytes(lambda: pq.read_table(path).to_pylist())
    held = python_bytes(lambda: [source[i] for i in (0, 1, n // 2, n - 1)])
    assert held < whole / 20, (held, whole)

