"""Side-by-side SFT benchmark: jsft against a transformers + torch loop with dynamic padding.

    python scripts/bench.py [--quick] [--workload chat|long_tail|all] [--settings defaults,tuned] [--steps N]
                            [--workdir D] [--json F] [--label L] [--no-append] [--other-tree LABEL=DIR]

Per workload (bench_workload.py: a random-init Qwen2-shape checkpoint, multi-turn tool chats of one length
distribution, one set of hyperparameters) it trains the same steps through jsft under each settings name
(`defaults`: what `python -m jsft.train` gives, remat chosen by memory; `tuned`: the fastest by hand) and
through torch, each side in its own process, their optimizer steps interleaved (bench_sides.py).

Reported per side (bench_report.py): real (non-pad) tokens/s and each jsft side's ratio to torch (also over
"quiet" steps only), MFU against a fp32 matmul peak probed around each step, padding efficiency (real /
computed tokens), the remat policy and what choosing it cost, compile time, XLA's compiled memory analysis of
the micro-step, peak RSS; and the cross-entropy's temporaries at a 152k vocabulary against full fp32 logits.
Medians over the steps after warm-up. Writes JSON and appends rows to BENCHMARKS.md (not with --quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
from pathlib import Path

import bench_report
from bench_sides import run_interleaved
from bench_workload import QUICK, SETTINGS, WORKLOADS, prepare


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", 
                   help="tiny model and data, the sides set up at once: a smoke test (< 1 min a workload)")
    p.add_argument("--workload", default="all", choices=[*WORKLOADS, "all"], help="length distribution(s) to run")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"jsft settings, comma-separated: {', '.join(SETTINGS)}")
    p.add_argument("--steps", type=int, help="measured steps (after warm-up)")
    p.add_argument("--workdir", help="where to build the workloads (default: a new temporary directory)")
    p.add_argument("--json", help="where to write the JSON (default: bench.json in the workdir)")
    p.add_argument("--no-append", action="store_true", help="do not append rows to BENCHMARKS.md")
    p.add_argument("--label", default="", help="the rows' `code` column (default: the git commit)")
    p.add_argument("--other-tree", action="append", default=[], metavar="LABEL=DIR",
                   help="also run jsft from another checkout (e.g. an older commit's worktree), interleaved with "
                        "this one's: sides jsft@LABEL:<settings>")
    args = p.parse_args(argv)
    settings = args.settings.split(",")
    for s in settings:
        if s not in SETTINGS:
            p.error(f"--settings: unknown {s!r}; allowed: {', '.join(SETTINGS)}")
    other_trees = dict(t.split("=", 1) for t in args.other_tree)
    for label, root in other_trees.items():
        if not (Path(root) / "jsft").is_dir() or not (Path(root) / "scripts" / "bench_sides.py").is_file():
            p.error(f"--other-tree {label}={root}: not a jsft checkout with scripts/bench_sides.py")
    table = QUICK if args.quick else WORKLOADS
    names = list(table) if args.workload == "all" else [args.workload]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="jsft-bench-"))
    load_before = os.getloadavg()[0]
    results = {}
    for name in names:
        w = dataclasses.replace(table[name], steps=args.steps) if args.steps else table[name]
        where = workdir / name
        where.mkdir(parents=True, exist_ok=True)
        steps, summaries = run_interleaved(prepare(where, w), w, where, settings, other_trees,
                                            parallel_setup=args.quick)
        results[name] = bench_report.workload_result(w, steps, summaries)
    report = bench_report.summarize(results, bench_report.loss_memory_figures(), (load_before, os.getloadavg()[0]),
                                    args.label)
    bench_report.print_report(report)
    out = Path(args.json) if args.json else workdir / "bench.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"json         {out}")
    if not args.no_append and not args.quick:
        bench_report.append_rows(report, bench_report.ROOT / "BENCHMARKS.md")


if __name__ == "__main__":
    main()
