"""The host side of a step: one optimizer step's host batches -> the micro-batches the compiled step runs.

    gather_step     this host's micro-batches and the GLOBAL sample / target / token counts; every host
                    pads to the same number of micro-batches (all hosts run the same programs)
    attach_weights  per-token loss weights from those global counts (`loss_weights`)
    fit_shapes      each micro-batch cut to the shortest bucketed row length that holds every host's rows,
                    and its targets listed per row in a bucketed capacity (`causal_targets`), so the
                    step computes neither trailing padding nor logits at non-target positions; a
                    micro-batch of several rows per device whose rows differ much in length (a step's
                    short leftover row next to a full one) runs as one micro-step per row instead

Alignment: `loss_mask[t] = 1` means token t is a target, and `loss_weights` keeps only targets that
continue their sample (a sample's first token has nothing to be predicted from). The shift to "hidden
state t-1 predicts token t" happens in exactly one place, `causal_targets`, which lists each row's
targets as (predicting position, label, weight) slots; the device loss (jsft/train/loss.py) computes
logits at those positions only:

    input_ids    a0 a1 a2 b0 b1 0          segment_ids  1 1 1 2 2 0
    loss_mask     0  1  1  1  1 0          (b0 is masked in, but starts a sample: weight 0)
    target_pos   0 1 3                     (hidden states of a0, a1, b0)
    target_ids   a1 a2 b1

Buckets keep the number of compiled shapes small: with `trainer.shape_buckets = k`, row lengths are
multiples of row_length / k and target capacities multiples of (row length) / k, so at most k * k
programs compile (in practice a few: packed rows are mostly full). k = 1 is one fixed shape: whole rows
and a logit at every position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from jsft import distributed
from jsft.config import LOSS_AGG_MODES
from jsft.data.pipeline import StepBatch
from jsft.models.ring import zigzag_order

ROW_FIELDS = ("input_ids", "segment_ids", "positions")


@dataclass
class GlobalStep:
    """One optimizer step's micro-batches (host-local rows with loss weights) and its GLOBAL counts."""

    micro_batches: list[dict]
    samples: int
    target_tokens: int
    tokens: int
    feeders: int = 1  # hosts (or groups of hosts) feeding different rows

    @property
    def computed_tokens(self) -> int:
        """Tokens the step computes over all feeders and micro-batches, padding included."""
        return sum(mb["input_ids"].size for mb in self.micro_batches) * self.feeders


def gather_step(batch: StepBatch, empty: dict, leaders: Optional[Sequence[int]] = None) -> GlobalStep:
    """This host's micro-batches plus the GLOBAL counts; every host is padded to the same number of
    micro-batches (an empty one weighs nothing), since all hosts must run the same programs. `leaders`:
    the processes whose counts are summed, one per feeder (jsft/train/feeders.py; the others hold copies
    of their rows); default every process."""
    counts = np.array([batch_counts(mb["loss_mask"], mb["segment_ids"]) for mb in batch.micro_batches]).reshape(-1, 2)
    every = distributed.all_hosts([len(batch.micro_batches), *counts.sum(axis=0), batch.num_tokens])
    num_micro = int(every[:, 0].max())
    counted = every if leaders is None else every[list(leaders)]
    samples, targets, tokens = (int(x) for x in counted[:, 1:].sum(axis=0))
    micro = batch.micro_batches + [dict(empty) for _ in range(num_micro - len(batch.micro_batches))]
    return GlobalStep(micro, samples, targets, tokens, len(counted))


def prepare_step(batch: StepBatch, empty: dict, *, mode: str, max_length: int, buckets: int, multiple: int = 1,
                 leaders: Optional[Sequence[int]] = None, zigzag: bool = False, rows_per_device: int = 1) -> GlobalStep:
    """gather_step + attach_weights + fit_shapes: one training step's micro-batches, ready for the step."""
    g = gather_step(batch, empty, leaders)
    attach_weights(g.micro_batches, mode, samples=g.samples, targets=g.target_tokens, max_length=max_length)
    g.micro_batches = fit_shapes(g.micro_batches, buckets, multiple, zigzag, rows_per_device)
    return g


def attach_weights(micro_batches: list[dict], mode: str, *, samples: int, targets: int, max_length: int) -> None:
    """Per-token loss weights normalised by counts over everything the loss covers (see loss.py)."""
    for mb in micro_batches:
        mb["loss_weight"] = loss_weights(
            mb["loss_mask"], mb["segment_ids"], mode,
            num_samples=samples, num_target_tokens=targets, max_length=max_length,
        )


# Split a micro-batch into one micro-step per row (of each device) only when that computes at most this
# share of its columns: a micro-step costs ~6% beyond its columns (BENCHMARKS.md, "Padding and shapes").
SPLIT_BELOW = 0.85


def fit_shapes(micro_batches: list[dict], buckets: int, multiple: int = 1, zigzag: bool = False,
               rows_per_device: int = 1) -> list[dict]:
    """Micro-batches with `loss_weight` -> the step's fields (ROW_FIELDS + the target slots), each cut to
    its bucketed shape. Every host calls this with its own rows; shapes follow the largest need over all
    hosts, so the global micro-batch i has one shape everywhere. `multiple`: lengths and target capacities
    are multiples of it (the sequence-parallel size S, which splits both; the row length must be one).
    `zigzag` (ring attention, S > 1): lengths are multiples of 2S and every row is laid out in zigzag order
    (`zigzag_rows`), after the causal shift.
    `rows_per_device` > 1 (the rows of a device are consecutive): part m of a micro-batch is row m of
    every device; the parts become micro-batches of their own when their lengths sum to at most
    SPLIT_BELOW of the whole (decided on every host's needs, so all hosts split alike)."""
    if buckets < 1:
        raise ValueError(f"trainer.shape_buckets={buckets} must be >= 1")
    if not micro_batches:
        return []
    row_length = micro_batches[0]["input_ids"].shape[1]
    zigzag = zigzag and multiple > 1
    length_multiple = 2 * multiple if zigzag else multiple
    if row_length % length_multiple:
        raise ValueError(f"rows of {row_length} tokens cannot be split over trainer.mesh.sequence={multiple}"
                         f"{' in 2S zigzag chunks (ring attention)' if zigzag else ''}: make data.max_length "
                         f"(or data.max_token_len_per_gpu) a multiple of {length_multiple}")
    rows = micro_batches[0]["input_ids"].shape[0]
    parts = rows_per_device if rows_per_device > 1 and rows % rows_per_device == 0 else 1
    needs = np.array([[[_used_length(mb["segment_ids"][m::parts]), _most_targets(mb["loss_weight"][m::parts])]
                       for m in range(parts)] for mb in micro_batches])  # [micro-batches, parts, 2]
    needs = distributed.all_hosts(needs.ravel()).reshape(-1, *needs.shape).max(axis=0)
    bucket = lambda used: bucketed(int(used), row_length, buckets, length_multiple)  # noqa: E731

    def fit(mb: dict, used, targets) -> dict:
        length = bucket(used)
        mb = shaped(mb, length, bucketed(int(targets), length, buckets, multiple))
        return zigzag_rows(mb, multiple) if zigzag else mb

    out = []
    for mb, part_needs in zip(micro_batches, needs):
        whole = bucket(part_needs[:, 0].max())
        apart = sum(bucket(u) for u in part_needs[:, 0])
        if parts > 1 and apart <= SPLIT_BELOW * parts * whole:
            out += [fit({k: x[m::parts] for k, x in mb.items()}, *part_needs[m]) for m in range(parts)]
        else:
            out.append(fit(mb, *part_needs.max(axis=0)))
    return out


def zigzag_rows(mb: dict, s: int) -> dict:
    """A shaped micro-batch in ring attention's load-balanced token order (jsft/models/ring.py::zigzag_order):
    the per-token fields permuted, each target slot's predicting position moved to its token's new index.
    Slots keep their order, labels and weights, so the loss (a sum over slots) is the same number."""
    order = zigzag_order(mb["input_ids"].shape[1], s)
    new_index = np.argsort(order).astype(np.int32)  # old token index -> its index in the zigzag row
    rows = {k: np.ascontiguousarray(mb[k][:, order]) for k in ROW_FIELDS}
    return {**mb, **rows, "target_pos": new_index[mb["target_pos"]]}


def shaped(mb: dict, length: int, capacity: int) -> dict:
    """One micro-batch cut to `length` tokens per row, with `capacity` target slots per row."""
    cut = {k: np.ascontiguousarray(mb[k][:, :length]) for k in (*ROW_FIELDS, "loss_weight")}
    return {**{k: cut[k] for k in ROW_FIELDS}, **causal_targets(cut["loss_weight"], cut["input_ids"], capacity)}


def bucketed(need: int, full: int, buckets: int, multiple: int = 1) -> int:
    """The smallest multiple of ceil(full / buckets) (rounded up to a multiple of `multiple`) that holds
    `need` (at least one step), capped at full (itself a multiple of `multiple`)."""
    step = -(-full // buckets)
    step = -(-step // multiple) * multiple
    return min(full, max(step, -(-need // step) * step))


def _used_length(segment_ids: np.ndarray) -> int:
    """1 + the last non-padding column of any row (0 for an all-padding micro-batch)."""
    used = np.flatnonzero((np.asarray(segment_ids) != 0).any(axis=0))
    return int(used[-1]) + 1 if used.size else 0


def _most_targets(loss_weight: np.ndarray) -> int:
    return int((np.asarray(loss_weight) != 0).sum(axis=1).max(initial=0))


def largest_micro_batch(empty: dict) -> dict:
    """An all-padding micro-batch of the largest shape the step can run (whole rows, a target slot per
    token): what memory analysis and planning compile for."""
    length = empty["input_ids"].shape[1]
    return shaped({**empty, "loss_weight": np.zeros(empty["input_ids"].shape, np.float32)}, length, length)


# ---- targets, counts and weights: the causal shift and the exact normalisation --------------------------------


def target_mask(loss_mask: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    """The tokens the loss scores: masked AND preceded by a token of the same sample. Bool [..., L]."""
    seg = np.asarray(segment_ids)
    prev = np.concatenate([np.zeros_like(seg[..., :1]), seg[..., :-1]], axis=-1)
    return (np.asarray(loss_mask) > 0) & (seg == prev) & (seg != 0)


def _sample_keys(segment_ids: np.ndarray) -> np.ndarray:
    """One integer id per (row, segment) for every token: a sample's identity across the batch. [..., L]"""
    seg = np.asarray(segment_ids).astype(np.int64)
    rows = np.arange(seg.size // seg.shape[-1]).reshape(seg.shape[:-1] + (1,))
    return rows * (seg.max(initial=0) + 1) + seg


def batch_counts(loss_mask: np.ndarray, segment_ids: np.ndarray) -> tuple[int, int]:
    """(samples, target tokens) in a batch; a sample is one segment of one row with >= 1 target.

    The trainer sums these over every micro-batch and host to get the global counts for `loss_weights`.
    """
    targets = target_mask(loss_mask, segment_ids)
    return int(np.unique(_sample_keys(segment_ids)[targets]).size), int(targets.sum())


def loss_weights(
    loss_mask: np.ndarray,
    segment_ids: np.ndarray,
    mode: str,
    *,
    num_samples: int,
    num_target_tokens: int,
    max_length: int,
) -> np.ndarray:
    """Per-token weights w, float32 [..., L], such that sum(w * nll) over the GLOBAL batch is the loss.

    `num_samples` and `num_target_tokens` are global counts (`batch_counts` summed over all micro-batches,
    devices and hosts); a sample is one segment of one row with at least one target token. Modes (veRL
    names), with m the target mask and n_s the target count of sample s:

    - token-mean: sum(m * nll) / num_target_tokens. Every target token weighs the same.
    - seq-mean-token-sum: sum(m * nll) / num_samples. Each sample contributes its summed NLL.
    - seq-mean-token-mean: sum_s (sum_{t in s} nll) / n_s / num_samples. Each sample weighs the same,
      whatever its length.
    - seq-mean-token-sum-norm: sum(m * nll) / (num_samples * max_length). Summed NLL over a constant
      horizon (Dr. GRPO), so a token's weight depends on neither its sample's length nor the batch's
      token count.
    """
    targets = target_mask(loss_mask, segment_ids)
    m = targets.astype(np.float64)
    if mode == "token-mean":
        w = m / max(num_target_tokens, 1)
    elif mode == "seq-mean-token-sum":
        w = m / max(num_samples, 1)
    elif mode == "seq-mean-token-mean":
        key = _sample_keys(segment_ids)
        per_sample = np.bincount(key.ravel(), weights=m.ravel())[key]  # targets in each token's sample
        w = m / np.maximum(per_sample, 1) / max(num_samples, 1)
    elif mode == "seq-mean-token-sum-norm":
        w = m / (max(num_samples, 1) * max_length)
    else:
        raise ValueError(f"trainer.loss_agg_mode={mode!r} is not supported; allowed: {', '.join(LOSS_AGG_MODES)}")
    return w.astype(np.float32)


def causal_targets(loss_weight: np.ndarray, input_ids: np.ndarray, capacity: int) -> dict[str, np.ndarray]:
    """The causal shift, done here and nowhere else: target token t is predicted by hidden state t-1.

    loss_weight [R, T] (from `loss_weights`: non-zero only at tokens that continue their sample) ->
    per row, the first `capacity` slots list the targets in order, the rest are padding (weight 0):

        target_pos    [R, C] int32    t - 1, the position whose hidden state predicts token t
        target_ids    [R, C] int32    input_ids[t], the label
        target_weight [R, C] float32  loss_weight[t]

    The loss computes logits for these slots only: in chat SFT most tokens (system, user, tool outputs,
    padding) are never targets, and the unembed matmul plus its softmax are a large share of the step.
    """
    w = np.asarray(loss_weight, np.float32)
    rows, length = w.shape
    if (w[:, 0] != 0).any():
        raise ValueError("a token at position 0 has a loss weight but nothing before it to predict it from")
    out = {
        "target_pos": np.zeros((rows, capacity), np.int32),
        "target_ids": np.zeros((rows, capacity), np.int32),
        "target_weight": np.zeros((rows, capacity), np.float32),
    }
    for r in range(rows):
        t = np.flatnonzero(w[r])
        if len(t) > capacity:
            raise ValueError(f"row {r} has {len(t)} targets, more than the capacity {capacity}")
        out["target_pos"][r, : len(t)] = t - 1
        out["target_ids"][r, : len(t)] = input_ids[r, t]
        out["target_weight"][r, : len(t)] = w[r, t]
    return out
