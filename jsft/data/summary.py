"""The data summary printed by `python -m jsft.inspect` and by the trainer at start-up."""

from __future__ import annotations

from collections import Counter

import numpy as np

from jsft.data.dataset import MAX_LISTED_ERRORS, TokenizedDataset

_BAR = 30  # characters of the longest histogram bar


def summarize(dataset: TokenizedDataset, bins: int = 10) -> dict:
    """The numbers of the summary, JSON-serialisable (for logs and run info)."""
    lengths, targets, stats = dataset.lengths, dataset.targets, dataset.stats
    ratios = targets / np.maximum(lengths, 1)
    counts, _ = np.histogram(ratios, bins=bins, range=(0.0, 1.0))
    return {
        "rows": stats.rows,
        "samples": len(dataset),
        "tokens": int(lengths.sum()),
        "target_tokens": int(targets.sum()),
        "sample_length": _distribution(lengths),
        "target_ratio_histogram": counts.tolist(),
        "zero_target_rows": stats.zero_target_rows,
        "truncated_samples": stats.truncated,
        "dropped_after_truncation": stats.dropped_truncated,
        "split_conversations": stats.split_conversations,
        "alignment_mismatches": int((dataset.mismatch >= 0).sum()),
        "skipped_bad_rows": len(stats.skipped),
        "skipped_by_kind": dict(Counter(b.kind for b in stats.skipped)),
    }


def _distribution(values: np.ndarray) -> dict:
    if not len(values):
        return {}
    p50, p95 = np.percentile(values, [50, 95])
    return {"min": int(values.min()), "mean": float(values.mean()), "p50": float(p50), "p95": float(p95), "max": int(values.max())}


def format_summary(dataset: TokenizedDataset, name: str = "data") -> str:
    s = summarize(dataset)
    tokens = s["tokens"]
    lines = [
        f"{name}: {s['rows']:,} rows from {len(dataset.locations.paths)} file(s) -> {s['samples']:,} samples",
        f"  tokens                {tokens:>12,}" + _length_note(s["sample_length"]),
        f"  target tokens         {s['target_tokens']:>12,}   ({s['target_tokens'] / max(tokens, 1):.1%} of tokens)",
        "  target-token ratio per sample:",
        *_histogram(s["target_ratio_histogram"]),
        f"  zero-target rows      {s['zero_target_rows']:>12,}   (rows with no trained assistant turn)",
        f"  truncated samples     {s['truncated_samples']:>12,}   (+{s['dropped_after_truncation']:,} dropped: no target token left)",
        f"  split conversations   {s['split_conversations']:>12,}   (one sample per assistant turn)",
        f"  alignment mismatches  {s['alignment_mismatches']:>12,}   (one-pass tokenization differs; the per-piece ids are trained)",
        *_mismatch_examples(dataset),
        f"  skipped bad rows      {s['skipped_bad_rows']:>12,}" + _kinds(s["skipped_by_kind"]),
        *[f"      {b}" for b in dataset.stats.skipped[:MAX_LISTED_ERRORS]],
    ]
    return "\n".join(lines)


def _length_note(d: dict) -> str:
    if not d:
        return ""
    return f"   (per sample: min {d['min']:,}, mean {d['mean']:,.0f}, p50 {d['p50']:,.0f}, p95 {d['p95']:,.0f}, max {d['max']:,})"


def _histogram(counts: list[int]) -> list[str]:
    top, width = max(max(counts), 1), 1 / len(counts)
    return [
        f"    {i * width:.1f}-{(i + 1) * width:.1f}  {'#' * round(_BAR * c / top):<{_BAR}} {c:,}"
        for i, c in enumerate(counts)
    ]


def _mismatch_examples(dataset: TokenizedDataset) -> list[str]:
    out = []
    for i in np.flatnonzero(dataset.mismatch >= 0)[:MAX_LISTED_ERRORS]:
        turn = "" if dataset.turn_index[i] < 0 else f" turn {dataset.turn_index[i]}"
        out.append(f"      {dataset.locations(int(dataset.source_index[i]))}{turn}: first difference at token {dataset.mismatch[i]}")
    return out


def _kinds(by_kind: dict) -> str:
    return f"   ({', '.join(f'{k} {v:,}' for k, v in sorted(by_kind.items()))})" if by_kind else ""
