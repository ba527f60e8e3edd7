"""The bench's figures and report: medians per side, ratios to torch, the printed report, BENCHMARKS.md rows."""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# A step counts as quiet when the matmul probes on both sides of it reach this share of the run's best:
# other work on the machine then did not steal cores during it (torch's OpenMP threads in particular
# slow down far more than XLA's when a core is taken).
QUIET = 0.85


def _figures(steps: list[dict], warmup: int) -> dict:
    """Medians over the measured steps; MFU of each step against the matmul peak probed around it. A step
    that compiled a new micro-batch shape (trainer.shape_buckets) is left out: its time is compile time."""
    measured = [s for s in steps[warmup:] if not s.get("compiled")]
    if not measured:
        raise RuntimeError("every measured step compiled a new shape: run more steps (--steps)")
    best = max(max(s["peaks"]) for s in steps)
    quiet = [s for s in measured if min(s["peaks"]) >= QUIET * best]
    peak = lambda s: sum(s["peaks"]) / 2  # noqa: E731
    return {
        "tokens_per_s": statistics.median(s["real"] / s["time"] for s in measured),
        "quiet_tokens_per_s": statistics.median(s["real"] / s["time"] for s in quiet) if quiet else None,
        "quiet_steps": len(quiet),
        "step_s": statistics.median(s["time"] for s in measured),
        "mfu": statistics.median(s["flops"] / s["time"] / peak(s) for s in measured),
        "needed_flops_utilisation": statistics.median(s.get("needed_flops", s["flops"]) / s["time"] / peak(s)
                                                      for s in measured),
        "matmul_peak_flops": statistics.median(peak(s) for s in measured),
        "padding_efficiency": sum(s["real"] for s in steps) / sum(s["computed"] for s in steps),
        "first_step_s": steps[0]["time"],
        "compiled_shapes": sum(s.get("compiled", 0) for s in steps),
        "measured_steps": len(measured),
        "steps": steps,
    }


def loss_memory_figures() -> dict:
    """Temp bytes of the chunked CE vs full fp32 logits at Qwen2.5-0.5B's vocabulary and width (jsft.plan)."""
    from jsft.train.planner import loss_memory

    return loss_memory(vocab=151936, hidden=896, tokens=4096)


def workload_result(w, steps: dict, summaries: list) -> dict:
    """One workload's figures: per side (jsft:<settings>, torch), and each jsft side's ratio to torch."""
    sides = {name: {**_figures(steps[name], w.warmup_steps), **summary} for name, summary in summaries}
    t = sides["torch"]
    ratios = {name: {"tokens_per_s": s["tokens_per_s"] / t["tokens_per_s"], "quiet": _quiet_ratio(s, t)}
              for name, s in sides.items() if name != "torch"}
    return {"workload": dataclasses.asdict(w), "sides": sides, "ratios": ratios}


def summarize(workloads: dict, ce: dict, load: tuple, label: str) -> dict:
    return {
        "date": datetime.date.today().isoformat(),
        "code": label or _git_commit(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "cpu": _cpu_name(),
        "load_average": load,
        "workloads": workloads,
        "cross_entropy_memory": ce,
    }


def _quiet_ratio(j: dict, t: dict):
    if j["quiet_steps"] < 2 or t["quiet_steps"] < 2:
        return None
    return j["quiet_tokens_per_s"] / t["quiet_tokens_per_s"]


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def print_report(r: dict) -> None:
    ce, mib = r["cross_entropy_memory"], 2**20
    print(f"machine      {r['cpu']} ({r['machine']}), load {r['load_average'][0]:.1f} -> {r['load_average'][1]:.1f}")
    for name, result in r["workloads"].items():
        w, sides = result["workload"], result["sides"]
        print(f"workload     {name}: {w['samples_per_step']} samples/step, {w['layers']}L h{w['hidden']} v{w['vocab']}")
        for side, s in sides.items():
            print(f"  {side:<14} {s['tokens_per_s']:.0f} real tokens/s, step {s['step_s']:.2f}s, "
                  f"padding efficiency {s['padding_efficiency']:.0%}, MFU {s['mfu']:.1%}, loss {_losses(s)}")
            if side == "torch":
                continue
            ratio = result["ratios"][side]
            print(f"  {'':<14} ratio        jsft / torch real tokens/s = {ratio['tokens_per_s']:.2f}x; over quiet "
                  f"steps only: {_fmt_ratio(ratio['quiet'])}; {s['needed_flops_utilisation']:.1%} of the matmul "
                  f"peak on the FLOPs it needs")
            mem = s["step_memory"]
            choice = f" (auto, chosen in {s['remat_choice_s']:.1f}s)" if s["remat_choice_s"] is not None else ""
            print(f"  {'':<14} remat {s['remat_policy']}{choice}, micro-batch {s['micro_batch_shape']}, "
                  f"attention={s['attention_impl']}, compile {s['compile_s']:.1f}s for {s['compiled_shapes_ahead']} "
                  f"shapes, temporaries {mem.get('temp_bytes', 0) / mib:.0f} MiB, peak RSS {s['peak_rss'] / 2**30:.2f} GiB")
    first = next(iter(r["workloads"].values()))["sides"]
    print(f"MFU          model FLOPs of the real tokens (6N + causal attention per sample, logits at every token) "
          f"/ time / the fp32 matmul peak probed around each step ({first['torch']['matmul_peak_flops'] / 1e9:.0f} GFLOP/s)")
    print(f"CE memory    vocab {ce['vocab']}, {ce['tokens']} tokens: chunked loss temporaries "
          f"{ce['chunked_temp_bytes'] / mib:.0f} MiB vs full fp32 logits {ce['full_temp_bytes'] / mib:.0f} MiB")


def _losses(side: dict) -> str:
    losses = [s["loss"] for s in side["steps"]]
    return f"{losses[0]:.3f} -> {losses[-1]:.3f}"


def _fmt_ratio(ratio) -> str:
    return f"{ratio:.2f}x" if ratio else "n/a"


HEADER = (
    "| date | code | machine | workload | jsft settings | remat | jsft tok/s | torch tok/s | ratio (quiet steps) "
    "| jsft MFU | torch MFU | pad eff jsft / torch | compile s | load |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def append_rows(r: dict, path: Path) -> None:
    """One row per workload and jsft settings, under the table's header (written when the file lacks it)."""
    rows = []
    for name, result in r["workloads"].items():
        t = result["sides"]["torch"]
        for side, j in result["sides"].items():
            if side == "torch":
                continue
            ratio = result["ratios"][side]
            rows.append(
                f"| {r['date']} | {r['code']} | {r['cpu']} | {name} | {side.removeprefix('jsft:')} | {j['remat_policy']} "
                f"| {j['tokens_per_s']:.0f} | {t['tokens_per_s']:.0f} | {ratio['tokens_per_s']:.2f}x "
                f"({_fmt_ratio(ratio['quiet'])}) | {j['mfu']:.1%} | {t['mfu']:.1%} "
                f"| {j['padding_efficiency']:.0%} / {t['padding_efficiency']:.0%} | {j['compile_s']:.0f} "
                f"| {r['load_average'][0]:.1f}-{r['load_average'][1]:.1f} |\n"
            )
    text = path.read_text() if path.exists() else ""
    if HEADER.splitlines()[0] not in text:
        text += ("\n" if text else "") + HEADER
    path.write_text(text + "".join(rows))
