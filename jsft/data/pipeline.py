"""Tokenized samples -> which samples each optimizer step takes, per feeder: the step sequence.

A global batch is exactly `data.train_batch_size` samples (veRL semantics), whatever the device count or
micro-batch size. Epoch e visits the samples in the order of a grain shuffle seeded with `seed + e`
(`grain.MapDataset.shuffle`, a stateless index permutation), cut into global batches, dropping the last
incomplete one. Feeder f takes the samples at positions i % feeder_count == f of each global batch (a
feeder is one process, or the processes whose devices hold the same rows when a sequence group spans
processes: jsft/train/feeders.py; each of them builds the same rows), and jsft/data/batch.py, the owner
of the batch, turns them into that feeder's HostBatch (in grain's prefetch thread):

    pad_mode=no_padding   the host's samples, longest first, first-fit packed into rows of
                          data.max_length tokens (grain's FirstFitPackIterDataset with one bin per
                          sample, so nothing leaks across steps and no sample is split)
    pad_mode=right        one sample per row, padded to data.max_length
    use_dynamic_bsz       packed rows of data.max_token_len_per_gpu tokens

grouped into micro-batches of `local_devices * micro_batch_size_per_gpu` rows (`local_devices` rows with
use_dynamic_bsz), the last padded with empty rows, so every micro-batch has one shape (the trainer then
weighs and cuts each: batch.prepare_step); the number of micro-batches follows the data.

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

from typing import Iterator, Optional

import grain
import numpy as np

from jsft.data.batch import BatchLayout, HostBatch, host_batch
from jsft.data.config import DataConfig
from jsft.data.dataset import TokenizedDataset, load_dataset

_PREFETCH = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)


class _HostStep:
    """Global sample indices of one step -> this host's HostBatch. process_index / process_count here are
    the feeder's (jsft/train/feeders.py): the process's own unless a sequence group spans processes."""

    def __init__(self, dataset: TokenizedDataset, layout: BatchLayout, process_index: int, process_count: int):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
        self.dataset, self.layout = dataset, layout
        self.process_index, self.process_count = process_index, process_count

    def __call__(self, indices: np.ndarray, epoch: int) -> HostBatch:
        mine = indices[self.process_index :: self.process_count]
        return host_batch([self.dataset.sample(int(i)) for i in mine], self.layout, epoch)


class TrainBatches:
    """Iterator of HostBatch over optimizer steps; epochs continue forever, epoch e shuffled with seed + e."""

    def __init__(self, dataset: TokenizedDataset, cfg: DataConfig, *, seed: int, process_index: int, process_count: int, local_devices: int):
        self.dataset = dataset
        self.layout = BatchLayout.from_config(cfg, local_devices)
        self.batch_size, self.shuffle, self.seed = cfg.train_batch_size, cfg.shuffle, seed
        self.steps_per_epoch = len(dataset) // self.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"data.train_batch_size={self.batch_size} is larger than the {len(dataset)} training samples")
        self._host_step = _HostStep(dataset, self.layout, process_index, process_count)
        self._epoch, self._step = 0, 0
        self._iterator: Optional[Iterator[HostBatch]] = None

    def _epoch_steps(self, epoch: int) -> grain.MapDataset:
        order = grain.MapDataset.range(len(self.dataset))
        if self.shuffle:
            order = order.shuffle(seed=self.seed + epoch)
        return order.batch(self.batch_size, drop_remainder=True).map(lambda idx: self._host_step(idx, epoch))

    def __iter__(self) -> "TrainBatches":
        return self

    def __next__(self) -> HostBatch:
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

    def __iter__(self) -> Iterator[HostBatch]:
        steps = grain.MapDataset.range(len(self.dataset)).batch(self.batch_size).map(lambda idx: self._host_step(idx, 0))
        return iter(steps.to_iter_dataset(_PREFETCH))

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
