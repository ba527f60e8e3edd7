"""All rows -> one tokenized, validated sample table, cached on disk.

Every row of every file is read, validated and tokenized before training starts: that is what lets a bad
row stop the run before step 1, and what fixes the global sample count (steps per epoch) on every host.
Tokenization runs in grain worker processes (`mp_prefetch`, order preserved) and is cached under
`data.cache_dir`, keyed by the files (path, size, mtime), the tokenizer, the template, the sample-shaping
options and this package's code. The per-row outcome (samples or the bad-row reason) is what is cached;
`data.on_bad_row`, `data.max_length` and `data.truncation` are applied on load, so changing them needs no
re-tokenization.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import grain
from absl import flags
import numpy as np
from tqdm import tqdm

from jsft.data.chat import ChatOptions, ChatRenderer, RowResult
from jsft.data.config import DataConfig
from jsft.data.sources import RowLocations, RowSource, fingerprint, resolve_files

CACHE_FORMAT = 1
# Starting a worker process costs seconds (imports, tokenizer unpickling); below this many rows per
# worker it is faster to tokenize in process.
MIN_ROWS_PER_WORKER = 1000
_CODE_FILES = ("chat.py", "conversation.py", "sources.py", "arrow_rows.py", "tokenizer.py", "dataset.py")
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


def load_dataset(cfg: DataConfig, tokenizer, files=None, *, progress: bool = True) -> TokenizedDataset:
    """Tokenize (or load from cache) `files` (default `cfg.train_files`) and apply the bad-row,
    max-length and truncation rules; raises `DataError` naming file and row for bad input."""
    paths = resolve_files(cfg.train_files if files is None else files)
    renderer = ChatRenderer(tokenizer, ChatOptions.from_config(cfg))
    directory = Path(cfg.cache_dir or Path.home() / ".cache" / "jsft") / _cache_key(paths, renderer)
    if not (directory / "meta.json").exists():
        source = RowSource(paths)
        _write_cache(directory, source, _tokenize(source, renderer, cfg.num_workers, progress))
    dataset, bad = _read_cache(directory)
    if cfg.multiturn_policy == "error":
        _raise_if_any([b for b in bad if b.kind == "not_prefix_preserving"], "not prefix-preserving")
    dataset, too_long = _apply_max_length(dataset, cfg)
    bad = sorted(bad + too_long, key=lambda b: b.index)
    if cfg.on_bad_row == "error":
        _raise_if_any(bad, "bad", hint="fix them, or set data.on_bad_row=skip to skip and count them")
    dataset = dataset.select(~np.isin(dataset.source_index, [b.index for b in too_long]))
    dataset.stats.skipped = bad
    return dataset


def _raise_if_any(bad: list[BadRowRecord], what: str, hint: str = "") -> None:
    if not bad:
        return
    listed = "\n".join(f"  {b}" for b in bad[:MAX_LISTED_ERRORS])
    more = f"\n  ... and {len(bad) - MAX_LISTED_ERRORS} more" if len(bad) > MAX_LISTED_ERRORS else ""
    raise DataError(f"{len(bad)} {what} row(s):\n{listed}{more}" + (f"\n{hint}" if hint else ""))


def _tokenize(source: RowSource, renderer: ChatRenderer, num_workers: int, progress: bool) -> Iterable[RowResult]:
    ds = grain.MapDataset.source(source).map(renderer).to_iter_dataset(grain.ReadOptions(num_threads=0))
    workers = min(num_workers, len(source) // MIN_ROWS_PER_WORKER)
    if workers > 0:
        if not flags.FLAGS.is_parsed():
            # grain 0.2.18 reads an absl flag in mp_prefetch once jax is imported, which raises outside
            # absl.app (google/grain#1355, fixed upstream); nothing in jsft defines or parses absl flags.
            flags.FLAGS.mark_as_parsed()
        # Each worker takes rows i::workers and the output interleaves them back, so order is kept.
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=16))
    return tqdm(ds, total=len(source), desc="tokenizing", unit="row", disable=not progress or None)


def _cache_key(paths: list[str], renderer: ChatRenderer) -> str:
    tok = renderer.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    here = Path(__file__).parent
    parts = {
        "format": CACHE_FORMAT,
        "code": [hashlib.sha256((here / f).read_bytes()).hexdigest() for f in _CODE_FILES],
        "files": [fingerprint(p) for p in paths],
        "tokenizer": [type(tok).__name__, hashlib.sha256(vocab.encode()).hexdigest(), tok.chat_template],
        "stop_tokens": renderer.stop_tokens,
        "options": dataclasses.asdict(renderer.options),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _write_cache(directory: Path, source: RowSource, results: Iterable[RowResult]) -> None:
    """Stream the row results into a temporary directory, then rename it into place (atomic, so a
    concurrent writer on a shared filesystem or a crash never leaves a half-written cache)."""
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    meta = {"rows": 0, "bad_rows": [], "zero_target_rows": 0, "split_conversations": 0, "paths": source.locations.paths}
    cols = {"length": [], "source_index": [], "turn_index": [], "mismatch": [], "targets": []}
    with open(tmp / "input_ids.bin", "wb") as ids_file, open(tmp / "loss_mask.bin", "wb") as mask_file:
        for expected, result in enumerate(results):
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
    np.savez(tmp / "samples.npz", **{k: np.asarray(v, np.int64) for k, v in cols.items()})
    np.savez(tmp / "locations.npz", starts=source.locations.starts, numbers=source.locations.numbers)
    (tmp / "meta.json").write_text(json.dumps(meta))
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
