"""Per-optimizer-step metrics: `<run_dir>/metrics.jsonl`, console progress, TensorBoard, wandb.

The console shows a few metrics per step (jsft/train/console.py); metrics.jsonl holds every metric: one JSON object per `log` call: {"step": N, "<name>": value, ...}, strict JSON: a
non-finite value is written as null and its name listed under "non_finite". Only the main process writes
anything.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from tqdm import tqdm

from jsft.train.console import step_lines

METRICS_FILE = "metrics.jsonl"


def _scalar(value: Any) -> Any:
    """Python number for jax/numpy scalars, so json and TensorBoard take them; other values unchanged."""
    return value.item() if hasattr(value, "item") else value


def truncate_from(path: Path, start_step: int) -> None:
    """Drop lines with step >= start_step (and a line cut short by a crash), so a resumed run reads as one."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] < start_step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)  # atomic: a crash here leaves the old file, never half of it


class MetricsLogger:
    """Writes each optimizer step's metrics to every configured sink; a no-op off the main process.

    loggers: `trainer.logger` (console, tensorboard, wandb); metrics.jsonl is always written.
    start_step: the first step this run logs (1 + the resumed checkpoint's step); older lines are kept,
    later ones dropped.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        loggers: list[str],
        is_main: bool,
        total_steps: int,
        project: str,
        experiment: str,
        config_dict: Mapping[str, Any],
        start_step: int = 1,
    ):
        self.enabled = is_main
        if not is_main:
            return
        wandb = _import_wandb() if "wandb" in loggers else None  # fail before touching the run directory
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / METRICS_FILE
        truncate_from(path, start_step)
        self._file = path.open("a")
        self._bar = self._tb = None
        if "console" in loggers:
            self._bar = tqdm(total=total_steps, initial=start_step - 1, desc=experiment, unit="step", dynamic_ncols=True,
                             disable=None)  # no bar when stderr is not a terminal (logs): the step lines remain
        if "tensorboard" in loggers:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step)
            self._tb.add_text("config", f"```\n{json.dumps(config_dict, indent=2, default=str)}\n```")
        self._wandb = None
        if wandb is not None:
            self._wandb = wandb.init(project=project, name=experiment, config=dict(config_dict), dir=str(run_dir))

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        values = {name: _scalar(v) for name, v in metrics.items()}
        self._file.write(json.dumps({"step": step, **_strict_json(values)}, allow_nan=False) + "\n")
        self._file.flush()  # per step, so a crash loses at most the step in flight
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            for line in step_lines(step, self._bar.total, values):
                self._bar.write(line)
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for name, value in numbers.items():
                self._tb.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self.enabled = False

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _import_wandb() -> Any:
    """wandb is optional and slow to import, so only a run that asks for it imports it."""
    try:
        import wandb
    except ImportError:
        raise RuntimeError(
            "trainer.logger includes 'wandb' but the wandb package is not installed; "
            "`pip install wandb` or remove wandb from trainer.logger"
        ) from None
    return wandb


def _strict_json(values: dict) -> dict:
    """NaN and infinities as null (JSON has neither), their names listed under `non_finite`."""
    bad = sorted(k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v))
    if not bad:
        return values
    return {**{k: (None if k in bad else v) for k, v in values.items()}, "non_finite": bad}
