"""Two processes x 4 CPU devices (jax.distributed over 127.0.0.1, gloo) reproduce the 1 x 8 loss curve,
with the optimizer state offloaded to pinned host memory in the two-process run."""

import json
import sys

import numpy as np

from jsft.config import load_config
from jsft.train.loop import train

from jsft_testing import sft_overrides
from jsft_processes import run_processes

EXTRA = {"trainer.total_training_steps": 4, "data.train_batch_size": 8, "trainer.save_freq": 2}


def test_two_processes_follow_the_single_process_curve(sft_setup, tmp_path):
    single = tmp_path / "single"
    train(load_config(None, sft_overrides(sft_setup, single, **EXTRA)))

    multi = tmp_path / "multi"
    cmd = [sys.executable, "-m", "jsft.train",
           *sft_overrides(sft_setup, multi, **EXTRA, **{"optim.offload_state": True})]
    outputs = run_processes([cmd, cmd])
    assert "2 process(es)" in outputs[0]

    def curve(run):
        return [json.loads(line)["train/loss"] for line in open(run / "metrics.jsonl")]

    np.testing.assert_allclose(curve(multi), curve(single), rtol=1e-5)
    info = json.loads((multi / "run_info.json").read_text())
    assert info["processes"] == 2 and info["devices"] == 8
    assert info["opt_state_memory"] == "pinned_host between updates"
    assert (multi / "checkpoints" / "4").is_dir()
