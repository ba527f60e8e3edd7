"""scripts/gpu_check.py --cpu-smoke: the prepared GPU check runs end to end on CPU (Pallas kernels
interpreted, tiny shapes), so the command a GPU session runs cannot rot."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_smoke(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # one CPU device, as the check runs on one GPU
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu-smoke", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [p["impl"] for p in result["parity"]] == ["pallas_gpu", "splash"]
    for p in result["parity"]:  # packed bf16 rows against the fp32 reference, forward and backward
        assert p["ok"] and set(p["errors"]) == {"out", "dq", "dk", "dv"} and max(p["errors"].values()) < 3e-2
    steps = {s["impl"]: s for s in result["train_step"]}
    assert set(steps) == {"blockwise", "pallas_gpu"} and not result["skipped"]
    for s in steps.values():
        assert s["tokens_per_s"] > 0 and 0 < s["mfu"] < 1 and s["plan_peak_bytes"] > 0
        assert math.isfinite(s["loss_first"]) and math.isfinite(s["loss_last"])
    # same weights and batch: the attention implementation does not change the first loss
    assert abs(steps["blockwise"]["loss_first"] - steps["pallas_gpu"]["loss_first"]) < 2e-2
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| pallas_gpu | 128 |" in table and "| smoke (0.00B) | pallas_gpu | 2 x 128 |" in table
