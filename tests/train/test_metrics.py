"""MetricsLogger: jsonl per step, clean resume, console line, TensorBoard, main-process only, wandb error."""

import builtins
import json

import numpy as np
import pytest

from jsft.train.metrics import METRICS_FILE, MetricsLogger, format_metrics

CONFIG = {"optim": {"lr": 1e-3}}


def make(run_dir, loggers=("console",), is_main=True, start_step=1):
    return MetricsLogger(run_dir, list(loggers), is_main, 10, "jsft", "test", CONFIG, start_step=start_step)


def _reject(constant):
    raise ValueError(f"{constant} is not JSON")


def read(run_dir):
    """Strict JSON: NaN / Infinity tokens are refused, as any non-Python reader would."""
    return [json.loads(line, parse_constant=_reject) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def test_one_json_object_per_step_with_python_numbers(tmp_path):
    with make(tmp_path) as m:
        m.log(1, {"train/loss": np.float32(2.5), "train/grad_norm": float("nan"), "epoch": 0})
        assert read(tmp_path)[0]["train/loss"] == 2.5  # flushed before close
        m.log(2, {"train/loss": 2.0})
    rows = read(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["epoch"] == 0 and rows[0]["train/grad_norm"] is None
    assert rows[0]["non_finite"] == ["train/grad_norm"] and "non_finite" not in rows[1]


def test_resume_drops_steps_at_and_after_the_start_step(tmp_path):
    with make(tmp_path) as m:
        for step in range(1, 6):
            m.log(step, {"train/loss": float(step)})
    with (tmp_path / METRICS_FILE).open("a") as f:
        f.write('{"step": 6, "train/lo')  # a line cut short by a kill -9
    with make(tmp_path, start_step=4) as m:  # resumed from the checkpoint of step 3
        m.log(4, {"train/loss": 40.0})
    assert [(r["step"], r["train/loss"]) for r in read(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_console_line_is_compact(tmp_path, capsys):
    assert format_metrics({"train/loss": 2.31456, "train/lr": 1e-05, "epoch": 1}) == "loss 2.315 | lr 1e-05 | epoch 1"
    with make(tmp_path) as m:
        m.log(3, {"train/loss": 2.31456})
    captured = capsys.readouterr()
    assert "step 3/10 | loss 2.315" in captured.out + captured.err


def test_tensorboard_event_file_written(tmp_path):
    with make(tmp_path, loggers=["tensorboard"]) as m:
        m.log(1, {"train/loss": 1.0, "note": "text is not a scalar"})
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_non_main_process_writes_nothing(tmp_path):
    with make(tmp_path / "run", loggers=["console", "tensorboard"], is_main=False) as m:
        m.log(1, {"train/loss": 1.0})
    assert not (tmp_path / "run").exists()


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(RuntimeError, match="pip install wandb"):
        make(tmp_path / "run", loggers=["wandb"])
    assert not (tmp_path / "run").exists()  # failed before touching the run directory


def test_plot_writes_one_png_per_panel(tmp_path):
    from jsft.plot import main

    with make(tmp_path, loggers=[]) as m:
        for step in range(1, 41):
            m.log(step, {
                "train/loss": 3.0 * np.exp(-step / 12) + 0.3,
                "train/lr": 1e-3 * min(1.0, step / 5) * (0.5 + 0.5 * np.cos(np.pi * step / 40)),
                "train/grad_norm": 2.0 / np.sqrt(step) if step != 17 else float("nan"),
                "train/tokens_per_sec": 5000.0 + 100 * np.sin(step),
            })
            if step % 10 == 0:
                m.log(step, {"val/loss": 3.0 * np.exp(-step / 12) + 0.4, "val/tool_call_parse_rate": step / 40})
    main([str(tmp_path), "--out", str(tmp_path / "png")])
    names = {"loss", "lr", "grad_norm", "tokens_per_sec", "val_tool_call_parse_rate", "overview"}
    assert {p.stem for p in (tmp_path / "png").glob("*.png")} == names
    assert all((tmp_path / "png" / f"{n}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)


def test_wandb_offline_run_is_written(tmp_path, monkeypatch):
    """Runs where wandb is installed (it is not a test dependency): an offline run is created in the run
    directory, takes the logged steps and finishes cleanly."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with make(tmp_path / "run", loggers=["wandb"]) as m:
        m.log(1, {"train/loss": 2.5})
        m.log(2, {"train/loss": 2.0, "train/grad_norm": float("nan")})
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    assert [r["step"] for r in read(tmp_path / "run")] == [1, 2]
