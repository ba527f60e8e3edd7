"""One optimizer step's host batches -> the micro-batches the compiled step runs.

    gather_step     this host's micro-batches and the GLOBAL sample / target / token counts; every host
                    pads to the same number of micro-batches (all hosts run the same programs)
    attach_weights  per-token loss weights from those global counts (loss.loss_weights)
    fit_shapes      each micro-batch cut to the shortest bucketed row length that holds every host's rows,
                    and its targets listed per row in a bucketed capacity (loss.causal_targets), so the
                    step computes neither trailing padding nor logits at non-target positions

Buckets keep the number of compiled shapes small: with `trainer.shape_buckets = k`, row lengths are
multiples of row_length / k and target capacities multiples of (row length) / k, so at most k * k
programs compile (in practice a few: packed rows are mostly full). k = 1 is one fixed shape: whole rows
and a logit at every position.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np

from jsft import distributed
from jsft.data.pipeline import StepBatch
from jsft.train.loss import batch_counts, causal_targets, loss_weights

ROW_FIELDS = ("input_ids", "segment_ids", "positions")


@dataclass
class GlobalStep:
    """One optimizer step's micro-batches (host-local rows with loss weights) and its GLOBAL counts."""

    micro_batches: list[dict]
    samples: int
    target_tokens: int
    tokens: int

    @property
    def computed_tokens(self) -> int:
        """Tokens the step computes over all hosts and micro-batches, padding included."""
        return sum(mb["input_ids"].size for mb in self.micro_batches) * jax.process_count()


def gather_step(batch: StepBatch, empty: dict) -> GlobalStep:
    """This host's micro-batches plus the GLOBAL counts; every host is padded to the same number of
    micro-batches (an empty one weighs nothing), since all hosts must run the same programs."""
    counts = np.array([batch_counts(mb["loss_mask"], mb["segment_ids"]) for mb in batch.micro_batches]).reshape(-1, 2)
    every = distributed.all_hosts([len(batch.micro_batches), *counts.sum(axis=0), batch.num_tokens])
    num_micro = int(every[:, 0].max())
    samples, targets, tokens = (int(x) for x in every[:, 1:].sum(axis=0))
    micro = batch.micro_batches + [dict(empty) for _ in range(num_micro - len(batch.micro_batches))]
    return GlobalStep(micro, samples, targets, tokens)


def prepare_step(batch: StepBatch, empty: dict, *, mode: str, max_length: int, buckets: int) -> GlobalStep:
    """gather_step + attach_weights + fit_shapes: one training step's micro-batches, ready for the step."""
    g = gather_step(batch, empty)
    attach_weights(g.micro_batches, mode, samples=g.samples, targets=g.target_tokens, max_length=max_length)
    g.micro_batches = fit_shapes(g.micro_batches, buckets)
    return g


def attach_weights(micro_batches: list[dict], mode: str, *, samples: int, targets: int, max_length: int) -> None:
    """Per-token loss weights normalised by counts over everything the loss covers (see loss.py)."""
    for mb in micro_batches:
        mb["loss_weight"] = loss_weights(
            mb["loss_mask"], mb["segment_ids"], mode,
            num_samples=samples, num_target_tokens=targets, max_length=max_length,
        )


def fit_shapes(micro_batches: list[dict], buckets: int) -> list[dict]:
    """Micro-batches with `loss_weight` -> the step's fields (ROW_FIELDS + the target slots), each cut to
    its bucketed shape. Every host calls this with its own rows; shapes follow the largest need over all
    hosts, so the global micro-batch i has one shape everywhere."""
    if buckets < 1:
        raise ValueError(f"trainer.shape_buckets={buckets} must be >= 1")
    if not micro_batches:
        return []
    needs = np.array([[_used_length(mb["segment_ids"]), _most_targets(mb["loss_weight"])] for mb in micro_batches])
    needs = distributed.all_hosts(needs.ravel()).reshape(-1, len(micro_batches), 2).max(axis=0)
    row_length = micro_batches[0]["input_ids"].shape[1]
    out = []
    for mb, (used, targets) in zip(micro_batches, needs):
        length = bucketed(int(used), row_length, buckets)
        out.append(shaped(mb, length, bucketed(int(targets), length, buckets)))
    return out


def shaped(mb: dict, length: int, capacity: int) -> dict:
    """One micro-batch cut to `length` tokens per row, with `capacity` target slots per row."""
    cut = {k: np.ascontiguousarray(mb[k][:, :length]) for k in (*ROW_FIELDS, "loss_weight")}
    return {**{k: cut[k] for k in ROW_FIELDS}, **causal_targets(cut["loss_weight"], cut["input_ids"], capacity)}


def bucketed(need: int, full: int, buckets: int) -> int:
    """The smallest multiple of ceil(full / buckets) that holds `need` (at least one step), capped at full."""
    step = -(-full // buckets)
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
