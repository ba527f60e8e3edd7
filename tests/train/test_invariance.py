"""The loss and gradient of a global batch do not depend on how it is split: micro-batch size,
accumulation steps, device count, packing or padding, or the shapes the micro-batches are cut to
(exact aggregation over global counts)."""

import jax
import numpy as np
import pytest

import jsft.models as jm
from jsft.config import load_config
from jsft.data.batch import BatchSpec, prepare_step
from jsft.data.pipeline import build_train_batches
from jsft.data.tokenizer import load_tokenizer
from jsft.models.params import param_arrays
from jsft.sharding import make_mesh
from jsft.train.optim import make_optimizer
from jsft.train.step import TrainStep

from jsft_testing import sft_overrides

_RESULTS = {}  # the same split is asked for by several tests: computed once a session


def global_gradient(setup, tmp_path, *, devices, mode="token-mean", shape_buckets=4, **data):
    """(loss, grads, micro-steps, micro-batches before fit_shapes) of the first global batch under one way of
    splitting it."""
    key = (setup["root"], devices, mode, shape_buckets, tuple(sorted(data.items())))
    if key not in _RESULTS:
        _RESULTS[key] = _global_gradient(setup, tmp_path, devices=devices, mode=mode, shape_buckets=shape_buckets,
                                         **data)
    return _RESULTS[key]


def _global_gradient(setup, tmp_path, *, devices, mode, shape_buckets, **data):
    overrides = sft_overrides(setup, tmp_path, **{f"data.{k}": v for k, v in data.items()})
    cfg = load_config(None, overrides + [f"trainer.loss_agg_mode={mode}"])
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    batches = build_train_batches(cfg.data, tokenizer, seed=0, process_index=0, process_count=1, local_devices=devices)
    mesh = make_mesh({"fsdp": -1}, devices=jax.devices()[:devices])
    model = jm.from_pretrained(cfg.model.path, dtype="float32", mesh=mesh)
    step = TrainStep(model, make_optimizer(cfg.optim, 10), mesh, chunk_size=256)
    host = next(batches)
    micro = prepare_step(host, BatchSpec(batches.layout, cfg.data.max_length, mode, shape_buckets)).micro_batches
    loss, grads = step.gradients(param_arrays(model), [step.device_batch(mb) for mb in micro])
    return float(loss), {k: np.asarray(v) for k, v in grads.items()}, len(micro), len(host.micro_batches)


SPLITS = [
    dict(devices=8, pad_mode="no_padding", micro_batch_size_per_gpu=1),
    dict(devices=4, pad_mode="no_padding", micro_batch_size_per_gpu=2),
    dict(devices=2, pad_mode="right", micro_batch_size_per_gpu=1),  # 4 micro-batches accumulated
    dict(devices=1, pad_mode="no_padding", micro_batch_size_per_gpu=1),
    dict(devices=2, pad_mode="right", micro_batch_size_per_gpu=1, shape_buckets=1),  # whole rows, every logit
    dict(devices=8, pad_mode="no_padding", use_dynamic_bsz=True, max_token_len_per_gpu=512),
    dict(devices=1, pad_mode="no_padding", micro_batch_size_per_gpu=3),  # rows of unlike length split apart
]


def _assert_same(a, b):
    loss_a, grads_a = a[:2]
    loss_b, grads_b = b[:2]
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    for name in grads_a:
        scale = np.abs(grads_a[name]).max()
        np.testing.assert_allclose(grads_b[name], grads_a[name], rtol=0, atol=1e-5 * scale, err_msg=name)


def test_token_mean_is_invariant_to_the_split(sft_setup, tmp_path):
    results = [global_gradient(sft_setup, tmp_path, **split) for split in SPLITS]
    assert len({r[2] for r in results}) > 1  # the splits really differ in accumulation steps
    assert results[-1][2] > results[-1][3]  # and fit_shapes ran some micro-batch as one micro-step per row
    for other in results[1:]:
        _assert_same(results[0], other)


@pytest.mark.parametrize("mode", ["seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_sequence_modes_are_invariant_to_the_split(sft_setup, tmp_path, mode):
    packed = global_gradient(sft_setup, tmp_path, mode=mode, **SPLITS[0])
    padded = global_gradient(sft_setup, tmp_path, mode=mode, **SPLITS[2])
    _assert_same(packed, padded)
    token_mean = global_gradient(sft_setup, tmp_path, **SPLITS[0])
    assert packed[0] != pytest.approx(token_mean[0], rel=1e-3)  # the mode changes the loss
