"""LoRA training end to end: from a PEFT adapter it follows a torch + peft loop; the exports load in peft
and transformers; only the adapters move and hold optimizer state; resume is exact; the export CLI."""

import json
import math
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers

peft = pytest.importorskip("peft")

from jsft.config import load_config  # noqa: E402
from jsft.export import load_checkpoint_model  # noqa: E402
from jsft.models import lora  # noqa: E402
from jsft.models.params import param_arrays  # noqa: E402
from jsft.train import checkpoint as ckpt  # noqa: E402
from jsft.train.loop import train  # noqa: E402

from jsft_testing import losses, sft_overrides, torch_sft_losses  # noqa: E402

STEPS = 6
PARITY = {
    "data.train_batch_size": 16, "optim.lr": 5e-3, "optim.lr_scheduler_type": "cosine",
    "optim.lr_warmup_steps": 1, "optim.min_lr_ratio": 0.1, "optim.clip_grad": 1.0,
    "optim.weight_decay": 0.01, "trainer.total_training_steps": STEPS,
}


def _peft_adapter(base_dir, out):
    """A PEFT adapter with small random A and B, so every adapter gets a gradient from the first step."""
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                      init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.1)
    model.save_pretrained(out)


def _torch_peft_losses(setup, cfg, adapter):
    """The reference: peft on transformers through jsft_testing.torch_sft_losses, AdamW over the adapters."""
    base = transformers.AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter, is_trainable=True)
    return torch_sft_losses(model, [p for p in model.parameters() if p.requires_grad], cfg, STEPS)


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def test_lora_from_a_peft_adapter_follows_a_torch_peft_loop(sft_setup, tmp_path):
    _peft_adapter(sft_setup["model"], tmp_path / "start")
    run = tmp_path / "run"
    cfg = load_config(None, sft_overrides(sft_setup, run, **PARITY, **{
        "model.lora_adapter_path": str(tmp_path / "start"), "trainer.export_hf": True}))
    train(cfg)
    expected = _torch_peft_losses(sft_setup, cfg, tmp_path / "start")
    got = losses(run)
    np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)], expected, rtol=1e-3)
    assert expected[-1] < expected[0] - 0.1  # it learns

    # only the adapters are trained and hold optimizer state (Adam's two moments)
    info = json.loads((run / "run_info.json").read_text())
    trained, frozen = info["trainable_param_bytes_total"], info["frozen_param_bytes_total"]
    assert info["trainable_params"] == 8 * 2 * (  # r * (in + out), per layer: q k v o gate up down
        (64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 2 + (128 + 64))
    assert trained + frozen == info["param_bytes_total"] and trained < frozen / 5
    assert 2 * trained <= info["opt_state_bytes_total"] < 2 * trained + 1024

    # the checkpoint, the PEFT adapter in peft and the merged export in transformers give the same logits
    model, meta = load_checkpoint_model(run)
    assert meta["lora"]["rank"] == 8 and model.lora is not None
    ids = np.random.RandomState(0).randint(0, 768, (2, 30))
    ours = np.asarray(model(jnp.asarray(ids)))
    base = transformers.AutoModelForCausalLM.from_pretrained(sft_setup["model"], dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, run / "adapter")
    np.testing.assert_allclose(_logits(peft_model, ids), ours, atol=1e-4, rtol=0)
    merged = transformers.AutoModelForCausalLM.from_pretrained(run / "hf", dtype=torch.float32)
    np.testing.assert_allclose(_logits(merged, ids), ours, atol=1e-4, rtol=0)
    unloaded = peft_model.merge_and_unload().state_dict()
    for name, value in merged.state_dict().items():
        np.testing.assert_allclose(unloaded[name].numpy(), value.numpy(), atol=1e-6, rtol=1e-6, err_msg=name)


def test_fresh_lora_with_a_bf16_base_resumes_exactly_and_exports_from_the_checkpoint(sft_setup, tmp_path):
    job = {"model.lora_rank": 16, "model.lora_alpha": 32, "model.target_modules": "all-linear",
           "model.frozen_param_dtype": "bfloat16", "trainer.total_training_steps": 4, "trainer.save_freq": 2}
    reference = tmp_path / "reference"
    train(load_config(None, sft_overrides(sft_setup, reference, **job)))
    forked = tmp_path / "forked"
    train(load_config(None, sft_overrides(sft_setup, forked, **job, **{
        "trainer.resume_mode": "resume_path", "trainer.resume_from_path": str(reference / "checkpoints" / "2")})))
    assert losses(forked) == {s: v for s, v in losses(reference).items() if s > 2}  # bit-exact

    model, meta = load_checkpoint_model(reference)
    params = param_arrays(model)
    assert params["layers/q_proj"].dtype == jnp.bfloat16 and params["lora_a/q_proj"].dtype == jnp.float32
    # the checkpoint holds the adapters (and their optimizer state), not the frozen base
    manager, step = ckpt.locate(reference)
    saved = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]
    assert sorted(saved) == lora.trainable_names(model) and meta["frozen_base_saved"] is False
    assert np.abs(np.asarray(params["lora_b/q_proj"])).max() > 0  # the adapters trained

    def export(*args):
        return subprocess.run([sys.executable, "-m", "jsft.export", "--checkpoint", str(reference), *args],
                              capture_output=True, text=True, timeout=600)

    proc = export("--out", str(tmp_path / "hf"), "--adapter-out", str(tmp_path / "a1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = np.random.RandomState(1).randint(0, 768, (2, 25))
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    np.testing.assert_allclose(_logits(merged, ids), np.asarray(model(jnp.asarray(ids))), atol=1e-4, rtol=0)
    proc = export("--adapter-out", str(tmp_path / "a2"), "--adapter-only")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "a2").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    same = [(tmp_path / d / "adapter_model.safetensors").read_bytes() for d in ("a1", "a2")]
    assert same[0] == same[1]
    back = lora.read_adapter_config(tmp_path / "a2")
    assert (back.rank, back.alpha, back.targets) == (16, 32.0, lora.TARGET_MODULES)
    proc = export("--adapter-only")
    assert proc.returncode == 2 and "--adapter-only needs --adapter-out" in proc.stderr


def test_lora_config_errors_name_the_key(sft_setup, tmp_path):
    def cfg(**extra):
        return load_config(None, sft_overrides(sft_setup, tmp_path / "run", **extra))

    with pytest.raises(ValueError, match="model.target_modules: unknown module.*'qkv'"):
        cfg(**{"model.lora_rank": 8, "model.target_modules": "[q_proj,qkv]"})
    with pytest.raises(ValueError, match="model.lora_rank=-1 must be >= 0"):
        cfg(**{"model.lora_rank": -1})
    with pytest.raises(ValueError, match="frozen_param_dtype applies to LoRA only"):
        cfg(**{"model.frozen_param_dtype": "bfloat16"})
    # the starting adapter's files are read by the run's set-up (spec_from_run_config), before any weight
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        lora.spec_from_run_config(cfg(**{"model.lora_adapter_path": str(tmp_path)}).model)
    _peft_adapter(sft_setup["model"], tmp_path / "r8")
    with pytest.raises(ValueError, match="model.lora_rank=4 but the adapter .* has r=8"):
        lora.spec_from_run_config(cfg(**{"model.lora_adapter_path": str(tmp_path / "r8"), "model.lora_rank": 4}).model)


def test_plan_shows_adapter_sized_gradients_and_optimizer_state(tmp_path):
    """jsft.plan with LoRA on a bf16 frozen base, from config.json alone, on the 8 fake devices."""
    from jsft import plan
    from jsft.models.config import ModelConfig

    transformers.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path)
    cfg = load_config(None, [f"model.path={tmp_path}", "model.dtype=float32", "data.max_length=256",
                             "data.micro_batch_size_per_gpu=1", "model.lora_rank=8",
                             "model.target_modules=[q_proj,v_proj,down_proj]", "model.frozen_param_dtype=bfloat16"])
    result, about = plan.make_plan(cfg)
    model_cfg = ModelConfig.from_pretrained(str(tmp_path))
    spec = lora.spec_from_run_config(cfg.model)
    n = sum(math.prod(k.hf_shape) for k in lora.adapter_keys(model_cfg, spec)) * model_cfg.num_layers
    assert result.trainable_count == n == 4 * 8 * ((64 + 64) + (64 + 32) + (128 + 64))
    assert n * 4 / 8 <= result.grad_accumulator <= n * 4  # fp32 adapters, sharded where the table can
    assert 2 * result.grad_accumulator <= result.opt_state < 2 * result.grad_accumulator + 1024  # Adam's moments
    base_bf16 = model_cfg.num_params() * 2
    assert base_bf16 / 8 <= result.frozen_params < base_bf16 / 4 and result.params > result.frozen_params
    assert about["lora"].startswith("r=8 alpha=16 on q_proj,v_proj,down_proj")
    assert "of which frozen (LoRA base)" in plan.report(result, about, None)


def test_two_processes_train_and_export_lora_like_one(sft_setup, tmp_path):
    """2 processes x 4 CPU devices (jax.distributed, gloo): fresh adapters, the loss curve and the exported
    adapter equal the single-process run's."""
    from safetensors.numpy import load_file

    from jsft_processes import run_processes

    job = {"model.lora_rank": 8, "model.lora_alpha": 16, "model.target_modules": "[q_proj,v_proj,up_proj]",
           "trainer.total_training_steps": 3, "data.train_batch_size": 8, "trainer.export_hf": True}
    single = tmp_path / "single"
    train(load_config(None, sft_overrides(sft_setup, single, **job)))
    multi = tmp_path / "multi"
    cmd = [sys.executable, "-m", "jsft.train", *sft_overrides(sft_setup, multi, **job)]
    outputs = run_processes([cmd, cmd])
    assert "2 process(es)" in outputs[0]
    np.testing.assert_allclose([losses(multi)[s] for s in (1, 2, 3)], [losses(single)[s] for s in (1, 2, 3)], rtol=1e-5)
    ours, theirs = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (single, multi))
    assert sorted(ours) == sorted(theirs) and len(ours) == 2 * 3 * 2  # A and B, 3 modules, 2 layers
    for name in ours:
        np.testing.assert_allclose(theirs[name], ours[name], rtol=1e-4, atol=1e-6, err_msg=name)
