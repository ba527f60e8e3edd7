"""HSDP meshes ({data: D, fsdp: F}) change where parameters live, not the arithmetic: the loss and gradients
of a global batch equal plain FSDP's; an explicit mesh that would replicate a large tensor stops the trainer
before any data or weight is touched; `auto` meshes are printed with their reason."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jsft.config import load_config
from jsft.sharding import mesh_sizes_of
from jsft.train.loop import Trainer

from hsdp_worker import mesh_gradients
from jsft_testing import sft_overrides

WORKER = Path(__file__).with_name("hsdp_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def _check(rows, fsdp_sizes):
    for row, fsdp in zip(rows, fsdp_sizes):
        assert row["loss"] == pytest.approx(row["loss_ref"], rel=1e-5), row
        assert row["grad_diff"] < 1e-5, row
        assert row["q_proj_shards"] == fsdp, row  # the parameters really are laid out differently


def test_hsdp_gradients_equal_fsdp_on_8_devices():
    rows = mesh_gradients([{"data": 1, "fsdp": 8}, {"data": 2, "fsdp": 4}])
    _check(rows, [8, 4])
    assert rows[1]["q_proj_shard_shape"][1] == 48 // 4


def test_hsdp_gradients_equal_fsdp_on_24_devices():
    """The issue's 3 hosts x 8: {data: 3, fsdp: 8} against {data: 1, fsdp: 24}, 24 fake devices."""
    meshes = [{"data": 1, "fsdp": 24}, {"data": 3, "fsdp": 8}]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(WORKER), "24", *map(json.dumps, meshes)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["mesh"] for r in rows] == meshes
    _check(rows, [24, 8])


# hidden 1020 and 12 heads: no multiple of 8, so fsdp=8 cannot split the 2M-element q projection
UNSHARDABLE = ("{model_type: qwen2, hidden_size: 1020, intermediate_size: 256, num_hidden_layers: 2, "
               "num_attention_heads: 12, num_key_value_heads: 2, max_position_embeddings: 256}")


def test_an_explicit_mesh_that_would_replicate_stops_the_trainer_at_start(sft_setup, tmp_path):
    overrides = sft_overrides(sft_setup, tmp_path, **{"model.path": "null", "model.init": UNSHARDABLE,
                                                      "trainer.mesh": "{data: 1, fsdp: 8}"})
    with pytest.raises(ValueError) as e:
        Trainer(load_config(None, overrides))
    msg = str(e.value)
    assert "trainer.mesh {data: 1, fsdp: 8} cannot shard layers/" in msg and "1020" in msg
    assert "{data: 2, fsdp: 4}" in msg  # 1020 = 4 x 255: a mesh that works
    assert not (tmp_path / "config.yaml").exists()  # before the run directory, data or weights


def test_auto_mesh_is_chosen_for_the_model_and_printed(sft_setup, tmp_path, capsys):
    overrides = sft_overrides(sft_setup, tmp_path, **{"model.path": "null", "model.init": UNSHARDABLE})
    trainer = Trainer(load_config(None, overrides))
    assert mesh_sizes_of(trainer.mesh) == {"data": 2, "fsdp": 4}  # sequence only when used
    out = capsys.readouterr().out
    assert "mesh {data: 2, fsdp: 4} (trainer.mesh=auto)" in out and "fsdp=8 would leave layers/" in out
    q = trainer.step_fn.param_shardings["layers/q_proj"]
    assert q.shard_shape((2, 1020, 12, 85))[1] == 1020 // 4
