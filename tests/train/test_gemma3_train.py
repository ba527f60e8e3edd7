"""`python -m jsft.train` on a tiny Gemma 3 (a window shorter than the samples, per-type rope, final logit
softcap through the chunked loss) follows a transformers+torch loop, on 8 devices and with sequence=4."""

import numpy as np
import pytest
import torch
import transformers

from jsft.config import load_config
from jsft.train.__main__ import main

from jsft_testing import losses, make_tiny_gemma3, sft_overrides, torch_sft_losses

STEPS = 4
PARITY = {
    "data.train_batch_size": 16, "optim.lr": 2e-3, "optim.lr_scheduler_type": "cosine",
    "optim.lr_warmup_steps_ratio": 0.25, "optim.min_lr_ratio": 0.1, "optim.clip_grad": 1.0,
    "optim.weight_decay": 0.01, "trainer.total_training_steps": STEPS,
}


@pytest.fixture(scope="module")
def gemma_setup(sft_setup, tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3") / "model"
    make_tiny_gemma3(path, vocab_size=768, num_hidden_layers=2, sliding_window=8,
                     layer_types=["sliding_attention", "full_attention"])
    return {**sft_setup, "model": str(path)}


@pytest.fixture(scope="module")
def torch_reference(gemma_setup, tmp_path_factory):
    cfg = load_config(None, sft_overrides(gemma_setup, tmp_path_factory.mktemp("ref"), **PARITY))
    model = transformers.AutoModelForCausalLM.from_pretrained(gemma_setup["model"], dtype=torch.float32)
    model.config._attn_implementation = "eager"
    return torch_sft_losses(model, model.parameters(), cfg, STEPS)


@pytest.mark.parametrize("mesh", [[], ["trainer.mesh.sequence=4"]], ids=["fsdp8", "sequence4"])
def test_gemma3_loss_curve_matches_a_torch_loop(gemma_setup, torch_reference, tmp_path, mesh):
    run = tmp_path / "run"
    assert main(sft_overrides(gemma_setup, run, **PARITY) + mesh) == 0
    got = losses(run)
    np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)], torch_reference, rtol=1e-3)
