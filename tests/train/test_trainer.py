"""The trainer end to end: loss curve against a plain transformers+torch loop, non-finite steps, config errors."""

import json

import numpy as np
import pytest
import torch
import transformers

from jsft.config import OptimConfig, load_config
from jsft.data.pipeline import build_train_batches
from jsft.data.tokenizer import load_tokenizer
from jsft.train.__main__ import main
from jsft.train.loop import train
from jsft.train.optim import make_schedule

from conftest import sft_overrides

STEPS = 12
PARITY = {
    "data.train_batch_size": 24, "optim.lr": 2e-3, "optim.lr_scheduler_type": "cosine",
    "optim.lr_warmup_steps_ratio": 0.2, "optim.min_lr_ratio": 0.1, "optim.clip_grad": 1.0,
    "optim.weight_decay": 0.01, "trainer.total_training_steps": STEPS,
}


def read_metrics(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def torch_losses(setup, cfg):
    """veRL-style reference: per-step token-mean CE over the global batch's samples, AdamW, clipping,
    the same lr schedule; each sample run on its own (padded batch with an attention mask)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay)
    schedule = make_schedule(cfg.optim, STEPS)
    batches = build_train_batches(cfg.data, load_tokenizer(cfg.data.tokenizer), seed=cfg.data.seed,
                                  process_index=0, process_count=1, local_devices=8)
    losses = []
    for step in range(STEPS):
        samples = [
            (mb["input_ids"][r][mb["segment_ids"][r] == s], mb["loss_mask"][r][mb["segment_ids"][r] == s])
            for mb in next(batches).micro_batches for r in range(len(mb["input_ids"]))
            for s in np.unique(mb["segment_ids"][r]) if s > 0
        ]
        width = max(len(ids) for ids, _ in samples)
        ids = torch.zeros(len(samples), width, dtype=torch.long)
        attn = torch.zeros(len(samples), width, dtype=torch.long)
        mask = torch.zeros(len(samples), width)
        for i, (x, m) in enumerate(samples):
            ids[i, : len(x)], attn[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1, torch.tensor(m, dtype=torch.float32)
        logits = model(input_ids=ids, attention_mask=attn).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        loss = (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()  # shift: logits at t predict token t+1
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        for group in opt.param_groups:
            group["lr"] = float(schedule(step))
        opt.step()
        losses.append(loss.item())
    return losses


def test_loss_curve_matches_a_torch_loop(sft_setup, tmp_path):
    overrides = sft_overrides(sft_setup, tmp_path / "run", **PARITY)
    cfg = load_config(None, overrides)
    train(cfg)
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert max(m["train/micro_batches"] for m in metrics) >= 2  # gradient accumulation happened
    assert metrics[0]["train/lr"] == 0.0 and metrics[2]["train/lr"] == pytest.approx(2e-3)  # warmup of 2 steps
    expected = torch_losses(sft_setup, cfg)
    np.testing.assert_allclose([m["train/loss"] for m in metrics], expected, rtol=1e-3)
    assert expected[-1] < expected[0] * 0.8  # it learns
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
    assert not np.isfinite(metrics[-1]["train/loss"])


def test_config_errors_name_the_key(capsys):
    assert main(["data.max_lenght=10"]) == 2
    assert "did you mean data.max_length" in capsys.readouterr().err
    assert main(["optim.lr_scheduler_type=linear"]) == 2
    assert "allowed: constant, cosine, wsd" in capsys.readouterr().err
    with pytest.raises(ValueError, match="model.path is not set"):
        train(load_config(None, ["data.train_files=x.jsonl"]))
    with pytest.raises(FileNotFoundError, match="model.path=/nonexistent: no such directory"):
        train(load_config(None, ["data.train_files=x.jsonl", "model.path=/nonexistent"]))
