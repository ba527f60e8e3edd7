"""Training curves from a run's metrics.jsonl, as PNG files.

Usage:
    python -m jsft.plot <run_dir> [--out DIR]

Reads `<run_dir>/metrics.jsonl` and writes, into DIR (default `<run_dir>/plots`), one PNG per panel that
has data: loss.png (train/loss and val/loss), lr.png, grad_norm.png, tokens_per_sec.png, one
val_<name>.png per other val/* metric (e.g. val_tool_call_parse_rate.png), and overview.png with all of
them side by side.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from jsft.train.metrics import METRICS_FILE  # noqa: E402

Series = dict[str, tuple[list[int], list[float]]]

# (file stem, title, metrics drawn together, log y-axis)
FIXED_PANELS = [
    ("loss", "loss", ["train/loss", "val/loss"], False),
    ("lr", "learning rate", ["train/lr"], False),
    ("grad_norm", "gradient norm (before clipping)", ["train/grad_norm"], True),
    ("tokens_per_sec", "tokens / s", ["train/tokens_per_sec"], False),
]


def read_series(path: Path) -> Series:
    """metric name -> (steps, values) for every numeric metric; a metric may be absent from some lines."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is this a jsft run directory?")
    series: Series = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the last line of a run killed mid-write
            continue
        for name, value in row.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                steps, values = series.setdefault(name, ([], []))
                steps.append(row["step"])
                values.append(float(value))
    return series


def panels(series: Series) -> list[tuple[str, str, list[str], bool]]:
    """The fixed panels that have data, then one per remaining val/* metric."""
    chosen = [p for p in FIXED_PANELS if any(k in series for k in p[2])]
    drawn = {k for p in FIXED_PANELS for k in p[2]}
    extra = sorted(k for k in series if k.startswith("val/") and k not in drawn)
    return chosen + [(k.replace("/", "_"), k, [k], False) for k in extra]


def draw(ax, series: Series, title: str, keys: list[str], log_y: bool) -> None:
    for key in keys:
        if key in series:
            steps, values = series[key]
            # Validation runs every few steps: markers show where the points really are.
            ax.plot(steps, values, marker="o" if key.startswith("val/") else None, markersize=3, label=key)
    finite = [v for k in keys if k in series for v in series[k][1] if math.isfinite(v)]
    if log_y and finite and min(finite) > 0:
        ax.set_yscale("log")
    if all(k.endswith("_rate") for k in keys):
        ax.set_ylim(-0.02, 1.02)  # rates: the full [0, 1] range, so 0.95 looks like 0.95
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    ax.legend()


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the PNGs for one run; returns their paths."""
    run_dir = Path(run_dir)
    series = read_series(run_dir / METRICS_FILE)
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    chosen = panels(series)
    written = []
    for stem, title, keys, log_y in chosen:
        fig, ax = plt.subplots(figsize=(6, 4))
        draw(ax, series, title, keys, log_y)
        written.append(_save(fig, out / f"{stem}.png"))
    if chosen:
        cols = min(3, len(chosen))
        rows = -(-len(chosen) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
        for ax, (_, title, keys, log_y) in zip(axes.flat, chosen):
            draw(ax, series, title, keys, log_y)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jsft.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help=f"run directory holding {METRICS_FILE}")
    parser.add_argument("--out", default=None, help="output directory (default: <run_dir>/plots)")
    args = parser.parse_args(argv)
    for path in plot_run(args.run_dir, args.out):
        print(path)


if __name__ == "__main__":
    main()
