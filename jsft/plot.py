"""Training curves from a run's metrics.jsonl, as PNG files.

Usage:
    python -m jsft.plot <run_dir> [--out DIR]

Reads `<run_dir>/metrics.jsonl` (and the clip threshold from `<run_dir>/config.yaml`) and writes, into DIR
(default `<run_dir>/plots`), one PNG per panel that has data: loss.png (train and val loss, log axis),
lr.png (the schedule), grad_norm.png (with the clip threshold), padding_efficiency.png, step_time.png and
tokens_per_sec.png (steps that compiled a new program left out); for a mixture of experts router_losses.png
(train/aux_loss, train/z_loss), expert_load.png (most and mean tokens per expert) and moe_dropped.png (with
model.moe_capacity_factor); one val_<name>.png per other val/* metric
that changes (e.g. val_tool_call_parse_rate.png), and overview.png with all of them side by side. Series
with few points are drawn with markers; series that never change are not drawn.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from jsft.train.metrics import METRICS_FILE  # noqa: E402

Series = dict[str, tuple[list[int], list[float]]]

# steps whose time includes compiling a program are not throughput: they are dropped from these series
TIMED = ("train/step_time", "train/tokens_per_sec", "train/mfu")
SPARSE = 30  # a series with fewer points than this is drawn with markers


@dataclass(frozen=True)
class Panel:
    stem: str
    title: str
    keys: tuple[str, ...]
    log_y: bool = False
    ylabel: str = ""


FIXED_PANELS = [
    Panel("loss", "loss (nats per target token)", ("train/loss", "val/loss"), log_y=True),
    Panel("lr", "learning rate (schedule)", ("train/lr",)),
    Panel("grad_norm", "gradient norm (before clipping)", ("train/grad_norm",), log_y=True),
    Panel("padding_efficiency", "padding efficiency (real / computed tokens)", ("train/padding_efficiency",)),
    Panel("step_time", "step time, compile steps left out", ("train/step_time",), ylabel="s"),
    Panel("tokens_per_sec", "tokens / s, compile steps left out", ("train/tokens_per_sec",)),
    # mixtures of experts only (absent from a dense run's metrics, so not drawn there)
    Panel("router_losses", "router losses (before their coefficients)", ("train/aux_loss", "train/z_loss"), log_y=True),
    Panel("expert_load", "tokens per expert (worst layer's most; mean)", ("train/expert_load_max", "train/expert_load_mean")),
    Panel("moe_dropped", "fraction of expert assignments dropped by capacity", ("train/moe_dropped_fraction",)),
]


def read_series(path: Path) -> Series:
    """metric name -> (steps, values) for every numeric metric; a metric may be absent from some lines."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is this a jsft run directory?")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a run killed mid-write
            continue
    compiled = _compile_steps(rows)
    series: Series = {}
    for row in rows:
        for name, value in row.items():
            if name == "step" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if name in TIMED and row["step"] in compiled:
                continue
            steps, values = series.setdefault(name, ([], []))
            steps.append(row["step"])
            values.append(float(value))
    return series


def _compile_steps(rows: list[dict]) -> set[int]:
    """Steps that compiled a new program: the first logged step, and each step where the count grew."""
    out, seen = set(), None
    for row in rows:
        n = row.get("train/compiled_shapes")
        if seen is None or (n is not None and n > seen):
            out.add(row["step"])
        if n is not None:
            seen = n if seen is None else max(seen, n)
    return out


def _changes(values: list[float]) -> bool:
    finite = [v for v in values if math.isfinite(v)]
    return len(finite) > 0 and max(finite) != min(finite)


def panels(series: Series) -> list[Panel]:
    """The fixed panels with a changing series, then one per remaining val/* metric that changes."""
    live = {k for k, (_, v) in series.items() if _changes(v) or (k.endswith("loss") and v)}
    chosen = [Panel(p.stem, p.title, tuple(k for k in p.keys if k in live), p.log_y, p.ylabel)
              for p in FIXED_PANELS if any(k in live for k in p.keys)]
    drawn = {k for p in FIXED_PANELS for k in p.keys}
    extra = sorted(k for k in live if k.startswith("val/") and k not in drawn)
    return chosen + [Panel(k.replace("/", "_"), k, (k,)) for k in extra]


def draw(ax, series: Series, panel: Panel, clip: Optional[float] = None, span: Optional[tuple[int, int]] = None) -> None:
    for key in panel.keys:
        steps, values = series[key]
        marker = "o" if len(steps) < SPARSE else None
        ax.plot(steps, values, marker=marker, markersize=4, linewidth=1.2, label=key)
    finite = [v for k in panel.keys for v in series[k][1] if math.isfinite(v)]
    if panel.stem == "grad_norm" and clip:
        ax.axhline(clip, color="tab:red", linestyle="--", linewidth=1, label=f"clip_grad {clip:g}")
    if panel.log_y and finite and min(finite) > 0:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))  # 0.5, not 5x10^-1
        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}" if _leading_digit(v) in (2, 3, 5) else ""))
    if span is not None:
        pad = 0.02 * (span[1] - span[0])
        ax.set_xlim(span[0] - pad, span[1] + pad)  # every panel spans the whole run, so sparse validation points line up with training
    if all(k.endswith("_rate") or k.endswith("_match") for k in panel.keys):
        ax.set_ylim(-0.02, 1.02)  # rates: the full [0, 1] range, so 0.95 looks like 0.95
    ax.set_title(panel.title)
    ax.set_xlabel("optimizer step")
    if panel.ylabel:
        ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def _leading_digit(v: float) -> int:
    return int(round(v / 10 ** math.floor(math.log10(v)))) if v > 0 else 0


def clip_threshold(run_dir: Path) -> Optional[float]:
    """optim.clip_grad from the run's config.yaml (None when absent or disabled)."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return None
    from omegaconf import OmegaConf

    value = OmegaConf.load(path).get("optim", {}).get("clip_grad")
    return float(value) if value and value > 0 else None


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the PNGs for one run; returns their paths."""
    run_dir = Path(run_dir)
    series = read_series(run_dir / METRICS_FILE)
    clip = clip_threshold(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    chosen = panels(series)
    every = [s for steps, _ in series.values() for s in steps]
    span = (min(every), max(every)) if every and min(every) < max(every) else None
    written = []
    for panel in chosen:
        fig, ax = plt.subplots(figsize=(6, 4))
        draw(ax, series, panel, clip, span)
        written.append(_save(fig, out / f"{panel.stem}.png"))
    if chosen:
        cols = min(3, len(chosen))
        rows = -(-len(chosen) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
        for ax, panel in zip(axes.flat, chosen):
            draw(ax, series, panel, clip, span)
        for ax in axes.flat[len(chosen) :]:
            ax.set_visible(False)
        fig.suptitle(run_dir.name)
        written.append(_save(fig, out / "overview.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jsft.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help=f"run directory holding {METRICS_FILE}")
    parser.add_argument("--out", default=None, help="output directory (default: <run_dir>/plots)")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
