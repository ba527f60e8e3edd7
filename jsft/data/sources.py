"""Rows from JSONL, Parquet and Hugging Face datasets on disk, with random access and a location for every row.

`RowSource` is a grain random-access data source over all inputs in order: element i is the i-th row
across them (its `source_index`). An input is a `.jsonl` or `.parquet` file, or (with the optional
`datasets` package) a `datasets.Dataset.save_to_disk` directory or one of its `.arrow` files. Arrow rows
(Parquet, datasets) come back without the nulls Arrow invents for nested structs (`arrow_rows.py`), so a
row reads as the JSON row it was written from. Reading never raises on bad content: a row that is not
valid JSON, or not an object, comes back with `error` set, so the caller decides whether to stop
(`data.on_bad_row=error`) or skip and count it.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jsft.data.arrow_rows import to_rows

SUFFIXES = (".jsonl", ".parquet", ".arrow")
BATCH_ROWS = 1024  # rows decoded together from Parquet / Arrow; bounds the memory a reader holds


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
    where: str  # "file.jsonl:12" (1-based line) or "file.parquet row 3 (0-based)" (also .arrow, datasets dirs)
    record: Optional[dict]  # the row as a dict; None when `error` is set
    error: Optional[BadRow] = None


def resolve_files(files: Any) -> list[str]:
    """A path, a glob or a list of them -> the inputs, in the given (then sorted glob) order. Checks
    each exists and has a known type, and opens `datasets` inputs (the package must be installed)."""
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
            if not os.path.exists(path):
                raise FileNotFoundError(f"data file not found: {path}")
            if os.path.isfile(path) and not path.endswith(SUFFIXES):
                raise ValueError(f"{path}: unsupported data file type; expected one of {', '.join(SUFFIXES)} or a datasets.save_to_disk directory")
            if _is_hf(path):
                open_hf_dataset(path)  # memory-mapped, so cheap: refuses a DatasetDict or a stray directory now
            out.append(path)
    return out


def file_stats(path: str) -> list:
    """(path, size, mtime) of a file, or of every file under a directory: what the tokenization cache is keyed by."""
    files = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "**", "*"), recursive=True))
    return [(os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files if os.path.isfile(f)]


def _is_hf(path: str) -> bool:
    return os.path.isdir(path) or path.endswith(".arrow")


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
    """Rows decoded one batch at a time from one row group: a file written in one go is often one group,
    so a group is never turned into Python objects whole. Reads in order (what tokenization does, also
    strided over workers) step through the batches; a read behind the current batch reopens its group."""

    def __init__(self, path: str):
        self.path = path
        try:
            meta = pq.ParquetFile(path).metadata
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.group_starts = np.cumsum([0] + sizes)
        self.numbers = np.arange(self.group_starts[-1], dtype=np.int64)
        self._state = None  # (group, batch iterator, first row of `batch` within the group, batch)

    def __len__(self) -> int:
        return int(self.group_starts[-1])

    def __getstate__(self):
        return {**self.__dict__, "_state": None}  # open readers do not cross process boundaries

    def read(self, i: int, row: RawRow) -> RawRow:
        group = int(np.searchsorted(self.group_starts, i, side="right") - 1)
        r = i - int(self.group_starts[group])
        if self._state is None or self._state[0] != group or r < self._state[2]:
            batches = pq.ParquetFile(self.path).iter_batches(batch_size=BATCH_ROWS, row_groups=[group], use_threads=False)
            self._state = (group, batches, 0, next(batches))
        group, batches, start, batch = self._state
        while r >= start + batch.num_rows:
            start, batch = start + batch.num_rows, next(batches)
        self._state = (group, batches, start, batch)
        row.record = to_rows(batch.slice(r - start, 1))[0]
        return row


class _HFDataset:
    """A `datasets.Dataset.save_to_disk` directory or a `.arrow` file of one: memory-mapped by `datasets`,
    read a slice of rows at a time as Arrow (converted as Parquet is) rather than through its Python
    formatting, so nested nulls are treated the same in both formats."""

    def __init__(self, path: str):
        self.path = path
        self._dataset = self._open()  # memory-mapped: opening costs no reading
        self.numbers = np.arange(self._dataset.num_rows, dtype=np.int64)
        self._batch = (None, None)  # (first row, pyarrow.Table of up to BATCH_ROWS rows)

    def _open(self):
        return open_hf_dataset(self.path).with_format("arrow")

    def __len__(self) -> int:
        return len(self.numbers)

    def __getstate__(self):
        return {**self.__dict__, "_dataset": None, "_batch": (None, None)}

    def read(self, i: int, row: RawRow) -> RawRow:
        start = i - i % BATCH_ROWS
        if self._batch[0] != start:
            if self._dataset is None:
                self._dataset = self._open()
            self._batch = (start, self._dataset[start : start + BATCH_ROWS])
        row.record = to_rows(self._batch[1].slice(i - start, 1))[0]
        return row


def open_hf_dataset(path: str):
    """A `datasets.Dataset` from a save_to_disk directory or an .arrow file; errors name the path and fix."""
    datasets = _import_datasets(path)
    if path.endswith(".arrow"):
        try:
            return datasets.Dataset.from_file(path)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise ValueError(f"{path}: not an Arrow file written by datasets ({e})") from None
    try:
        loaded = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise ValueError(f"{path}: not a datasets.save_to_disk directory ({e})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        raise ValueError(
            f"{path} is a DatasetDict with splits {', '.join(splits)}; name one split's directory, "
            f"e.g. {os.path.join(path, splits[0]) if splits else path + '/train'}"
        )
    return loaded


def _import_datasets(path: str):
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"{path} is a Hugging Face datasets file or directory; reading it needs the `datasets` package: "
            "pip install datasets (or pip install 'jsft[hf]')"
        ) from None
    return datasets


@dataclass
class RowLocations:
    """source_index -> "file:line" (JSONL, 1-based line) or "file row r (0-based)" (Parquet, datasets)."""

    paths: list[str]
    starts: np.ndarray  # int64 [files + 1]: first source_index of each file
    numbers: np.ndarray  # int64 [rows]: the row's line (JSONL) or row (Parquet, datasets) within its file

    def file_of(self, index: int) -> int:
        return int(np.searchsorted(self.starts, index, side="right") - 1)

    def __call__(self, index: int) -> str:
        path, number = self.paths[self.file_of(index)], int(self.numbers[index])
        return f"{path}:{number}" if path.endswith(".jsonl") else f"{path} row {number} (0-based)"


class RowSource:
    """grain RandomAccessDataSource over the rows of several files, in order."""

    def __init__(self, files: Sequence[str]):
        self.files = [_reader(p) for p in files]
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


def _reader(path: str):
    if path.endswith(".jsonl"):
        return _JsonlFile(path)
    return _HFDataset(path) if _is_hf(path) else _ParquetFile(path)
