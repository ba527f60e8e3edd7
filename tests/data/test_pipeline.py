"""Batches: global-batch semantics, packing, micro-batch shapes, host shares, resume, eval; validation and
training batches of the same rows are the same micro-batches; the typed micro-batch is a jax pytree."""

import json
import re

import numpy as np
import pytest

from jsft.data.config import DataConfig
from jsft.data.dataset import DataStats, TokenizedDataset
from jsft.data.batch import gather
from jsft.data.pipeline import EvalBatches, TrainBatches, build_train_batches
from jsft.data.sources import RowLocations

from .helpers import chat, config, target_spans, write_jsonl


def synthetic(lengths, seed=0) -> TokenizedDataset:
    """Sample i has ids 1000 * (i + 1) + t, so every token names its sample; a random non-empty mask."""
    rng = np.random.default_rng(seed)
    ids = [1000 * (i + 1) + np.arange(n) for i, n in enumerate(lengths)]
    masks = [np.maximum(rng.random(n) < 0.4, np.arange(n) == n - 1) for n in lengths]
    end = np.cumsum(lengths)
    n = len(lengths)
    return TokenizedDataset(
        input_ids=np.concatenate(ids).astype(np.int32),
        loss_mask=np.concatenate(masks).astype(np.uint8),
        begin=end - np.asarray(lengths),
        end=end,
        source_index=np.arange(n),
        turn_index=np.full(n, -1, np.int32),
        mismatch=np.full(n, -1, np.int32),
        targets=np.array([m.sum() for m in masks]),
        locations=RowLocations(["x.jsonl"], np.array([0, n]), np.arange(1, n + 1)),
        stats=DataStats(rows=n),
    )


LENGTHS = [int(x) for x in np.random.default_rng(1).integers(3, 33, size=50)]


def unpack(step) -> dict[int, tuple[list[int], list[int]]]:
    """sample number -> (ids, mask), read back from the packed rows through segment_ids/positions."""
    out = {}
    for mb in step.micro_batches:
        for row in range(mb.input_ids.shape[0]):
            seg = mb.segment_ids[row]
            for s in range(1, seg.max() + 1):
                where = np.flatnonzero(seg == s)
                assert np.array_equal(where, np.arange(where[0], where[-1] + 1)), "a sample is split"
                assert np.array_equal(mb.positions[row][where], np.arange(len(where)))
                ids = mb.input_ids[row][where]
                out[int(ids[0]) // 1000 - 1] = (ids.tolist(), mb.loss_mask[row][where].tolist())
            assert not mb.input_ids[row][seg == 0].any() and not mb.loss_mask[row][seg == 0].any()
    return out


def masked(step) -> int:
    """loss_mask ones in a step's rows."""
    return sum(int(mb.loss_mask.sum()) for mb in step.micro_batches)


def batches(ds, seed=0, process_index=0, process_count=1, local_devices=2, **data_options):
    """TrainBatches over a synthetic dataset; 8 samples per step, rows of 32, 2 devices x 2 rows."""
    cfg = DataConfig(**{"train_batch_size": 8, "max_length": 32, "micro_batch_size_per_gpu": 2, **data_options})
    return TrainBatches(ds, cfg, seed=seed, process_index=process_index, process_count=process_count, local_devices=local_devices)


def test_packing_keeps_every_token_and_target():
    ds = synthetic(LENGTHS)
    train = batches(ds)
    seen = {}
    for _ in range(train.steps_per_epoch):
        step = train.__next__()
        got = unpack(step)
        counts = gather(step, train.layout).counts  # every sample ends in a target: all 8 count
        assert counts.samples == 8 == len(got)
        assert masked(step) == sum(sum(m) for _, m in got.values())
        assert counts.tokens == sum(len(i) for i, _ in got.values())
        for i, (ids, mask) in got.items():
            want_ids, want_mask = ds.sample(i)
            assert ids == want_ids.tolist() and mask == want_mask.tolist()
        for mb in step.micro_batches:
            assert all(x.shape == (4, 32) and x.dtype == np.int32 for x in vars(mb).values())
        seen.update(got)
    # One epoch: steps_per_epoch * batch_size distinct samples, the incomplete last batch dropped.
    assert train.steps_per_epoch == 50 // 8 and len(seen) == 48


def test_micro_batch_count_follows_the_data():
    short = batches(synthetic([4] * 16), train_batch_size=16)  # 16 samples of 4 tokens fit 2 rows
    assert len(next(short).micro_batches) == 1
    long = batches(synthetic([30] * 16), train_batch_size=16)  # one sample per row: 16 rows / 4 per micro-batch
    assert len(next(long).micro_batches) == 4


def test_right_padding_and_dynamic_batch_size():
    ds = synthetic(LENGTHS)
    step = next(batches(ds, pad_mode="right"))
    rows = np.concatenate([mb.segment_ids for mb in step.micro_batches])
    assert (rows.max(axis=1) <= 1).all() and (rows.max(axis=1) == 1).sum() == 8
    assert len(step.micro_batches) == 2 and len(unpack(step)) == 8

    dyn = batches(ds, use_dynamic_bsz=True, max_token_len_per_gpu=64)
    step = next(dyn)
    assert all(mb.input_ids.shape == (2, 64) for mb in step.micro_batches)
    assert len(unpack(step)) == 8 and dyn.layout.empty().input_ids.shape == (2, 64)
    with pytest.raises(ValueError, match="max_token_len_per_gpu=16 must be >= data.max_length=32"):
        batches(ds, use_dynamic_bsz=True, max_token_len_per_gpu=16)
    with pytest.raises(ValueError, match="pad_mode=no_padding"):
        batches(ds, use_dynamic_bsz=True, pad_mode="right")


def test_host_shares_are_disjoint_and_make_the_global_batch():
    ds = synthetic(LENGTHS)
    single = batches(ds, train_batch_size=9)
    hosts = [batches(ds, train_batch_size=9, process_index=p, process_count=2) for p in range(2)]
    for _ in range(single.steps_per_epoch + 2):  # into the second epoch
        whole = unpack(next(single))
        shares = [next(h) for h in hosts]
        a, b = (unpack(s) for s in shares)
        assert not a.keys() & b.keys() and {**a, **b} == whole
        assert [len(a), len(b)] == [5, 4]
        assert sum(masked(s) for s in shares) == sum(sum(m) for _, m in whole.values())


def test_epochs_reshuffle_deterministically():
    def epoch_order(train, epoch_steps):
        return [sorted(unpack(next(train))) for _ in range(epoch_steps)]

    train = batches(synthetic(LENGTHS))
    e0, e1 = epoch_order(train, 6), epoch_order(train, 6)
    assert e0 != e1 and next(train).epoch == 2
    again = batches(synthetic(LENGTHS))
    assert epoch_order(again, 6) == e0
    other_seed = batches(synthetic(LENGTHS), seed=5)
    assert epoch_order(other_seed, 6) != e0
    unshuffled = batches(synthetic(LENGTHS), shuffle=False)
    assert sorted(unpack(next(unshuffled))) == list(range(8))


def test_resume_mid_epoch_gives_the_identical_remaining_stream():
    ds = synthetic(LENGTHS)
    train = batches(ds, process_index=1, process_count=2)
    for _ in range(4):
        next(train)
    state = json.loads(json.dumps(train.get_state()))
    rest = [next(train) for _ in range(6)]  # crosses into epoch 1
    resumed = batches(ds, process_index=1, process_count=2)
    resumed.set_state(state)
    for a, b in zip(rest, [next(resumed) for _ in range(6)]):
        assert (a.epoch, len(a.micro_batches)) == (b.epoch, len(b.micro_batches))
        for x, y in zip(a.micro_batches, b.micro_batches):
            assert all(np.array_equal(getattr(x, k), getattr(y, k)) for k in vars(x))
    with pytest.raises(ValueError, match="the data changed"):
        batches(synthetic(LENGTHS[:-1])).set_state(state)


def test_eval_covers_every_sample_once():
    ds = synthetic(LENGTHS)
    cfg = DataConfig(train_batch_size=8, max_length=32)
    hosts = [EvalBatches(ds, cfg, process_index=p, process_count=2, local_devices=1) for p in range(2)]
    assert len(hosts[0]) == 7
    seen = {}
    for _ in range(2):  # iterable twice
        seen = {}
        for h in hosts:
            for step in h:
                got = unpack(step)
                assert not seen.keys() & got.keys()
                seen.update(got)
    assert sorted(seen) == list(range(50))


def test_too_few_samples_for_one_batch():
    with pytest.raises(ValueError, match="train_batch_size=8 is larger than the 5 training samples"):
        batches(synthetic([4] * 5))


def test_build_train_batches_end_to_end(tmp_path, qwen):
    path = write_jsonl(tmp_path / "t.jsonl", [chat(k % 3 + 1, prefix=f"{k} ") for k in range(10)])
    cfg = config(tmp_path, train_files=path, train_batch_size=4, max_length=256, micro_batch_size_per_gpu=1)
    train = build_train_batches(cfg, qwen, seed=0, process_index=0, process_count=1, local_devices=2)
    assert train.steps_per_epoch == 2
    step = next(train)
    spans = [s for mb in step.micro_batches for row, ids in enumerate(mb.input_ids) for s in target_spans(qwen, ids, mb.loss_mask[row])]
    assert spans and all(re.fullmatch(r"\d+ answer \d<\|im_end\|>", s) for s in spans)
    assert gather(step, train.layout).counts.samples == 4 and train.layout.empty().input_ids.shape == (2, 256)
