"""Rows from JSONL and Parquet files, with random access and a location for every row.

`RowSource` is a grain random-access data source over all input files in order: element i is the
i-th row across the files (its `source_index`). Reading never raises on bad content: a row that is
not valid JSON, or not an object, comes back with `error` set, so the caller decides whether to stop
(`data.on_bad_row=error`) or skip and count it.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow.parquet as pq

SUFFIXES = (".jsonl", ".parquet")


class BadRow(Exception):
    """A row that cannot be trained on; `kind` names the problem class for the skip counts."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __reduce__(self):  # results cross from the tokenization workers by pickle
        return BadRow, (self.kind, self.message)


@dataclass
class RawRow:
    index: int  # 0-based row across all files in order (`source_index`)
    where: str  # "file.jsonl:12" (1-based line) or "file.parquet row 3 (0-based)"
    record: Optional[dict]  # the row as a dict; None when `error` is set
    error: Optional[BadRow] = None


def resolve_files(files: Any) -> list[str]:
    """A path, a glob or a list of them -> the list of files, in the given (then sorted glob) order."""
    if files is None:
        raise ValueError("no data files given (set data.train_files / data.val_files)")
    items = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    if not items:
        raise ValueError("the list of data files is empty")
    out = []
    for item in map(str, items):
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not matches:
            raise FileNotFoundError(f"no data file matches '{item}'")
        for path in matches:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"data file not found: {path}")
            if not path.endswith(SUFFIXES):
                raise ValueError(f"{path}: unsupported data file type; expected one of {', '.join(SUFFIXES)}")
            out.append(path)
    return out


class _JsonlFile:
    """Byte offsets of the non-blank lines, so any row can be read with one seek."""

    def __init__(self, path: str):
        self.path = path
        offsets, numbers, pos = [], [], 0
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    offsets.append(pos)
                    numbers.append(lineno)
                pos += len(line)
        self.offsets = np.asarray(offsets, np.int64)
        self.numbers = np.asarray(numbers, np.int64)  # 1-based line of each row
        self._handle = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self):
        return {**self.__dict__, "_handle": None}  # file handles do not cross process boundaries

    def read(self, i: int, row: RawRow) -> RawRow:
        if self._handle is None:
            self._handle = open(self.path, "rb")
        self._handle.seek(int(self.offsets[i]))
        try:
            row.record = json.loads(self._handle.readline())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            row.error = BadRow("invalid_json", f"invalid JSON: {e}")
            return row
        if not isinstance(row.record, dict):
            row.error = BadRow("not_an_object", f"row is a JSON {type(row.record).__name__}, not an object")
            row.record = None
        return row


class _ParquetFile:
    """Rows decoded one row group at a time (the last group read is kept)."""

    def __init__(self, path: str):
        self.path = path
        meta = pq.ParquetFile(path).metadata
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.group_starts = np.cumsum([0] + sizes)
        self.numbers = np.arange(self.group_starts[-1], dtype=np.int64)
        self._cached = (None, None)

    def __len__(self) -> int:
        return int(self.group_starts[-1])

    def __getstate__(self):
        return {**self.__dict__, "_cached": (None, None)}

    def read(self, i: int, row: RawRow) -> RawRow:
        group = int(np.searchsorted(self.group_starts, i, side="right") - 1)
        if self._cached[0] != group:
            self._cached = (group, pq.ParquetFile(self.path).read_row_group(group).to_pylist())
        row.record = self._cached[1][i - self.group_starts[group]]
        return row


@dataclass
class RowLocations:
    """source_index -> "file:line" (JSONL, 1-based line) or "file row r (0-based)" (Parquet)."""

    paths: list[str]
    starts: np.ndarray  # int64 [files + 1]: first source_index of each file
    numbers: np.ndarray  # int64 [rows]: the row's line (JSONL) or row (Parquet) within its file

    def file_of(self, index: int) -> int:
        return int(np.searchsorted(self.starts, index, side="right") - 1)

    def __call__(self, index: int) -> str:
        path, number = self.paths[self.file_of(index)], int(self.numbers[index])
        return f"{path}:{number}" if path.endswith(".jsonl") else f"{path} row {number} (0-based)"


class RowSource:
    """grain RandomAccessDataSource over the rows of several files, in order."""

    def __init__(self, files: Sequence[str]):
        self.files = [_JsonlFile(p) if p.endswith(".jsonl") else _ParquetFile(p) for p in files]
        self.locations = RowLocations(
            list(files),
            np.cumsum([0] + [len(f) for f in self.files]),
            np.concatenate([np.zeros(0, np.int64)] + [f.numbers for f in self.files]),
        )

    def __len__(self) -> int:
        return int(self.locations.starts[-1])

    def __getitem__(self, index: int) -> RawRow:
        index = int(index)
        k = self.locations.file_of(index)
        return self.files[k].read(index - int(self.locations.starts[k]), RawRow(index, self.locations(index), None))
