"""Training a tiny Qwen3-MoE (a dense layer among MoE layers) and a tiny gpt-oss (sinks, biases, sliding layers,
clamped experts) end to end against a transformers + torch loop."""

import json
import sys

import numpy as np
import pytest
import torch
import transformers

from jsft.config import load_config
from jsft.train.loop import train

from jsft_processes import run_processes
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


MESHES = {  # trainer.mesh=auto picks expert=4 (the 4 experts, 8 devices of one process); E=2 beside S=2
    "auto": ({"trainer.mesh": "auto"}, {"data": 1, "fsdp": 2, "expert": 4}, "expert=4 (auto)"),
    "expert2_sequence2": ({"trainer.mesh.expert": 2, "trainer.mesh.sequence": 2},
                          {"data": 1, "fsdp": 2, "sequence": 2, "expert": 2}, "expert=2 (trainer.mesh.expert=2)"),
}


# gpt-oss runs on the auto mesh, which is expert=4 for its 4 experts (one run each keeps the CI short)
@pytest.mark.parametrize("family,name", [("qwen3_moe", "auto"), ("qwen3_moe", "expert2_sequence2"),
                                         ("gpt_oss", "auto")])
def test_moe_loss_curve_matches_a_torch_loop(request, family, name, tmp_path):
    moe_setup = request.getfixturevalue({"qwen3_moe": "moe_setup", "gpt_oss": "gpt_oss_setup"}[family])
    overrides, mesh, reason = MESHES[name]
    cfg = load_config(None, sft_overrides(moe_setup, tmp_path / "run", **PARITY, **overrides))
    train(cfg)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["mesh"] == mesh and reason in info["mesh_reason"]
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


def test_two_processes_with_experts_across_them_match_a_torch_loop(moe_setup, tmp_path):
    """`python -m jsft.train` on 2 processes x 4 devices with 8 experts over trainer.mesh.expert=8: each process
    holds 4 experts, so every MoE layer's token all-gather and reduce-scatter cross the processes (an expert
    group of 4 would be one process's devices: jsft/sharding.py's device order)."""
    path = tmp_path / "moe8"
    model = make_tiny_hf(path, "qwen3_moe", vocab_size=768, mlp_only_layers=[1], num_experts=8,
                         num_local_experts=8)
    overrides = sft_overrides({**moe_setup, "model": str(path)}, tmp_path / "run", **PARITY,
                              **{"trainer.mesh.expert": 8})
    cmd = [sys.executable, "-m", "jsft.train", *overrides]
    outputs = run_processes([cmd, cmd], timeout=900)
    assert "2 process(es)" in outputs[0]
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["mesh"] == {"data": 1, "fsdp": 1, "expert": 8} and info["processes"] == 2
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    expected = torch_sft_losses(model, model.parameters(), load_config(None, overrides), STEPS)
    np.testing.assert_allclose([m["train/loss"] for m in metrics], expected, rtol=2e-3)


def test_lora_on_attention_of_a_moe_follows_a_torch_peft_loop(moe_setup, tmp_path):
    """A PEFT adapter on q/k/v/o of the tiny Qwen3-MoE (experts frozen), trained with trainer.mesh=auto
    (expert=4), follows peft on transformers; LoRA on the experts is refused with the reason."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(moe_setup["model"], dtype=torch.float32)
    adapter = tmp_path / "start"
    peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                              init_lora_weights=False)).save_pretrained(adapter)
    cfg = load_config(None, sft_overrides(moe_setup, tmp_path / "run", **{
        **PARITY, "model.lora_adapter_path": str(adapter), "optim.lr": 5e-3}))
    train(cfg)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["mesh"] == {"data": 1, "fsdp": 2, "expert": 4}
    model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(moe_setup["model"], dtype=torch.float32), adapter,
        is_trainable=True)
    expected = torch_sft_losses(model, [p for p in model.parameters() if p.requires_grad], cfg, STEPS)
    got = [json.loads(line)["train/loss"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    np.testing.assert_allclose(got, expected, rtol=2e-3)
    assert expected[-1] < expected[0]  # it learns
    with pytest.raises(ValueError, match="fused 3-D tensors that PEFT adapts only via target_parameters"):
        train(load_config(None, sft_overrides(moe_setup, tmp_path / "experts", **{
            "model.lora_rank": 4, "model.target_modules": "[q_proj,gate_proj]"})))


def test_an_impossible_expert_axis_is_refused_at_start(moe_setup, tmp_path):
    cfg = load_config(None, sft_overrides(moe_setup, tmp_path / "run", **{"trainer.mesh.expert": 8}))
    with pytest.raises(ValueError, match=r"trainer.mesh.expert=8 does not divide the 4 experts .* in \[1, 2, 4\]"):
        train(cfg)

