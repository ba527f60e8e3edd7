"""Training a tiny Qwen3-MoE (a dense layer among MoE layers) and a tiny gpt-oss (sinks, biases, sliding layers,
clamped experts) end to end against a transformers + torch loop."""

import json

import numpy as np
import pytest
import torch
import transformers

from jsft.config import load_config
from jsft.train.loop import train

from jsft_testing import make_tiny_gpt_oss, make_tiny_hf, sft_overrides, torch_sft_losses

STEPS = 6
PARITY = {
    "data.train_batch_size": 16, "optim.lr": 2e-3, "optim.lr_scheduler_type": "cosine",
    "optim.lr_warmup_steps_ratio": 0.2, "optim.min_lr_ratio": 0.1, "optim.clip_grad": 1.0,
    "optim.weight_decay": 0.01, "trainer.total_training_steps": STEPS,
}


@pytest.fixture(scope="module")
def moe_setup(sft_setup, tmp_path_factory):
    path = tmp_path_factory.mktemp("moe") / "qwen3_moe"
    make_tiny_hf(path, "qwen3_moe", vocab_size=768, mlp_only_layers=[1])
    return {**sft_setup, "model": str(path)}


@pytest.fixture(scope="module")
def gpt_oss_setup(sft_setup, tmp_path_factory):
    path = tmp_path_factory.mktemp("moe") / "gpt_oss"
    # one sliding and one full layer (window 6 on rows of up to 256 tokens)
    make_tiny_gpt_oss(path, vocab_size=768, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    return {**sft_setup, "model": str(path)}


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("mesh", [{"trainer.mesh": "auto"}, {"trainer.mesh.expert": 4}], ids=["auto", "expert4"])
def test_moe_loss_curve_matches_a_torch_loop(request, family, tmp_path, mesh):
    moe_setup = request.getfixturevalue({"qwen3_moe": "moe_setup", "gpt_oss": "gpt_oss_setup"}[family])
    cfg = load_config(None, sft_overrides(moe_setup, tmp_path / "run", **PARITY, **mesh))
    train(cfg)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["mesh"] == ({"data": 1, "fsdp": 8} if mesh == {"trainer.mesh": "auto"} else {"data": 1, "fsdp": 2, "expert": 4})
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    # gpt-oss' sinks run in transformers' eager attention
    attention = {"attn_implementation": "eager"} if family == "gpt_oss" else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(moe_setup["model"], dtype=torch.float32, **attention)
    expected = torch_sft_losses(model, model.parameters(), cfg, STEPS)
    np.testing.assert_allclose([m["train/loss"] for m in metrics], expected, rtol=2e-3)
    assert expected[-1] < expected[0]  # it learns
    for m in metrics:  # tokens per expert: each real token goes to top-2 of 4 experts in each MoE layer
        real_tokens = m["train/global_tokens"]  # non-padding tokens
        assert m["train/expert_load_mean"] == pytest.approx(real_tokens * 2 / 4)
        assert m["train/expert_load_max"] >= m["train/expert_load_mean"]
        assert m["train/expert_load_imbalance"] >= 1.0


def test_an_impossible_expert_axis_is_refused_at_start(moe_setup, tmp_path):
    cfg = load_config(None, sft_overrides(moe_setup, tmp_path / "run", **{"trainer.mesh.expert": 8}))
    with pytest.raises(ValueError, match=r"trainer.mesh.expert=8 does not divide the 4 experts .* in \[1, 2, 4\]"):
        train(cfg)

