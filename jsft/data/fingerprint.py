"""Hosts must agree on what they train: a named fingerprint of the data, compared across processes.

Every process computes the same parts (name -> short description) twice: `inputs` before tokenization
(files with sizes and a sampled content hash, tokenizer, chat template, data options), so a host with a different local copy stops
before the expensive work, and `samples` after it (sample counts, steps per epoch, a digest of the sample
table). `check_hosts_agree` compares them; on a mismatch every process raises the same error naming the
parts that differ and what each process has, instead of diverging or hanging in a collective later.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from jsft import distributed
from jsft.data.config import DataConfig
from jsft.data.sources import file_stats, resolve_files

# per-host settings, not part of what is trained (the files are their own parts)
_HOST_LOCAL_OPTIONS = ("train_files", "val_files", "tokenizer", "chat_template", "cache_dir", "num_workers")
_DESCRIPTION_BYTES = 1024  # what each process reports of a differing part


class HostMismatch(RuntimeError):
    """The processes of one run would train on different data."""


def tokenizer_digest(tokenizer) -> list:
    """Type, vocabulary hash and chat template: what identifies a tokenizer's output."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return [type(tokenizer).__name__, hashlib.sha256(vocab.encode()).hexdigest(), tokenizer.chat_template]


def inputs(cfg: DataConfig, tokenizer) -> dict[str, str]:
    """What goes into tokenization, as name -> description."""
    parts = {"train files": _files(cfg.train_files)}
    if cfg.val_files:
        parts["val files"] = _files(cfg.val_files)
    kind, vocab, template = tokenizer_digest(tokenizer)
    parts["tokenizer"] = f"{kind}, {len(tokenizer)} tokens, vocabulary sha256 {vocab[:12]}"
    parts["chat template"] = "sha256 " + hashlib.sha256(str(template).encode()).hexdigest()[:12]
    for key, value in dataclasses.asdict(cfg).items():
        if key not in _HOST_LOCAL_OPTIONS:
            parts[f"data.{key}"] = json.dumps(value, default=str)
    return parts


def samples(train, val=None) -> dict[str, str]:
    """What tokenization produced: `train` / `val` are TrainBatches / EvalBatches."""
    parts = {"train samples": f"{len(train.dataset)} samples, {train.steps_per_epoch} steps per epoch, "
                              f"table {_table_digest(train.dataset)}"}
    if val is not None:
        parts["val samples"] = f"{len(val.dataset)} samples, table {_table_digest(val.dataset)}"
    return parts


def _files(files) -> str:
    # a file missing on one host is a difference to report on every host, not an error on that one alone
    # (which would leave the others waiting in the comparison)
    try:
        files = [f for p in resolve_files(files) for f, _, _ in file_stats(p)]  # a datasets directory: its files
        return "; ".join(f"{p} ({os.path.getsize(p)} bytes, sha256 {_sampled_digest(p)})" for p in files)
    except (OSError, ValueError) as e:
        return f"not readable: {e}"


def _sampled_digest(path: str, blocks: int = 16, block: int = 1 << 16) -> str:
    """sha256 of `blocks` evenly spaced 64 KiB blocks (the whole file when smaller): catches copies that
    differ at equal size without reading terabytes at every start."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= blocks * block:
            h.update(f.read())
        else:
            for k in range(blocks):
                f.seek((size - block) * k // (blocks - 1))
                h.update(f.read(block))
    return h.hexdigest()[:12]


def _table_digest(dataset) -> str:
    h = hashlib.sha256()
    for column in (dataset.lengths, dataset.targets, dataset.source_index, dataset.turn_index):
        h.update(np.ascontiguousarray(column, np.int64).tobytes())
    return h.hexdigest()[:12]


def check_hosts_agree(parts: dict[str, str]) -> None:
    """Every process calls this with its parts (same names on every host); raises `HostMismatch` on all of
    them when any part differs, naming the parts and each process's value."""
    names = sorted(parts)
    table = distributed.all_hosts(_vector(parts))
    if (table == table[0]).all():
        return
    if (table[:, 0] != len(names)).any():
        raise HostMismatch(f"the processes compare different data fingerprints ({table[:, 0].tolist()} parts): "
                           "every process must run the same jsft version and config")
    differing = [n for i, n in enumerate(names) if (table[:, i + 1] != table[0, i + 1]).any()]
    lines = []
    for name in differing:
        values = [_decode(row) for row in distributed.all_hosts(_encode(parts[name]))]
        lines.append(f"  {name}: " + "; ".join(f"process {p}: {v}" for p, v in enumerate(values)))
    raise HostMismatch(
        "the processes would train on different data; stopping every process before step 1:\n" + "\n".join(lines)
        + "\nGive every host the same files (a shared filesystem, or identical copies), tokenizer and data.* options"
    )


def _vector(parts: dict[str, str]) -> list[int]:
    """[number of parts, 31 bits of each part's hash] (the count catches hosts with other part names)."""
    names = sorted(parts)
    return [len(names)] + [int(hashlib.sha256(f"{n}={parts[n]}".encode()).hexdigest()[:8], 16) >> 1 for n in names]


def _encode(text: str) -> np.ndarray:
    raw = text.encode()[:_DESCRIPTION_BYTES].ljust(_DESCRIPTION_BYTES, b"\0")
    return np.frombuffer(raw, np.uint8).astype(np.int32)


def _decode(row: np.ndarray) -> str:
    return bytes(np.asarray(row).astype(np.uint8)).rstrip(b"\0").decode(errors="replace")
