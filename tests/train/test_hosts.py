"""Hosts that agree, two local processes each (jax.distributed over 127.0.0.1, gloo, 4 CPU devices each):

- started with the variables SLURM's srun sets (no JAX_* variables), tokenizing half of the rows each, they
  build the same sample table and bad-row report as one process and follow its loss curve;
- one host with a different data file: both stop before step 1 with a message naming the files;
- `python -m jsft.export` from two processes writes the same bytes as from one.
"""

import json
import shutil
import sys

import numpy as np

from jsft.config import load_config
from jsft.train.loop import train

from jsft_testing import losses, sft_overrides, short_conversations
from jsft_processes import free_port, run_processes

STEPS = {"trainer.total_training_steps": 3, "data.train_batch_size": 8, "trainer.save_freq": 0}


def _slurm_env(port: int) -> list[dict]:
    """What srun sets for 2 tasks on one node; the coordinator comes from the node list."""
    return [{"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": "2",
             "SLURM_STEP_NUM_NODES": "1", "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i),
             "JAX_COORDINATOR_PORT": str(port)} for i in range(2)]


def _rows_with_bad_lines(path, n=48):
    lines = [json.dumps(r) for r in short_conversations(n, seed=3)]
    lines[5] = "{not json"
    lines[20] = json.dumps({"messages": [{"role": "user", "content": "no answer"}]})
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _cache_contents(cache_root):
    (directory,) = [d for d in cache_root.iterdir() if d.is_dir()]  # no parts or temporaries left behind
    samples = dict(np.load(directory / "samples.npz"))
    bins = {f: (directory / f).read_bytes() for f in ("input_ids.bin", "loss_mask.bin")}
    return directory.name, json.loads((directory / "meta.json").read_text()), samples, bins


def test_slurm_launch_with_split_tokenization_matches_one_process(sft_setup, tmp_path):
    data = _rows_with_bad_lines(tmp_path / "train.jsonl")
    extra = {**STEPS, "data.train_files": data, "data.on_bad_row": "skip"}
    single = tmp_path / "single"
    train(load_config(None, sft_overrides(sft_setup, single, **extra, **{"data.cache_dir": str(tmp_path / "cache1")})))

    multi = tmp_path / "multi"
    cmd = [sys.executable, "-m", "jsft.train",
           *sft_overrides(sft_setup, multi, **extra, **{"data.cache_dir": str(tmp_path / "cache2")})]
    out0, out1 = run_processes([cmd, cmd], _slurm_env(free_port()))
    assert "jax.distributed from slurm: 2 processes, coordinator 127.0.0.1:" in out0
    assert "process 1 of 2 tokenizes 24 of 48 rows" in out1 and "cannot see" not in out0 + out1

    name_a, meta_a, samples_a, bins_a = _cache_contents(tmp_path / "cache1")
    name_b, meta_b, samples_b, bins_b = _cache_contents(tmp_path / "cache2")
    assert name_a == name_b and meta_b == meta_a and len(meta_a["bad_rows"]) == 2
    for k in samples_a:
        np.testing.assert_array_equal(samples_b[k], samples_a[k], err_msg=k)
    assert bins_b == bins_a
    assert [line for line in out0.splitlines() if "skipped" in line]  # the same bad-row report is printed
    curve_a, curve_b = losses(single), losses(multi)
    assert sorted(curve_b) == [1, 2, 3]
    np.testing.assert_allclose([curve_b[s] for s in sorted(curve_b)], [curve_a[s] for s in sorted(curve_a)], rtol=1e-5)


def test_a_different_data_file_on_one_host_stops_both(sft_setup, tmp_path):
    other = tmp_path / "other" / "train.jsonl"
    other.parent.mkdir()
    shutil.copy(sft_setup["train"], other)
    with open(other, "a") as f:
        f.write(json.dumps(short_conversations(1, seed=9)[0]) + "\n")
    run = tmp_path / "run"
    commands = [[sys.executable, "-m", "jsft.train", *sft_overrides(sft_setup, run, **STEPS, **{"data.train_files": f})]
                for f in (sft_setup["train"], str(other))]
    outputs = run_processes(commands, timeout=300, expect_success=False)  # a hang fails here
    for out in outputs:
        assert "the processes would train on different data" in out, out[-3000:]
        assert f"train files: process 0: {sft_setup['train']}" in out and f"process 1: {other}" in out
    assert not (run / "metrics.jsonl").exists()


def test_export_from_two_processes_is_bit_identical(tiny_hf, tmp_path):
    import jsft.models as jm
    from jsft.export import main
    from jsft.sharding import make_mesh

    from jsft.models.params import param_arrays
    from jsft.train import checkpoint as ckpt

    path, _ = tiny_hf("qwen2")
    model = jm.from_pretrained(path, dtype="float32", mesh=make_mesh({"fsdp": -1}))
    manager = ckpt.open_manager(tmp_path / "ckpt")
    meta = {"step": 1, "model_config": ckpt.model_config_to_json(model.config), "param_dtype": "float32", "tokenizer": None}
    ckpt.save(manager, 1, params=param_arrays(model), meta=meta)
    manager.wait_until_finished()
    manager.close()
    args = ["--checkpoint", str(tmp_path / "ckpt"), "--max-shard-size", "100KB", "--dtype", "bfloat16"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    cmd = [sys.executable, "-m", "jsft.export", *args, "--out", str(tmp_path / "two")]
    run_processes([cmd, cmd], timeout=300)
    one = {p.name: p.read_bytes() for p in (tmp_path / "one").iterdir()}
    two = {p.name: p.read_bytes() for p in (tmp_path / "two").iterdir()}
    assert len([n for n in one if n.endswith(".safetensors")]) > 2
    assert two == one
