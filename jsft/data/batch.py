"""The batch, from one step's samples to the micro-batches the compiled step runs: its one host-side owner.

    pack_rows       samples (input_ids, loss_mask) -> rows of one length: first-fit packed, or one per row
    host_batch      + grouped into micro-batches of one shape (the pipeline runs these two per step and feeder)
    gather          the GLOBAL counts (samples, target tokens, tokens, each feeder once) and this host's
                    micro-batches padded to the most any host has (all hosts run the same programs)
    micro_batches   per-token loss weights from global counts (`loss_weights`), the causal shift into target
                    slots (`causal_targets`), bucketed shapes and row splits (`fit_shapes`) and ring
                    attention's zigzag token order (`zigzag_rows`): the typed MicroBatch the step consumes
    prepare_step    gather + micro_batches of one optimizer step
    eval_steps      the validation set: gathered per chunk, weighted by the whole set's counts, through the
                    same micro_batches

Types, each frozen (a stage returns a new one; nothing is edited in place):

    Rows          int32 [N, L]: input_ids, loss_mask, segment_ids, positions (packed rows, by token)
    WeightedRows  the same rows with float32 loss_weight in place of loss_mask
    MicroBatch    input_ids, segment_ids, positions [R, T]; target_pos, target_ids, target_weight [R, C]

This module is numpy (and grain for packing); jax enters at one boundary, `TrainStep.device_batch`
(jsft/train/step.py), which registers MicroBatch as a jax pytree and places its fields on the devices.

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

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence

import grain
import numpy as np

from jsft import distributed
from jsft.config import LOSS_AGG_MODES
from jsft.data.config import DataConfig



def _map_fields(batch, fn):
    """A copy of a typed batch (a dataclass of arrays) with `fn` applied to every field."""
    return dataclasses.replace(batch, **{f.name: fn(getattr(batch, f.name)) for f in dataclasses.fields(batch)})


# ---- the types --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Rows:
    """Packed rows, int32 [N, L] each. segment_ids 0 is padding; positions restart at 0 per sample."""

    input_ids: np.ndarray
    loss_mask: np.ndarray  # 1: the token is a target (predicted from the token before it)
    segment_ids: np.ndarray
    positions: np.ndarray

    @classmethod
    def empty(cls, rows: int, length: int) -> "Rows":
        return cls(*(np.zeros((rows, length), np.int32) for _ in dataclasses.fields(cls)))

    def take(self, index) -> "Rows":
        """These rows indexed alike in every field (a slice of rows, a cut of columns)."""
        return _map_fields(self, lambda x: x[index])


@dataclass(frozen=True, eq=False)
class WeightedRows:
    """Rows whose loss_mask became per-token loss weights (float32 [N, L], from global counts)."""

    input_ids: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    loss_weight: np.ndarray

    def take(self, index) -> "WeightedRows":
        return _map_fields(self, lambda x: x[index])


@dataclass(frozen=True, eq=False)
class MicroBatch:
    """What one micro-step runs: R rows of T tokens and C target slots per row. numpy on the host, jax.Array
    after `TrainStep.device_batch` (a jax pytree, registered at that boundary: jsft/train/step.py)."""

    input_ids: Any  # int32 [R, T]
    segment_ids: Any  # int32 [R, T], 0 = padding
    positions: Any  # int32 [R, T]
    target_pos: Any  # int32 [R, C]: t - 1, the position whose hidden state predicts target token t
    target_ids: Any  # int32 [R, C]: input_ids[t], the label
    target_weight: Any  # float32 [R, C]: its loss weight (0 in an empty slot)


@dataclass(frozen=True, eq=False)
class HostBatch:
    """One optimizer step's rows on this feeder, grouped into micro-batches of one shape."""

    epoch: int
    micro_batches: tuple[Rows, ...]


@dataclass(frozen=True)
class Counts:
    """GLOBAL counts of a step (or of the validation set): summed over micro-batches and feeders."""

    samples: int  # sample segments with at least one target token
    target_tokens: int  # tokens the loss scores: masked in and continuing their sample (`target_mask`)
    tokens: int  # non-padding tokens

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(self.samples + other.samples, self.target_tokens + other.target_tokens, self.tokens + other.tokens)


@dataclass(frozen=True, eq=False)
class GlobalStep:
    """One optimizer step: this host's micro-batches, ready for the step, and the step's global counts."""

    micro_batches: tuple[MicroBatch, ...]
    counts: Counts
    feeders: int = 1  # hosts (or groups of hosts) feeding different rows

    @property
    def computed_tokens(self) -> int:
        """Tokens the step computes over all feeders and micro-batches, padding included."""
        return sum(mb.input_ids.size for mb in self.micro_batches) * self.feeders


# ---- layout and spec: fixed for a run ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchLayout:
    """The shape of a feeder's micro-batch of rows."""

    row_length: int  # tokens per row
    rows_per_micro_batch: int  # rows of one micro-batch on this feeder (all its row blocks)
    one_sample_per_row: bool  # pad_mode=right
    devices: int = 1  # row blocks the rows of a micro-batch are split over

    @property
    def rows_per_device(self) -> int:
        return self.rows_per_micro_batch // self.devices

    @classmethod
    def from_config(cls, cfg: DataConfig, local_devices: int) -> "BatchLayout":
        if not cfg.use_dynamic_bsz:
            return cls(cfg.max_length, local_devices * cfg.micro_batch_size_per_gpu, cfg.pad_mode == "right", local_devices)
        if cfg.pad_mode != "no_padding":
            raise ValueError("data.use_dynamic_bsz=true packs samples into token-budget rows; it needs data.pad_mode=no_padding")
        if cfg.max_token_len_per_gpu < cfg.max_length:
            raise ValueError(
                f"data.max_token_len_per_gpu={cfg.max_token_len_per_gpu} must be >= data.max_length={cfg.max_length}, "
                "so that the longest sample fits one device's row"
            )
        return cls(cfg.max_token_len_per_gpu, local_devices, False, local_devices)

    def empty(self) -> Rows:
        return Rows.empty(self.rows_per_micro_batch, self.row_length)


@dataclass(frozen=True)
class BatchSpec:
    """How a run's host rows become the step's micro-batches."""

    layout: BatchLayout
    max_length: int  # data.max_length: seq-mean-token-sum-norm's horizon
    loss_agg_mode: str = "token-mean"  # trainer.loss_agg_mode
    buckets: int = 1  # trainer.shape_buckets (1: whole rows, a logit at every position)
    sequence: int = 1  # the sequence-parallel size S: lengths and target capacities are multiples of it
    zigzag: bool = False  # ring attention's token order (with S > 1)
    leaders: Optional[tuple[int, ...]] = None  # one process per feeder, whose counts are summed; None: every one


# ---- samples -> host rows (the pipeline's prefetch thread) ------------------------------------------------------


def pack_rows(samples: list[tuple[np.ndarray, np.ndarray]], layout: BatchLayout) -> Rows:
    """First-fit-decreasing packing of (input_ids, loss_mask) samples into rows of layout.row_length."""
    if not samples:
        return Rows.empty(0, layout.row_length)
    longest_first = sorted(samples, key=lambda s: -len(s[0]))  # stable: ties keep the shuffled order
    source = grain.MapDataset.source([{"input_ids": ids, "loss_mask": mask} for ids, mask in longest_first])
    packed = grain.experimental.FirstFitPackIterDataset(
        source.to_iter_dataset(grain.ReadOptions(num_threads=0)),
        length_struct={"input_ids": layout.row_length, "loss_mask": layout.row_length},
        num_packing_bins=len(samples),  # every sample fits some bin: the step's rows come out in one batch
        shuffle_bins=False,
        meta_features=("loss_mask",),  # packed like input_ids, without its own segment ids
        max_sequences_per_bin=1 if layout.one_sample_per_row else None,
    )
    rows = list(packed)
    return Rows(
        input_ids=np.stack([r["input_ids"] for r in rows]).astype(np.int32),
        loss_mask=np.stack([r["loss_mask"] for r in rows]).astype(np.int32),
        segment_ids=np.stack([r["input_ids_segment_ids"] for r in rows]).astype(np.int32),
        positions=np.stack([r["input_ids_positions"] for r in rows]).astype(np.int32),
    )


def group(rows: Rows, layout: BatchLayout) -> tuple[Rows, ...]:
    """Consecutive groups of `rows_per_micro_batch` rows, the last one padded with empty rows; the number
    of micro-batches follows the data."""
    size = layout.rows_per_micro_batch
    n = len(rows.input_ids)
    padded = _map_fields(rows, lambda x: np.concatenate([x, np.zeros((-n % size, x.shape[1]), x.dtype)]))
    return tuple(padded.take(slice(m, m + size)) for m in range(0, n, size))


def host_batch(samples: list[tuple[np.ndarray, np.ndarray]], layout: BatchLayout, epoch: int) -> HostBatch:
    """A feeder's samples of one step -> its rows, grouped into micro-batches."""
    return HostBatch(epoch, group(pack_rows(samples, layout), layout))


# ---- host rows -> the step's micro-batches (the trainer's thread: every host in step) ---------------------------


@dataclass(frozen=True, eq=False)
class Gathered:
    """A step's host rows after the counts exchange, before weights and shapes."""

    micro_batches: tuple[Rows, ...]  # this host's, padded with empty ones to the most any host has
    counts: Counts
    feeders: int


def gather(batch: HostBatch, layout: BatchLayout, leaders: Optional[Sequence[int]] = None) -> Gathered:
    """This host's micro-batches plus the GLOBAL counts; every host is padded to the same number of
    micro-batches (an empty one weighs nothing), since all hosts must run the same programs. `leaders`:
    the processes whose counts are summed, one per feeder (jsft/train/feeders.py; the others hold copies
    of their rows); default every process."""
    mine = [(*batch_counts(mb.loss_mask, mb.segment_ids), int((mb.segment_ids > 0).sum())) for mb in batch.micro_batches]
    every = distributed.all_hosts([len(batch.micro_batches), *np.array(mine, np.int64).reshape(-1, 3).sum(axis=0)])
    counted = every if leaders is None else every[list(leaders)]
    counts = Counts(*(int(x) for x in counted[:, 1:].sum(axis=0)))
    padding = (layout.empty(),) * (int(every[:, 0].max()) - len(batch.micro_batches))
    return Gathered(batch.micro_batches + padding, counts, len(counted))


def micro_batches(groups: Sequence[Rows], counts: Counts, spec: BatchSpec) -> list[MicroBatch]:
    """Micro-batches of rows -> the step's, weighted by `counts` (the step's, or the validation set's):
    loss weights, the causal shift, shapes, row splits and token order. Training and validation alike."""
    weighted = [weigh(g, counts, spec.loss_agg_mode, spec.max_length) for g in groups]
    return fit_shapes(weighted, spec.buckets, spec.sequence, spec.zigzag, spec.layout.rows_per_device)


def prepare_step(batch: HostBatch, spec: BatchSpec) -> GlobalStep:
    """One optimizer step's host rows -> its micro-batches, ready for the step, with its global counts."""
    g = gather(batch, spec.layout, spec.leaders)
    return GlobalStep(tuple(micro_batches(g.micro_batches, g.counts, spec)), g.counts, g.feeders)


def eval_steps(batches: Iterable[HostBatch], spec: BatchSpec) -> tuple[Counts, Iterator[list[MicroBatch]]]:
    """The validation set's global counts, and each chunk's micro-batches weighted by them, so that the
    summed loss is the whole set's (normalised like training). Every host iterates all of it."""
    chunks = [gather(b, spec.layout, spec.leaders) for b in batches]
    total = sum((c.counts for c in chunks), Counts(0, 0, 0))
    return total, (micro_batches(c.micro_batches, total, spec) for c in chunks)


def weigh(rows: Rows, counts: Counts, mode: str, max_length: int) -> WeightedRows:
    """Rows with per-token loss weights normalised by global counts over everything the loss covers."""
    w = loss_weights(rows.loss_mask, rows.segment_ids, mode, num_samples=counts.samples,
                     num_target_tokens=counts.target_tokens, max_length=max_length)
    return WeightedRows(rows.input_ids, rows.segment_ids, rows.positions, w)


# Split a micro-batch into one micro-step per row (of each device) only when that computes at most this
# share of its columns: a micro-step costs ~6% beyond its columns (BENCHMARKS.md, "Padding and shapes").
SPLIT_BELOW = 0.85


def fit_shapes(groups: Sequence[WeightedRows], buckets: int, multiple: int = 1, zigzag: bool = False,
               rows_per_device: int = 1) -> list[MicroBatch]:
    """Weighted micro-batches -> the step's MicroBatches, each cut to its bucketed shape. Every host calls
    this with its own rows; shapes follow the largest need over all hosts, so the global micro-batch i has
    one shape everywhere. `multiple`: lengths and target capacities are multiples of it (the
    sequence-parallel size S, which splits both; the row length must be one).
    `zigzag` (ring attention, S > 1): lengths are multiples of 2S and every row is laid out in zigzag order
    (`zigzag_rows`), after the causal shift.
    `rows_per_device` > 1 (the rows of a device are consecutive): part m of a micro-batch is row m of
    every device; the parts become micro-batches of their own when their lengths sum to at most
    SPLIT_BELOW of the whole (decided on every host's needs, so all hosts split alike)."""
    if buckets < 1:
        raise ValueError(f"trainer.shape_buckets={buckets} must be >= 1")
    if not groups:
        return []
    rows, row_length = groups[0].input_ids.shape
    zigzag = zigzag and multiple > 1
    length_multiple = 2 * multiple if zigzag else multiple
    if row_length % length_multiple:
        raise ValueError(f"rows of {row_length} tokens cannot be split over trainer.mesh.sequence={multiple}"
                         f"{' in 2S zigzag chunks (ring attention)' if zigzag else ''}: make data.max_length "
                         f"(or data.max_token_len_per_gpu) a multiple of {length_multiple}")
    parts = rows_per_device if rows_per_device > 1 and rows % rows_per_device == 0 else 1
    needs = np.array([[[_used_length(g.segment_ids[m::parts]), _most_targets(g.loss_weight[m::parts])]
                       for m in range(parts)] for g in groups])  # [micro-batches, parts, 2]
    needs = distributed.all_hosts(needs.ravel()).reshape(-1, *needs.shape).max(axis=0)
    bucket = lambda used: bucketed(int(used), row_length, buckets, length_multiple)  # noqa: E731

    def fit(g: WeightedRows, used, targets) -> MicroBatch:
        length = bucket(used)
        mb = shaped(g, length, bucketed(int(targets), length, buckets, multiple))
        return zigzag_rows(mb, multiple) if zigzag else mb

    out = []
    for g, part_needs in zip(groups, needs):
        whole = bucket(part_needs[:, 0].max())
        apart = sum(bucket(u) for u in part_needs[:, 0])
        if parts > 1 and apart <= SPLIT_BELOW * parts * whole:
            out += [fit(g.take(slice(m, None, parts)), *part_needs[m]) for m in range(parts)]
        else:
            out.append(fit(g, *part_needs.max(axis=0)))
    return out


def shaped(rows: WeightedRows, length: int, capacity: int) -> MicroBatch:
    """Rows cut to `length` tokens, with `capacity` target slots per row (the causal shift)."""
    cut = rows.take((slice(None), slice(0, length)))
    pos, ids, weight = causal_targets(cut.loss_weight, cut.input_ids, capacity)
    contiguous = np.ascontiguousarray
    return MicroBatch(contiguous(cut.input_ids), contiguous(cut.segment_ids), contiguous(cut.positions), pos, ids, weight)


def largest_micro_batch(rows: int, length: int) -> MicroBatch:
    """An all-padding micro-batch of the largest shape the step can run (whole rows, a target slot per
    token): what memory analysis and planning compile for."""
    zeros = np.zeros((rows, length), np.float32)
    return shaped(WeightedRows(*(np.zeros((rows, length), np.int32) for _ in range(3)), zeros), length, length)


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


# ---- ring attention's token order -------------------------------------------------------------------------------


def zigzag_order(length: int, s: int) -> np.ndarray:
    """The zigzag permutation of a row of `length` tokens (a multiple of 2S): new index i holds old token
    order[i], so device d (the d-th run of length/S) holds chunks d and 2S-1-d of length / (2S) tokens.
    Ring attention (jsft/models/ring.py) is exact in any token order; this one balances its work."""
    if length % (2 * s):
        raise ValueError(f"a row of {length} tokens does not cut into 2 x {s} equal chunks (zigzag, ring attention)")
    chunks = np.arange(length).reshape(2 * s, -1)
    return np.concatenate([np.concatenate([chunks[d], chunks[2 * s - 1 - d]]) for d in range(s)])


def zigzag_rows(mb: MicroBatch, s: int) -> MicroBatch:
    """A shaped micro-batch in zigzag token order: the per-token fields permuted, each target slot's
    predicting position moved to its token's new index. Slots keep their order, labels and weights, so the
    loss (a sum over slots) is the same number."""
    order = zigzag_order(mb.input_ids.shape[1], s)
    new_index = np.argsort(order).astype(np.int32)  # old token index -> its index in the zigzag row
    permute = lambda x: np.ascontiguousarray(x[:, order])  # noqa: E731
    return dataclasses.replace(mb, input_ids=permute(mb.input_ids), segment_ids=permute(mb.segment_ids),
                               positions=permute(mb.positions), target_pos=new_index[mb.target_pos])


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

    `gather` sums these over every micro-batch and feeder to get the global counts for `loss_weights`.
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


def causal_targets(loss_weight: np.ndarray, input_ids: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
    pos = np.zeros((rows, capacity), np.int32)
    ids = np.zeros((rows, capacity), np.int32)
    weight = np.zeros((rows, capacity), np.float32)
    for r in range(rows):
        t = np.flatnonzero(w[r])
        if len(t) > capacity:
            raise ValueError(f"row {r} has {len(t)} targets, more than the capacity {capacity}")
        pos[r, : len(t)] = t - 1
        ids[r, : len(t)] = input_ids[r, t]
        weight[r, : len(t)] = w[r, t]
    return pos, ids, weight
