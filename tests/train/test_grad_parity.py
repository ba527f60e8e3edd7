"""One packed micro-batch through the trainer's step (bucketed shape, logits at the targets only, 8-device
FSDP) gives the loss and every gradient torch autograd gives transformers on the samples one by one, for
a model family and layout other than the trainer test's: Llama 3 with tied embeddings and rope scaling."""

import jax
import numpy as np
import pytest
import torch

import jsft.models as jm
from jsft.config import OptimConfig
from jsft.data.batch import Counts, Rows, batch_counts, bucketed, shaped, weigh
from jsft.models.hf_io import hf_tensors
from jsft.models.params import param_arrays
from jsft.sharding import make_mesh
from jsft.train.optim import make_optimizer
from jsft.train.step import TrainStep

from jsft_testing import make_tiny_hf

LENGTHS, ROW, ROWS = (37, 21, 14), 96, 8


def _samples(vocab, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in LENGTHS:
        mask = np.zeros(n, np.int32)
        mask[n // 3 :] = rng.random(n - n // 3) < 0.7  # an "assistant" tail with a few holes
        out.append((rng.integers(1, vocab, n).astype(np.int32), mask))
    return out


def _packed(samples):
    """All samples first-fit into row 0 of ROWS rows (the rest empty), as the pipeline lays them out."""
    mb = {k: np.zeros((ROWS, ROW), np.int32) for k in ("input_ids", "loss_mask", "segment_ids", "positions")}
    start = 0
    for s, (ids, mask) in enumerate(samples, start=1):
        end = start + len(ids)
        mb["input_ids"][0, start:end], mb["loss_mask"][0, start:end] = ids, mask
        mb["segment_ids"][0, start:end], mb["positions"][0, start:end] = s, np.arange(len(ids))
        start = end
    return Rows(**mb)


def _torch_loss_and_grads(model, samples):
    targets = sum(int(m[1:].sum()) for _, m in samples)
    model.zero_grad()
    total = 0.0
    for ids, mask in samples:
        logits = model(torch.tensor(ids[None], dtype=torch.long)).logits[0, :-1].double()
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:], dtype=torch.long), reduction="none")
        loss = (nll * torch.tensor(mask[1:], dtype=torch.float64)).sum() / targets
        loss.backward()
        total += loss.item()
    return total, {name: p.grad.numpy() for name, p in model.named_parameters()}


def test_tied_llama3_micro_batch_matches_torch_autograd(tmp_path):
    ref = make_tiny_hf(tmp_path, "llama3", vocab_size=768, hidden_size=64, intermediate_size=128,
                       tie_word_embeddings=True)
    assert ref.config.tie_word_embeddings
    samples = _samples(768)
    expected_loss, expected = _torch_loss_and_grads(ref, samples)

    mesh = make_mesh({"fsdp": -1})
    model = jm.from_pretrained(str(tmp_path), dtype="float32", mesh=mesh)
    step = TrainStep(model, make_optimizer(OptimConfig(), 1), mesh, chunk_size=100)  # 100 does not divide 768
    mb = _packed(samples)
    num_samples, num_targets = batch_counts(mb.loss_mask, mb.segment_ids)
    used = sum(LENGTHS)
    weighted = weigh(mb, Counts(num_samples, num_targets, used), "token-mean", ROW)
    length = bucketed(used, ROW, 4)  # 96 -> cut to 72 columns
    capacity = bucketed(num_targets, length, 4)
    assert length < ROW and capacity < length  # the bucketed shape really is smaller than the row
    with jax.default_matmul_precision("highest"):
        loss, grads = step.gradients(param_arrays(model), [step.device_batch(shaped(weighted, length, capacity))])
    assert float(loss) == pytest.approx(expected_loss, rel=1e-5)
    got = dict(hf_tensors(model.config, grads, np.float32))
    assert set(got) == set(expected)  # tied: one embedding tensor carries both gradients
    for name, g in expected.items():
        np.testing.assert_allclose(got[name], g, rtol=1e-4, atol=1e-5 * np.abs(g).max(), err_msg=name)
