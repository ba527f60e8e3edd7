"""scripts/bench.py --quick: jsft (defaults and tuned) and torch train the same work (equal losses step for
step) on the long-tailed workload, and the report holds the figures BENCHMARKS.md is built from."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_bench_reports_ratio_mfu_and_equal_losses(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--workload", "long_tail", "--no-append",
         "--workdir", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ratio        jsft / torch real tokens/s" in run.stdout and "workload     long_tail" in run.stdout
    report = json.loads(out.read_text())
    result = report["workloads"]["long_tail"]
    sides, torch = result["sides"], result["sides"]["torch"]
    assert sorted(sides) == ["jsft:defaults", "jsft:tuned", "torch"]
    losses = lambda side: [s["loss"] for s in side["steps"]]  # noqa: E731
    for name in ("jsft:defaults", "jsft:tuned"):
        jsft = sides[name]
        assert abs(losses(jsft)[0] - losses(torch)[0]) < 1e-4  # same weights, same first batch
        assert all(abs(a - b) < 1e-2 for a, b in zip(losses(jsft), losses(torch)))
        assert result["ratios"][name]["tokens_per_s"] > 0 and 0 < jsft["mfu"] < 1 and 0 < jsft["padding_efficiency"] <= 1
        assert jsft["measured_steps"] > 0 and jsft["compiled_shapes_ahead"] >= 1
    # defaults: remat chosen by memory (a tiny model fits without any); tuned: remat off by hand
    assert sides["jsft:defaults"]["remat_policy"] == "none" and sides["jsft:defaults"]["remat_choice_s"] > 0
    assert sides["jsft:tuned"]["remat_choice_s"] is None and sides["jsft:tuned"]["micro_batch_size_per_gpu"] == 1
    assert report["cross_entropy_memory"]["chunked_temp_bytes"] < report["cross_entropy_memory"]["full_temp_bytes"]
