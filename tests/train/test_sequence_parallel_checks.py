"""What else must hold under a sequence axis (S > 1) on 8 fake CPU devices: the HF export of an S=4 run is
the export of the same parameters at S=1; LoRA's loss and adapter gradients do not depend on S; validation
by generation writes the same samples at S=4 as at S=1."""

import json

import jax
import numpy as np
from safetensors.numpy import load_file

import jsft.models as jm
from jsft.config import OptimConfig, load_config
from jsft.data.tokenizer import load_tokenizer
from jsft.eval.generation import GenerationValidation
from jsft.models import lora
from jsft.models.params import init_model, param_arrays, replace_params
from jsft.sharding import make_mesh
from jsft.train.optim import make_optimizer
from jsft.train.step import TrainStep

from jsft_testing import sft_overrides
from test_sequence_parallel import _assert_same, _config, _micro_batch, _rows


def test_hf_export_of_an_s4_run_equals_the_s1_export_of_its_checkpoint(sft_setup, tmp_path):
    """The trainer exports at the end on its S=4 mesh; `python -m jsft.export` restores the same step's
    checkpoint onto a mesh without a sequence axis and exports again: byte-identical safetensors."""
    from jsft.export import main as export_main
    from jsft.train.__main__ import main

    run = tmp_path / "s4"
    assert main(sft_overrides(sft_setup, run, **{"trainer.total_training_steps": 2, "trainer.export_hf": True})
                + ["trainer.mesh.sequence=4"]) == 0
    assert export_main(["--checkpoint", str(run), "--out", str(tmp_path / "s1")]) == 0
    files = sorted(p.name for p in (run / "hf").glob("*.safetensors"))
    assert files and files == sorted(p.name for p in (tmp_path / "s1").glob("*.safetensors"))
    for name in files:
        four, one = load_file(run / "hf" / name), load_file(tmp_path / "s1" / name)
        assert sorted(four) == sorted(one)
        for key in four:
            np.testing.assert_array_equal(four[key], one[key], err_msg=key)
        assert (run / "hf" / name).read_bytes() == (tmp_path / "s1" / name).read_bytes()


def _lora_loss_and_grads(s: int):
    """LoRA rank 4 on every projection, adapters random (B too, so every adapter gradient is non-zero)."""
    mesh = make_mesh({"sequence": s}, devices=jax.devices()[:8])
    model = init_model(_config(), seed=0, mesh=mesh)
    model = lora.attach(model, lora.LoraSpec(rank=4, alpha=8, targets=lora.TARGET_MODULES), mesh=mesh, seed=1)
    rng, params = np.random.default_rng(2), param_arrays(model)
    for n in lora.trainable_names(model):
        params[n] = jax.device_put(rng.normal(0, 0.05, params[n].shape).astype(np.float32), params[n].sharding)
    model = replace_params(model, params)
    step = TrainStep(model, make_optimizer(OptimConfig(), 10), mesh, chunk_size=32)
    loss, grads = step.gradients(params, [step.device_batch(_micro_batch(_rows(np.random.default_rng(0)), s))])
    assert sorted(grads) == lora.trainable_names(model)
    return float(loss), {k: np.asarray(v, np.float32) for k, v in grads.items()}


def test_lora_loss_and_adapter_gradients_do_not_depend_on_s():
    ref = _lora_loss_and_grads(1)
    assert all(np.abs(g).max() > 0 for g in ref[1].values())
    _assert_same(ref, _lora_loss_and_grads(4), 1e-5)


def test_validation_by_generation_writes_the_same_samples_at_s4(sft_setup, tmp_path):
    cfg = load_config(None, sft_overrides(sft_setup, tmp_path, **{
        "data.val_files": sft_setup["val"], "trainer.val_generations": 4, "trainer.val_max_new_tokens": 6}))
    tokenizer = load_tokenizer(sft_setup["tokenizer"])
    samples = {}
    for s in (1, 4):
        mesh = make_mesh({"sequence": s}, devices=jax.devices()[:8])
        model = jm.from_pretrained(sft_setup["model"], dtype="float32", mesh=mesh)
        validation = GenerationValidation(cfg, tokenizer, model, mesh, tmp_path / f"s{s}", log=lambda _: None)
        validation(param_arrays(model), 1)
        samples[s] = [json.loads(line) for line in open(tmp_path / f"s{s}" / "samples" / "step_1.jsonl")]
    assert len(samples[1]) == 4 and any(r["generation"] for r in samples[1])
    assert samples[4] == samples[1]
