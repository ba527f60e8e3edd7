"""Tokenized samples -> per-optimizer-step, host-local batches of fixed-shape micro-batches.

A global batch is exactly `data.train_batch_size` samples (veRL semantics), whatever the device count or
micro-batch size. Epoch e visits the samples in the order of a grain shuffle seeded with `seed + e`
(`grain.MapDataset.shuffle`, a stateless index permutation), cut into global batches, dropping the last
incomplete one. Feeder f takes the samples at positions i % feeder_count == f of each global batch and
builds its share (a feeder is one process, or the processes whose devices hold the same rows when a
sequence group spans processes: jsft/train/feeders.py; each of them builds the same rows):

    pad_mode=no_padding   the host's samples, longest first, first-fit packed into rows of
                          data.max_length tokens (grain's FirstFitPackIterDataset with one bin per
                          sample, so nothing leaks across steps and no sample is split)
    pad_mode=right        one sample per row, padded to data.max_length
    use_dynamic_bsz       packed rows of data.max_token_len_per_gpu tokens

and groups the rows into micro-batches of `local_devices * micro_batch_size_per_gpu` rows
(`local_devices` rows with use_dynamic_bsz), padding the last with empty rows, so every micro-batch has
one shape (the trainer then cuts each to a bucketed length: jsft/train/batch.py); the number of
micro-batches follows the data.

A packed row, and what the loss does with it (segment_ids 0 = padding; positions restart per sample):

    input_ids    a1 a2 a3 a4 | b1 b2 b3 | 0
    loss_mask     0  0  1  1 |  0  1  1 | 0     1: this token is a target (predicted from the previous one)
    segment_ids   1  1  1  1 |  2  2  2 | 0
    positions     0  1  2  3 |  0  1  2 | 0

Why grain's MapDataset for the step sequence (instead of a stateful IterDataset chain): a step is a pure
function of (epoch, step), so the iterator state is just those two numbers and a resume rebuilds the
identical remaining stream by slicing; grain's thread prefetch builds the next steps in the background.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import grain
import numpy as np

from jsft.data.config import DataConfig
from jsft.data.dataset import TokenizedDataset, load_dataset

FIELDS = ("input_ids", "loss_mask", "segment_ids", "positions")
_PREFETCH = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)


@dataclass
class StepBatch:
    """Everything for one optimizer step, host-local."""

    micro_batches: list[dict[str, np.ndarray]]  # FIELDS -> int32 [rows, row_length]
    epoch: int
    num_samples: int  # samples of this host in this step
    num_target_tokens: int  # sum(loss_mask) over all micro-batches of this host
    num_tokens: int  # non-padding tokens of this host


@dataclass(frozen=True)
class BatchLayout:
    row_length: int  # tokens per row
    rows_per_micro_batch: int  # rows of one micro-batch on this host (all local devices)
    one_sample_per_row: bool  # pad_mode=right
    devices: int = 1  # local devices the rows of a micro-batch are split over

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

    def empty_micro_batch(self) -> dict[str, np.ndarray]:
        return {k: np.zeros((self.rows_per_micro_batch, self.row_length), np.int32) for k in FIELDS}


def pack_rows(samples: list[tuple[np.ndarray, np.ndarray]], layout: BatchLayout) -> dict[str, np.ndarray]:
    """First-fit-decreasing packing of (input_ids, loss_mask) samples into rows; FIELDS -> [rows, row_length]."""
    if not samples:
        return {k: np.zeros((0, layout.row_length), np.int32) for k in FIELDS}
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
    return {
        "input_ids": np.stack([r["input_ids"] for r in rows]).astype(np.int32),
        "loss_mask": np.stack([r["loss_mask"] for r in rows]).astype(np.int32),
        "segment_ids": np.stack([r["input_ids_segment_ids"] for r in rows]),
        "positions": np.stack([r["input_ids_positions"] for r in rows]),
    }


def micro_batches(rows: dict[str, np.ndarray], layout: BatchLayout) -> list[dict[str, np.ndarray]]:
    """Consecutive groups of `rows_per_micro_batch` rows, the last one padded with empty rows."""
    n, size = len(rows["input_ids"]), layout.rows_per_micro_batch
    count = -(-n // size)
    out = []
    for m in range(count):
        mb = layout.empty_micro_batch()
        for k in FIELDS:
            chunk = rows[k][m * size : (m + 1) * size]
            mb[k][: len(chunk)] = chunk
        out.append(mb)
    return out


class _HostStep:
    """Global sample indices of one step -> this host's StepBatch. process_index / process_count here are
    the feeder's (jsft/train/feeders.py): the process's own unless a sequence group spans processes."""

    def __init__(self, dataset: TokenizedDataset, layout: BatchLayout, process_index: int, process_count: int):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
        self.dataset, self.layout = dataset, layout
        self.process_index, self.process_count = process_index, process_count

    def __call__(self, indices: np.ndarray, epoch: int) -> StepBatch:
        mine = indices[self.process_index :: self.process_count]
        rows = pack_rows([self.dataset.sample(int(i)) for i in mine], self.layout)
        return StepBatch(
            micro_batches=micro_batches(rows, self.layout),
            epoch=epoch,
            num_samples=len(mine),
            num_target_tokens=int(rows["loss_mask"].sum()),
            num_tokens=int((rows["segment_ids"] > 0).sum()),
        )


class TrainBatches:
    """Iterator of StepBatch over optimizer steps; epochs continue forever, epoch e shuffled with seed + e."""

    def __init__(self, dataset: TokenizedDataset, cfg: DataConfig, *, seed: int, process_index: int, process_count: int, local_devices: int):
        self.dataset = dataset
        self.layout = BatchLayout.from_config(cfg, local_devices)
        self.batch_size, self.shuffle, self.seed = cfg.train_batch_size, cfg.shuffle, seed
        self.steps_per_epoch = len(dataset) // self.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"data.train_batch_size={self.batch_size} is larger than the {len(dataset)} training samples")
        self._host_step = _HostStep(dataset, self.layout, process_index, process_count)
        self._epoch, self._step = 0, 0
        self._iterator: Optional[Iterator[StepBatch]] = None

    def _epoch_steps(self, epoch: int) -> grain.MapDataset:
        order = grain.MapDataset.range(len(self.dataset))
        if self.shuffle:
            order = order.shuffle(seed=self.seed + epoch)
        return order.batch(self.batch_size, drop_remainder=True).map(lambda idx: self._host_step(idx, epoch))

    def __iter__(self) -> "TrainBatches":
        return self

    def __next__(self) -> StepBatch:
        if self._step == self.steps_per_epoch:
            self._epoch, self._step = self._epoch + 1, 0
            self._reset_iterator()
        if self._iterator is None:
            self._iterator = iter(self._epoch_steps(self._epoch)[self._step :].to_iter_dataset(_PREFETCH))
        batch = next(self._iterator)
        self._step += 1
        return batch

    def get_state(self) -> dict:
        """JSON-serialisable position: the next batch is step `step` of epoch `epoch`."""
        return {"epoch": self._epoch, "step": self._step, "num_samples": len(self.dataset), "batch_size": self.batch_size}

    def set_state(self, state: dict) -> None:
        if (state["num_samples"], state["batch_size"]) != (len(self.dataset), self.batch_size):
            raise ValueError(
                f"the data iterator state was saved with {state['num_samples']} samples and train_batch_size="
                f"{state['batch_size']}, but this run has {len(self.dataset)} and {self.batch_size}: the data changed"
            )
        self._epoch, self._step = int(state["epoch"]), int(state["step"])
        self._reset_iterator()

    def _reset_iterator(self) -> None:
        if self._iterator is not None:
            self._iterator.close()  # stops grain's prefetch thread
        self._iterator = None

    def empty_micro_batch(self) -> dict[str, np.ndarray]:
        return self.layout.empty_micro_batch()


class EvalBatches:
    """One pass over the validation samples in file order, in chunks of train_batch_size samples (the last
    one partial), each host taking its share as in training; iterable any number of times."""

    def __init__(self, dataset: TokenizedDataset, cfg: DataConfig, *, process_index: int, process_count: int, local_devices: int):
        self.dataset = dataset
        self.layout = BatchLayout.from_config(cfg, local_devices)
        self.batch_size = cfg.train_batch_size
        self._host_step = _HostStep(dataset, self.layout, process_index, process_count)

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> Iterator[StepBatch]:
        steps = grain.MapDataset.range(len(self.dataset)).batch(self.batch_size).map(lambda idx: self._host_step(idx, 0))
        return iter(steps.to_iter_dataset(_PREFETCH))

    def empty_micro_batch(self) -> dict[str, np.ndarray]:
        return self.layout.empty_micro_batch()


def build_train_batches(cfg: DataConfig, tokenizer, *, seed: int, process_index: int, process_count: int, local_devices: int,
                        files=None, feeder: Optional[tuple[int, int]] = None) -> TrainBatches:
    """Training batches over `files` (default data.train_files); bad input raises before any batch. Tokenized
    by process; batches sharded over `feeder` = (index, count) (default: this process of process_count)."""
    dataset = load_dataset(cfg, tokenizer, cfg.train_files if files is None else files,
                           process_index=process_index, process_count=process_count, max_rows=cfg.train_max_samples)
    index, count = feeder or (process_index, process_count)
    return TrainBatches(dataset, cfg, seed=seed, process_index=index, process_count=count, local_devices=local_devices)


def build_eval_batches(cfg: DataConfig, tokenizer, *, process_index: int, process_count: int, local_devices: int,
                       files=None, feeder: Optional[tuple[int, int]] = None) -> EvalBatches:
    """Validation batches over `files` (default data.val_files): one pass, no shuffle, nothing dropped."""
    dataset = load_dataset(cfg, tokenizer, cfg.val_files if files is None else files,
                           process_index=process_index, process_count=process_count, max_rows=cfg.val_max_samples)
    index, count = feeder or (process_index, process_count)
    return EvalBatches(dataset, cfg, process_index=index, process_count=count, local_devices=local_devices)
