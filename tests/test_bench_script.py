"""scripts/bench.py --quick: both sides train the same work (equal losses step for step) and the report
holds the figures BENCHMARKS.md is built from."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_bench_reports_ratio_mfu_and_equal_losses(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--no-append", "--workdir", str(tmp_path),
         "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ratio        jsft / torch real tokens/s" in run.stdout and "MFU          jsft" in run.stdout
    report = json.loads(out.read_text())
    jsft, torch = report["jsft"], report["torch"]
    losses = lambda side: [s["loss"] for s in side["steps"]]  # noqa: E731
    assert abs(losses(jsft)[0] - losses(torch)[0]) < 1e-4  # same weights, same first batch
    assert all(abs(a - b) < 1e-2 for a, b in zip(losses(jsft), losses(torch)))
    assert report["ratio_tokens_per_s"] > 0 and 0 < jsft["mfu"] < 1 and 0 < jsft["padding_efficiency"] <= 1
    assert jsft["measured_steps"] > 0 and jsft["compiled_shapes_ahead"] >= 1
    assert report["cross_entropy_memory"]["chunked_temp_bytes"] < report["cross_entropy_memory"]["full_temp_bytes"]
