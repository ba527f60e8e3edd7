"""The trainer end to end: loss curve against a plain transformers+torch loop, non-finite steps, config errors."""

import json

import numpy as np
import pytest
import torch
import transformers

from jsft.config import load_config
from jsft.train.__main__ import main
from jsft.train.loop import train

from jsft_testing import masked_token_mean_nll, sft_overrides, tokenized_samples, torch_sft_losses, verl_lr_lambda

STEPS = 12
PARITY = {
    "data.train_batch_size": 24, "optim.lr": 2e-3, "optim.lr_scheduler_type": "cosine",
    "optim.lr_warmup_steps_ratio": 0.2, "optim.min_lr_ratio": 0.1, "optim.clip_grad": 1.0,
    "optim.weight_decay": 0.01, "trainer.total_training_steps": STEPS,
}


def read_metrics(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def torch_val_loss(model, setup, cfg):
    """Token-mean CE over every validation sample, one sample at a time."""
    with torch.no_grad():
        total = count = 0.0
        for ids, mask in tokenized_samples(cfg.data, cfg.data.val_files):
            targets = float(mask[1:].sum())
            total += float(masked_token_mean_nll(model, [(ids, mask)])) * targets
            count += targets
    return total / count


def torch_losses(setup, cfg):
    """veRL-style reference (jsft_testing.torch_sft_losses) on the full model; returns (losses, model)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32)
    return torch_sft_losses(model, model.parameters(), cfg, STEPS), model


def test_loss_curve_matches_a_torch_loop(sft_setup, tmp_path):
    extra = {"data.val_files": sft_setup["val"], "trainer.test_freq": 6, "trainer.export_hf": True}
    overrides = sft_overrides(sft_setup, tmp_path / "run", **PARITY, **extra)
    cfg = load_config(None, overrides)
    train(cfg)
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert max(m["train/micro_batches"] for m in metrics) >= 2  # gradient accumulation happened
    shapes = [m["train/compiled_shapes"] for m in metrics]  # bucketed shapes: a few, compiled once each
    assert shapes == sorted(shapes) and 1 <= shapes[-1] <= cfg.trainer.shape_buckets ** 2
    assert metrics[0]["train/lr"] == 0.0 and metrics[2]["train/lr"] == pytest.approx(2e-3)  # warmup of 2 steps
    factor = verl_lr_lambda(cfg.optim, STEPS)  # the reference's schedule, step by step
    assert [m["train/lr"] for m in metrics] == pytest.approx([2e-3 * factor(s) for s in range(STEPS)], rel=1e-5)
    expected, torch_model = torch_losses(sft_setup, cfg)
    np.testing.assert_allclose([m["train/loss"] for m in metrics], expected, rtol=1e-3)
    assert expected[-1] < expected[0] * 0.8  # it learns
    assert [m["step"] for m in metrics if "val/loss" in m] == [6, 12]
    assert metrics[-1]["val/loss"] == pytest.approx(torch_val_loss(torch_model, sft_setup, cfg), rel=1e-3)
    # the HF export at the end is the trained model: transformers gives the same validation loss
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf")
    assert torch_val_loss(exported, sft_setup, cfg) == pytest.approx(metrics[-1]["val/loss"], rel=1e-4)
    assert (tmp_path / "run" / "hf" / "tokenizer_config.json").exists()
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["mesh"] == {"data": 1, "fsdp": 8}
    assert info["param_bytes_per_device"] < info["param_bytes_total"] / 8 * 1.5
    assert info["opt_state_bytes_per_device"] < info["opt_state_bytes_total"] / 8 * 1.5


def test_non_finite_steps_are_skipped_then_abort(sft_setup, tmp_path):
    # an absurd lr blows the weights up after one update; every later step is non-finite and skipped
    overrides = sft_overrides(sft_setup, tmp_path / "run", **{
        "optim.lr": 1e30, "optim.clip_grad": 0, "optim.max_consecutive_skips": 3,
        "trainer.total_training_steps": 10, "data.train_batch_size": 8,
    })
    with pytest.raises(RuntimeError, match="3 consecutive optimizer steps"):
        train(load_config(None, overrides))
    metrics = read_metrics(tmp_path / "run")
    skipped = [m["train/skipped_steps"] for m in metrics]
    assert skipped[0] == 0 and skipped[-3:] == [1, 2, 3]  # the first update applies, the rest are skipped
    assert metrics[-1]["train/loss"] is None and "train/loss" in metrics[-1]["non_finite"]  # strict JSON


def test_config_errors_name_the_key(capsys):
    assert main(["data.max_lenght=10"]) == 2
    assert "did you mean data.max_length" in capsys.readouterr().err
    assert main(["optim.lr_scheduler_type=linear"]) == 2
    assert "allowed: constant, cosine, wsd" in capsys.readouterr().err
    with pytest.raises(ValueError, match="set model.path"):
        train(load_config(None, ["data.train_files=x.jsonl"]))
    with pytest.raises(FileNotFoundError, match="model.path=/nonexistent: no such directory"):
        train(load_config(None, ["data.train_files=x.jsonl", "model.path=/nonexistent"]))
