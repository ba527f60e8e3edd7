"""The plain default job (`python -m jsft.train`, the demo, shrunk as .ci/run) on 2 processes x 4 CPU devices,
and a failure on one process: the other stops promptly instead of waiting for jax.distributed's deadlines."""

import sys
import time

from jsft_processes import jax_env, run_processes, start_processes, wait_all

SHRUNK = ["trainer.total_training_steps=2", "trainer.test_freq=2", "demo.num_train=32", "demo.num_val=2",
          "demo.max_new_tokens=8", "trainer.val_max_new_tokens=8"]
TRAIN = [sys.executable, "-m", "jsft.train"]


def test_the_default_job_runs_on_two_processes(tmp_path):
    """With remat chosen by memory too (model.remat_policy=auto): each process reads its own devices' memory
    (process 1 once read jax.devices()[0], process 0's device, and died at start)."""
    run = tmp_path / "run"
    args = [f"trainer.default_local_dir={run}", *SHRUNK, "model.enable_gradient_checkpointing=null"]
    out0, _ = run_processes([TRAIN + args] * 2, timeout=900)
    assert "jax.distributed from jax_env: 2 processes" in out0
    assert "remat auto -> " in out0 and "step 2/2" in out0
    assert (run / "hf" / "config.json").is_file() and (run / "checkpoints" / "2").is_dir()
    assert (run / "samples" / "step_2.jsonl").stat().st_size > 0


def test_a_failing_process_stops_the_other_promptly_with_its_error(tmp_path):
    """Process 1 alone asks for cuDNN attention (no GPU here): it fails at its model set-up and says so; process
    0, which set up fine, waits for it in the next collective and must stop within a minute of it, not at
    jax.distributed's barrier deadline (5 minutes)."""
    args = [f"trainer.default_local_dir={tmp_path / 'run'}", *SHRUNK]
    procs = start_processes([TRAIN + args, TRAIN + args + ["model.attention_impl=cudnn"]], jax_env(2))
    t = time.monotonic()
    while procs[1].poll() is None and time.monotonic() - t < 600:
        time.sleep(0.2)
    failed_at = time.monotonic()
    # process 1 has failed (or 600 s passed): process 0 must follow within a minute, on its own
    (rc0, out0), (rc1, out1) = wait_all(procs, timeout=60, stop_on_failure=False)
    assert rc1 == 2, out1[-4000:]
    assert "error: attention_impl=cudnn needs a GPU backend (process 1 of 2)" in out1
    assert rc0 is not None, f"process 0 still ran {time.monotonic() - failed_at:.0f} s after process 1 failed"
    assert rc0 != 0, out0[-4000:]
