"""The batch's one owner (jsft/data/batch.py): validation batches are training batches built by the same
function, normalised over the whole validation set; the typed micro-batch crosses jit as a jax pytree."""

import dataclasses

import jax
import numpy as np
import pytest

from jsft.data.batch import BatchSpec, MicroBatch, eval_steps, largest_micro_batch, prepare_step
from jsft.data.config import DataConfig
from jsft.data.pipeline import EvalBatches, TrainBatches
from jsft.train.step import TrainStep  # noqa: F401  (registers MicroBatch as a pytree: the device boundary)

from .test_pipeline import synthetic

# 2 devices x 2 rows per micro-batch, rows of 32; 4 buckets, S=2 in zigzag order: every stage of the path
CFG = dict(max_length=32, micro_batch_size_per_gpu=2, shuffle=False)


def _spec(layout, mode="token-mean"):
    return BatchSpec(layout, 32, mode, buckets=4, sequence=2, zigzag=True)


def _fields(mb: MicroBatch) -> dict:
    return {f.name: getattr(mb, f.name) for f in dataclasses.fields(mb)}


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_validation_and_training_batches_of_the_same_rows_are_identical(mode):
    lengths = [30, 28, 25, 22, 20, 12, 9, 4]  # one step's samples, in file order (no shuffle)
    ds = synthetic(lengths)
    train = TrainBatches(ds, DataConfig(train_batch_size=8, **CFG), seed=0, process_index=0, process_count=1,
                         local_devices=2)
    val = EvalBatches(ds, DataConfig(train_batch_size=8, **CFG), process_index=0, process_count=1, local_devices=2)
    trained = prepare_step(next(train), _spec(train.layout, mode))
    counts, chunks = eval_steps(val, _spec(val.layout, mode))
    validated = list(chunks)
    assert counts == trained.counts and len(validated) == 1
    assert len(trained.micro_batches) == len(validated[0]) >= 2
    for a, b in zip(trained.micro_batches, validated[0]):
        for name, x in _fields(a).items():
            y = getattr(b, name)
            assert x.dtype == y.dtype and np.array_equal(x, y), name


def test_validation_weights_are_normalised_over_the_whole_set():
    """Three chunks of 8 samples, each weighted by the set's target count: token-mean weights sum to 1 over
    the set (each chunk's alone to its share), as one training step of all 24 samples would."""
    ds = synthetic([int(n) for n in np.random.default_rng(3).integers(3, 33, size=24)])
    val = EvalBatches(ds, DataConfig(train_batch_size=8, **CFG), process_index=0, process_count=1, local_devices=2)
    counts, chunks = eval_steps(val, _spec(val.layout))
    sums = [sum(float(mb.target_weight.sum()) for mb in micro) for micro in chunks]
    assert len(sums) == 3 and all(0 < s < 1 for s in sums)
    assert sum(sums) == pytest.approx(1.0, rel=1e-6)
    # the set's target tokens: each sample's masked tokens after its first (a first token predicts nothing)
    assert counts.target_tokens == sum(int(ds.sample(i)[1][1:].sum()) for i in range(len(ds)))


def test_the_micro_batch_round_trips_through_jit_as_a_pytree():
    mb = largest_micro_batch(2, 8)
    mb = dataclasses.replace(mb, input_ids=np.arange(16, dtype=np.int32).reshape(2, 8))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(mb)[0]]
    assert paths == [f".{f.name}" for f in dataclasses.fields(MicroBatch)]

    out = jax.jit(lambda b: dataclasses.replace(b, target_weight=b.target_weight + 1))(mb)
    assert type(out) is MicroBatch
    for name, x in _fields(mb).items():
        y = np.asarray(getattr(out, name))
        assert y.dtype == x.dtype and y.shape == x.shape, name
        np.testing.assert_array_equal(y, x + 1 if name == "target_weight" else x, err_msg=name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        mb.input_ids = mb.positions
