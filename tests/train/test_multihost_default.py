"""The plain default job (`python -m jsft.train`, the demo, shrunk as .ci/run) on 2 processes x 4 CPU devices,
and a failure on one process: the other stops promptly instead of waiting for jax.distributed's deadlines."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHRUNK = ["trainer.total_training_steps=2", "trainer.test_freq=2", "demo.num_train=32", "demo.num_val=2",
          "demo.max_new_tokens=8", "trainer.val_max_new_tokens=8"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args_of_process, timeout=900):
    """Start `python -m jsft.train` on 2 processes x 4 devices; -> [(returncode, output, seconds to exit)]."""
    port, procs = _free_port(), []
    for pid, args in enumerate(args_of_process):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        procs.append(subprocess.Popen([sys.executable, "-m", "jsft.train", *args], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    t0, out = time.monotonic(), []
    for p in procs:
        text = p.communicate(timeout=timeout)[0]
        out.append((p.returncode, text, time.monotonic() - t0))
    return out


def test_the_default_job_runs_on_two_processes(tmp_path):
    """With remat chosen by memory too (model.remat_policy=auto): each process reads its own devices' memory
    (process 1 once read jax.devices()[0], process 0's device, and died at start)."""
    run = tmp_path / "run"
    args = [f"trainer.default_local_dir={run}", *SHRUNK, "model.enable_gradient_checkpointing=null"]
    (rc0, out0, _), (rc1, out1, _) = _start([args, args])
    assert rc0 == 0, out0[-4000:]
    assert rc1 == 0, out1[-4000:]
    assert "jax.distributed from jax_env: 2 processes" in out0
    assert "remat auto -> " in out0 and "step 2/2" in out0
    assert (run / "hf" / "config.json").is_file() and (run / "checkpoints" / "2").is_dir()
    assert (run / "samples" / "step_2.jsonl").stat().st_size > 0


def test_a_failing_process_stops_the_other_promptly_with_its_error(tmp_path):
    """Process 1 alone asks for cuDNN attention (no GPU here): it fails at its model set-up and says so; process
    0, which set up fine, waits for it in the next collective and must stop within a minute of it, not at
    jax.distributed's barrier deadline (5 minutes)."""
    args = [f"trainer.default_local_dir={tmp_path / 'run'}", *SHRUNK]
    (rc0, out0, t0), (rc1, out1, t1) = _start([args, args + ["model.attention_impl=cudnn"]], timeout=600)
    assert rc1 == 2, out1[-4000:]
    assert "error: attention_impl=cudnn needs a GPU backend (process 1 of 2)" in out1
    assert rc0 != 0, out0[-4000:]
    assert t0 < 60 or abs(t0 - t1) < 60, (t0, t1, out0[-2000:])
