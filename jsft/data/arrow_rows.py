"""Arrow data (Parquet, Hugging Face datasets) -> the rows it was written from, as their JSON would read.

Arrow gives a struct column one type for every row: the union of all rows' keys. Written from Python rows
(`pandas.DataFrame(rows).to_parquet`, `datasets.Dataset.from_list`), a row that lacked a key reads back
with that key set to null: every tool call's `arguments` gains every other tool's argument names, every
tool schema's `properties` gains every other tool's parameters, every message gains `tool_calls` and
`reasoning_content`. A struct cannot tell those invented nulls from a null the row held, so `to_rows`
drops every null struct field at every depth, and every null column. What Arrow stores per row is kept as
it is: list items (null ones too), map entries (as a dict, null values too) and strings, so a JSON string
is passed through untouched (keep `arguments` as a JSON string to keep a null in it). Values of the
`arrow.json` extension type (`datasets.Json`) are parsed, nulls included: they are per-row JSON.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable, Optional

import pyarrow as pa

Convert = Optional[Callable[[Any], Any]]  # None: the Python value from `to_pylist` is already right


def to_rows(table: pa.Table | pa.RecordBatch) -> list[dict]:
    """Every row of `table` as a dict, without the nulls Arrow invented (see the module docstring)."""
    columns = []
    for name, column in zip(table.schema.names, table.columns):
        convert = _converter(column.type)
        values = column.to_pylist()
        columns.append((name, values if convert is None else [None if v is None else convert(v) for v in values]))
    return [{name: values[r] for name, values in columns if values[r] is not None} for r in range(table.num_rows)]


@functools.lru_cache(maxsize=None)
def _converter(t: pa.DataType) -> Convert:
    """The function turning `to_pylist`'s value of type `t` (never None) into the row's value."""
    if isinstance(t, pa.BaseExtensionType):
        if t.extension_name == "arrow.json":
            return json.loads
        return _converter(t.storage_type)
    if pa.types.is_struct(t):
        fields = [(f.name, _converter(f.type)) for f in t]
        return lambda v: {k: (x if c is None else c(x)) for k, c in fields if (x := v[k]) is not None}
    if pa.types.is_map(t):  # `to_pylist` gives [(key, value), ...]; a map's entries are the row's own
        key, item = _converter(t.key_type), _converter(t.item_type)
        return lambda v: {_apply(key, k): _apply(item, x) for k, x in v}
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) or _is_list_view(t):
        item = _converter(t.value_type)
        return None if item is None else (lambda v: [_apply(item, x) for x in v])
    return None


def _apply(convert: Convert, value: Any) -> Any:
    return value if convert is None or value is None else convert(value)


def _is_list_view(t: pa.DataType) -> bool:
    is_view = getattr(pa.types, "is_list_view", None)  # list views exist from pyarrow 16
    return is_view is not None and (is_view(t) or pa.types.is_large_list_view(t))
