"""`python -m jsft.export` turns a params checkpoint back into the original HF checkpoint."""

import subprocess
import sys

import torch
import transformers

import jsft.models as jm
from jsft.models.params import flat_params
from jsft.sharding import make_mesh
from jsft.train import checkpoint as ckpt


def _save_params_checkpoint(model, directory, step, tokenizer=None):
    manager = ckpt.open_manager(directory)
    params = {name: var[...] for name, var in flat_params(model).items()}
    meta = {"step": step, "model_config": ckpt.model_config_to_json(model.config), "param_dtype": "float32",
            "tokenizer": tokenizer}
    ckpt.save(manager, step, params=params, meta=meta)
    manager.wait_until_finished()
    manager.close()


def test_export_cli_reproduces_the_hf_checkpoint(tiny_hf, tmp_path):
    path, ref = tiny_hf("qwen2")
    model = jm.from_pretrained(path, dtype="float32", mesh=make_mesh({"fsdp": -1}))
    run = tmp_path / "run"
    _save_params_checkpoint(model, run / ckpt.CHECKPOINT_SUBDIR, 3)
    _save_params_checkpoint(model, run / ckpt.CHECKPOINT_SUBDIR, 7)
    out = tmp_path / "hf"
    proc = subprocess.run(
        [sys.executable, "-m", "jsft.export", "--checkpoint", str(run), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exported step 7" in proc.stdout
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    for name, value in ref.state_dict().items():
        assert torch.equal(value, back.state_dict()[name]), name


def test_export_of_a_given_step_dir_in_process(tiny_hf, tmp_path):
    from jsft.export import main

    path, ref = tiny_hf("llama3")
    model = jm.from_pretrained(path, dtype="float32")
    _save_params_checkpoint(model, tmp_path / "ckpts", 5)
    assert main(["--checkpoint", str(tmp_path / "ckpts" / "5"), "--out", str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    for name, value in ref.state_dict().items():
        assert torch.equal(value.to(torch.bfloat16), back.state_dict()[name]), name
