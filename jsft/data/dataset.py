"""All rows -> one tokenized, validated sample table, cached on disk.

Every row of every file is read, validated and tokenized before training starts: that is what lets a bad
row stop the run before step 1, and what fixes the global sample count (steps per epoch) on every host.
Tokenization runs in grain worker processes (`mp_prefetch`, order preserved) and is cached under
`data.cache_dir`, keyed by the files (path, size, mtime), the tokenizer, the template, the sample-shaping
options and this package's code. The per-row outcome (samples or the bad-row reason) is what is cached;
`data.on_bad_row`, `data.max_length` and `data.truncation` are applied on load, so changing them needs no
re-tokenization.

With several processes (hosts), each tokenizes only the rows i % process_count == process_index and writes
them as one part of the cache; process 0 merges the parts into the same cache a single process writes, and
every host reads that. This needs `data.cache_dir` on a filesystem all hosts share; where a host cannot see
the parts or the merged cache, it warns and tokenizes every row itself (correct, only slower).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import grain
from absl import flags
import numpy as np
from tqdm import tqdm

from jsft import distributed
from jsft.data.chat import ChatOptions, ChatRenderer, RowResult
from jsft.data.config import DataConfig
from jsft.data.conversation import parse_row
from jsft.data.fingerprint import tokenizer_digest
from jsft.data.sources import BadRow, RowLocations, RowSource, file_stats, resolve_files

CACHE_FORMAT = 1
# Starting a worker process costs seconds (imports, tokenizer unpickling); below this many rows per
# worker it is faster to tokenize in process.
MIN_ROWS_PER_WORKER = 1000
_CODE_FILES = ("chat.py", "conversation.py", "sources.py", "arrow_rows.py", "tokenizer.py", "dataset.py", "fingerprint.py")
MAX_LISTED_ERRORS = 10


class DataError(ValueError):
    """Bad input found before training; the message names the files and rows."""


@dataclass
class BadRowRecord:
    index: int  # source_index
    where: str
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class DataStats:
    rows: int = 0  # rows read across all files
    skipped: list[BadRowRecord] = field(default_factory=list)  # bad rows skipped under on_bad_row=skip
    zero_target_rows: int = 0  # rows with no trained assistant turn
    split_conversations: int = 0  # conversations emitted as one sample per turn
    truncated: int = 0  # samples cut to max_length and kept
    dropped_truncated: int = 0  # samples dropped because truncation left no target token


@dataclass
class TokenizedDataset:
    """Samples as [begin, end) ranges into flat token and mask arrays (memory-mapped from the cache)."""

    input_ids: np.ndarray  # int32, all samples back to back
    loss_mask: np.ndarray  # uint8, aligned with input_ids
    begin: np.ndarray  # int64 [S]
    end: np.ndarray  # int64 [S]
    source_index: np.ndarray  # int64 [S]: 0-based row across the input files in order
    turn_index: np.ndarray  # int32 [S]: assistant turn of a per-turn sample, -1 for a whole conversation
    mismatch: np.ndarray  # int32 [S]: first position where one-pass tokenization differs, -1 if none
    targets: np.ndarray  # int64 [S]: target tokens per sample
    locations: RowLocations  # source_index -> "file:line"
    stats: DataStats

    def __len__(self) -> int:
        return len(self.begin)

    @property
    def lengths(self) -> np.ndarray:
        return self.end - self.begin

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        b, e = int(self.begin[i]), int(self.end[i])
        return np.asarray(self.input_ids[b:e], np.int32), np.asarray(self.loss_mask[b:e], np.int32)

    def select(self, keep: np.ndarray) -> "TokenizedDataset":
        return dataclasses.replace(self, **{name: getattr(self, name)[keep] for name in _PER_SAMPLE})


_PER_SAMPLE = ("begin", "end", "source_index", "turn_index", "mismatch", "targets")


def load_dataset(cfg: DataConfig, tokenizer, files=None, *, progress: bool = True, process_index: int = 0,
                 process_count: int = 1, max_rows: int = -1) -> TokenizedDataset:
    """Tokenize (or load from cache) `files` (default `cfg.train_files`) and apply the bad-row,
    max-length and truncation rules; raises `DataError` naming file and row for bad input. With
    process_count > 1 every process must call it together: each tokenizes its share of the rows.
    max_rows >= 1 keeps the samples of the first max_rows rows (veRL's data.train_max_samples)."""
    paths = resolve_files(cfg.train_files if files is None else files)
    renderer = ChatRenderer(tokenizer, ChatOptions.from_config(cfg))
    if cfg.on_bad_row == "error":
        _check_columns(RowSource(paths), renderer)  # a wrong column key: one message, before tokenizing
    directory = Path(cfg.cache_dir or Path.home() / ".cache" / "jsft") / _cache_key(paths, renderer)
    if process_count > 1:
        _tokenize_split(directory, paths, renderer, cfg.num_workers, progress, process_index, process_count)
    elif not (directory / "meta.json").exists():
        source = RowSource(paths)
        _write_cache(directory, source, _tokenize(source, renderer, cfg.num_workers, progress))
    dataset, bad = _read_cache(directory)
    if max_rows > 0:
        dataset, bad = dataset.select(dataset.source_index < max_rows), [b for b in bad if b.index < max_rows]
    if cfg.multiturn_policy == "error":
        _raise_if_any([b for b in bad if b.kind == "not_prefix_preserving"], "not prefix-preserving")
    dataset, too_long = _apply_max_length(dataset, cfg)
    bad = sorted(bad + too_long, key=lambda b: b.index)
    if cfg.on_bad_row == "error":
        _raise_if_any(bad, "bad", hint="fix them, or set data.on_bad_row=skip to skip and count them")
    dataset = dataset.select(~np.isin(dataset.source_index, [b.index for b in too_long]))
    dataset.stats.skipped = bad
    return dataset


def _check_columns(source: RowSource, renderer: ChatRenderer) -> None:
    """The first row must have the configured columns: a wrong data.*_key fails every row, so it is said once,
    with the row's columns and the key to set, instead of once per row after tokenizing them all."""
    if len(source) == 0:
        return
    row = source[0]
    if row.error is None:
        try:
            parse_row(row.record, renderer.options.keys)
        except BadRow as e:
            if e.kind == "missing_column":
                raise DataError(f"{row.where}: {e.message}") from None


def _raise_if_any(bad: list[BadRowRecord], what: str, hint: str = "") -> None:
    if not bad:
        return
    listed = "\n".join(f"  {b}" for b in bad[:MAX_LISTED_ERRORS])
    more = f"\n  ... and {len(bad) - MAX_LISTED_ERRORS} more" if len(bad) > MAX_LISTED_ERRORS else ""
    raise DataError(f"{len(bad)} {what} row(s):\n{listed}{more}" + (f"\n{hint}" if hint else ""))


def _tokenize(source: RowSource, renderer: ChatRenderer, num_workers: int, progress: bool,
              rows: slice = slice(None)) -> Iterable[RowResult]:
    """Row results of source[rows], in order."""
    ds = grain.MapDataset.source(source)[rows].map(renderer).to_iter_dataset(grain.ReadOptions(num_threads=0))
    total = len(range(len(source))[rows])
    workers = min(num_workers, total // MIN_ROWS_PER_WORKER)
    if workers > 0:
        if not flags.FLAGS.is_parsed():
            # grain 0.2.18 reads an absl flag in mp_prefetch once jax is imported, which raises outside
            # absl.app (google/grain#1355, fixed upstream); nothing in jsft defines or parses absl flags.
            flags.FLAGS.mark_as_parsed()
        # Each worker takes rows i::workers and the output interleaves them back, so order is kept.
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=16))
    return tqdm(ds, total=total, desc="tokenizing", unit="row", disable=not progress or None)


def _tokenize_split(directory: Path, paths: list[str], renderer: ChatRenderer, num_workers: int, progress: bool,
                    index: int, count: int) -> None:
    """Make `directory` hold the whole cache on this host, tokenizing only rows index::count here.
    Every process calls the same collectives in the same order whatever it finds on disk (no hang)."""
    if distributed.all_hosts([(directory / "meta.json").exists()]).all():
        return
    source = RowSource(paths)
    parts = directory.with_name(directory.name + ".parts")
    mine = parts / f"{index}-of-{count}"
    if not (mine / "meta.json").exists():
        rows = slice(index, None, count)
        print(f"process {index} of {count} tokenizes {len(range(len(source))[rows])} of {len(source)} rows", flush=True)
        _write_cache(mine, source, _tokenize(source, renderer, num_workers, progress, rows), range(len(source))[rows])
    distributed.barrier(f"jsft tokenized {directory.name}")
    every = [parts / f"{p}-of-{count}" for p in range(count)]
    visible = distributed.wait_for([d / "meta.json" for d in every])
    if index == 0 and visible and not (directory / "meta.json").exists():
        _merge_parts(directory, source, every)
    distributed.barrier(f"jsft merged {directory.name}")
    if index == 0 and visible:
        shutil.rmtree(parts, ignore_errors=True)
    if not distributed.wait_for([directory / "meta.json"]):
        print(f"warning: process {index} cannot see the tokenization cache that process 0 wrote under "
              f"{directory.parent} (data.cache_dir): it is not on a filesystem shared by all hosts, so this host "
              "tokenizes every row itself; point data.cache_dir at a shared directory to split the work",
              file=sys.stderr, flush=True)
        _write_cache(directory, source, _tokenize(source, renderer, num_workers, progress))


def _cache_key(paths: list[str], renderer: ChatRenderer) -> str:
    here = Path(__file__).parent
    parts = {
        "format": CACHE_FORMAT,
        "code": [hashlib.sha256((here / f).read_bytes()).hexdigest() for f in _CODE_FILES],
        "files": [file_stats(p) for p in paths],
        "tokenizer": tokenizer_digest(renderer.tokenizer),
        "stop_tokens": renderer.stop_tokens,
        "options": dataclasses.asdict(renderer.options),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


_COLUMNS = ("length", "source_index", "turn_index", "mismatch", "targets")


def _write_cache(directory: Path, source: RowSource, results: Iterable[RowResult], rows: Iterable[int] = None) -> None:
    """Stream the results of `rows` (default: all) into a temporary directory, then rename it into place
    (atomic, so a concurrent writer on a shared filesystem or a crash never leaves a half-written cache)."""
    tmp = _temporary(directory)
    meta = {"rows": 0, "bad_rows": [], "zero_target_rows": 0, "split_conversations": 0, "paths": source.locations.paths}
    cols = {name: [] for name in _COLUMNS}
    rows = range(len(source)) if rows is None else rows
    with open(tmp / "input_ids.bin", "wb") as ids_file, open(tmp / "loss_mask.bin", "wb") as mask_file:
        for expected, result in zip(rows, results, strict=True):
            assert result.index == expected, "tokenization results arrived out of order"
            meta["rows"] += 1
            if result.error is not None:
                meta["bad_rows"].append([result.index, result.where, result.error.kind, result.error.message])
                continue
            meta["zero_target_rows"] += not result.samples
            meta["split_conversations"] += result.split
            for s in result.samples:
                ids_file.write(s.input_ids.astype(np.int32).tobytes())
                mask_file.write(s.loss_mask.astype(np.uint8).tobytes())
                for name, value in zip(cols, (len(s.input_ids), result.index, -1 if s.turn_index is None else s.turn_index, s.mismatch, int(s.loss_mask.sum()))):
                    cols[name].append(value)
    _finish(tmp, directory, source, meta, {k: np.asarray(v, np.int64) for k, v in cols.items()})


def _merge_parts(directory: Path, source: RowSource, parts: list[Path]) -> None:
    """The caches of rows p::count (one per process) -> the cache a single process writes: samples in row
    order (a row's samples all sit in one part, in order, so a stable sort by row keeps them), bad rows by row."""
    tmp = _temporary(directory)
    metas = [json.loads((p / "meta.json").read_text()) for p in parts]
    cols = [dict(np.load(p / "samples.npz")) for p in parts]
    merged = {k: np.concatenate([c[k] for c in cols]) for k in _COLUMNS}
    order = np.argsort(merged["source_index"], kind="stable")
    part_of = np.repeat(np.arange(len(parts)), [len(c["length"]) for c in cols])[order]
    begin = np.concatenate([np.cumsum(c["length"]) - c["length"] for c in cols])[order]
    for name, dtype in (("input_ids.bin", np.int32), ("loss_mask.bin", np.uint8)):
        inputs = [_memmap(p / name, dtype) for p in parts]
        with open(tmp / name, "wb") as out:
            for p, b, n in zip(part_of, begin, merged["length"][order]):
                out.write(inputs[p][b : b + n].tobytes())
    meta = {
        "rows": sum(m["rows"] for m in metas),
        "bad_rows": sorted((b for m in metas for b in m["bad_rows"]), key=lambda b: b[0]),
        "zero_target_rows": sum(m["zero_target_rows"] for m in metas),
        "split_conversations": sum(m["split_conversations"] for m in metas),
        "paths": source.locations.paths,
    }
    _finish(tmp, directory, source, meta, {k: v[order] for k, v in merged.items()})


def _temporary(directory: Path) -> Path:
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    return tmp


def _finish(tmp: Path, directory: Path, source: RowSource, meta: dict, cols: dict[str, np.ndarray]) -> None:
    np.savez(tmp / "samples.npz", **cols)
    np.savez(tmp / "locations.npz", starts=source.locations.starts, numbers=source.locations.numbers)
    (tmp / "meta.json").write_text(json.dumps(meta))  # written last: its presence marks a complete cache
    try:
        os.rename(tmp, directory)
    except OSError:  # another process wrote the same cache first; theirs is identical
        shutil.rmtree(tmp)


def _read_cache(directory: Path) -> tuple[TokenizedDataset, list[BadRowRecord]]:
    meta = json.loads((directory / "meta.json").read_text())
    cols = np.load(directory / "samples.npz")
    end = np.cumsum(cols["length"])
    stats = DataStats(
        rows=meta["rows"],
        zero_target_rows=meta["zero_target_rows"],
        split_conversations=meta["split_conversations"],
    )
    locations = np.load(directory / "locations.npz")
    dataset = TokenizedDataset(
        input_ids=_memmap(directory / "input_ids.bin", np.int32),
        loss_mask=_memmap(directory / "loss_mask.bin", np.uint8),
        begin=end - cols["length"],
        end=end,
        source_index=cols["source_index"],
        turn_index=cols["turn_index"].astype(np.int32),
        mismatch=cols["mismatch"].astype(np.int32),
        targets=cols["targets"],
        locations=RowLocations(meta["paths"], locations["starts"], locations["numbers"]),
        stats=stats,
    )
    return dataset, [BadRowRecord(*b) for b in meta["bad_rows"]]


def _memmap(path: Path, dtype) -> np.ndarray:
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)


def _apply_max_length(dataset: TokenizedDataset, cfg: DataConfig) -> tuple[TokenizedDataset, list[BadRowRecord]]:
    """truncation=error: over-long samples become bad rows. left/right: keep the last/first max_length
    tokens, and drop (and count) a sample left with no target token."""
    long = np.flatnonzero(dataset.lengths > cfg.max_length)
    if cfg.truncation == "error":
        first = {}  # one bad-row record per row, for its first over-long sample
        for i in long:
            first.setdefault(int(dataset.source_index[i]), int(i))
        return dataset, [_too_long(dataset, i, cfg.max_length) for i in first.values()]
    if cfg.truncation == "left":
        dataset.begin[long] = dataset.end[long] - cfg.max_length
    else:
        dataset.end[long] = dataset.begin[long] + cfg.max_length
    for i in long:
        dataset.targets[i] = int(np.sum(dataset.loss_mask[dataset.begin[i] : dataset.end[i]]))
    empty = dataset.targets == 0  # only truncation can empty a sample: untrained rows yield none

    dataset.stats.truncated = int(len(long) - empty.sum())
    dataset.stats.dropped_truncated = int(empty.sum())
    return dataset.select(~empty), []


def _too_long(dataset: TokenizedDataset, i: int, max_length: int) -> BadRowRecord:
    turn = "" if dataset.turn_index[i] < 0 else f" (assistant turn {dataset.turn_index[i]})"
    source = int(dataset.source_index[i])
    message = f"sample of {dataset.lengths[i]} tokens is longer than data.max_length={max_length}{turn}"
    return BadRowRecord(source, dataset.locations(source), "too_long", message)
