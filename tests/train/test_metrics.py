"""MetricsLogger: jsonl per step, clean resume, console line, TensorBoard, main-process only, wandb error."""

import builtins
import json

import matplotlib.pyplot as plt
import numpy as np
import pytest

from jsft.train.console import WIDTH, step_lines
from jsft.train.metrics import METRICS_FILE, MetricsLogger

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


FULL_STEP = {
    "epoch": 0, "train/loss": 0.47213, "train/lr": 3.0021e-4, "train/grad_norm": 0.5435, "train/target_tokens": 589,
    "train/global_tokens": 3560, "train/target_token_ratio": 0.165, "train/samples": 8, "train/micro_batches": 2,
    "train/compiled_shapes": 3, "train/padding_efficiency": 0.8691, "train/tokens_per_sec": 3518.2,
    "train/mfu": 0.3809, "train/step_time": 1.0123, "train/skipped_steps": 0, "val/loss": 0.48641,
    "val/target_tokens": 4000, "val/tool_call_parse_rate": 0.98039, "val/exact_answer_rate": 0.0,
    "val/tool_name_match": 0.5, "val/stop_rate": 1.0, "val/mean_generated_tokens": 41.5,
}


def test_console_lines_fit_120_columns_and_keep_the_essentials(tmp_path, capsys):
    lines = step_lines(200, 200, FULL_STEP)
    assert all(len(line) <= WIDTH for line in lines)
    assert lines[0].startswith("step 200/200 | loss 0.4721 | lr 3.00e-04 | gnorm 0.543 | tgt 589 | tok 3,560")
    assert "mfu 38.1%" in lines[0] and "padding" not in " ".join(lines)  # the rest is in metrics.jsonl
    val = " ".join(lines[1:])
    assert "val | loss 0.4864" in val and "tool_call_parse_rate 0.9804" in val and "stop_rate 1" in val
    assert step_lines(1, 10, {"train/loss": 2.0, "train/mfu": None}) == ["step 1/10 | loss 2.0000 | mfu n/a"]
    with make(tmp_path) as m:
        m.log(3, {"train/loss": 2.31456})
    captured = capsys.readouterr()
    assert "step 3/10 | loss 2.3146" in captured.out + captured.err


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


def _fake_run(m):
    """40 steps: a new program compiled at steps 1 and 9; validation every 10 steps; val_target_tokens constant."""
    for step in range(1, 41):
        metrics = {
            "train/loss": 3.0 * np.exp(-step / 12) + 0.3,
            "train/lr": 1e-3 * min(1.0, step / 5) * (0.5 + 0.5 * np.cos(np.pi * step / 40)),
            "train/grad_norm": 2.0 / np.sqrt(step) if step != 17 else float("nan"),
            "train/padding_efficiency": 0.9 + 0.01 * np.sin(step),
            "train/compiled_shapes": 1 if step < 9 else 2,
            "train/step_time": 30.0 if step in (1, 9) else 1.0 + 0.01 * step,
            "train/tokens_per_sec": 100.0 if step in (1, 9) else 5000.0 + 100 * np.sin(step),
            "train/samples": 8,
        }
        if step % 10 == 0:
            metrics.update({"val/loss": 3.0 * np.exp(-step / 12) + 0.4, "val/tool_call_parse_rate": step / 40,
                            "val/target_tokens": 1234})
        m.log(step, metrics)


def test_plot_panels_are_worth_reading(tmp_path):
    from jsft.plot import clip_threshold, draw, main, panels, read_series

    with make(tmp_path, loggers=[]) as m:
        _fake_run(m)
    (tmp_path / "config.yaml").write_text("optim:\n  clip_grad: 1.0\n")
    series = read_series(tmp_path / METRICS_FILE)
    # compile steps are not throughput
    assert 1 not in series["train/step_time"][0] and 9 not in series["train/tokens_per_sec"][0]
    assert max(series["train/step_time"][1]) < 2 and len(series["train/step_time"][0]) == 38
    assert len(series["train/loss"][0]) == 40  # only the timed series lose those steps
    chosen = {p.stem: p for p in panels(series)}
    assert set(chosen) == {"loss", "lr", "grad_norm", "padding_efficiency", "step_time", "tokens_per_sec",
                           "val_tool_call_parse_rate"}  # constant series (samples, val/target_tokens) are not drawn
    assert chosen["loss"].keys == ("train/loss", "val/loss")
    fig, ax = plt.subplots()
    draw(ax, series, chosen["loss"])
    assert ax.get_yscale() == "log"
    val_line = [line for line in ax.get_lines() if line.get_label() == "val/loss"][0]
    assert val_line.get_marker() == "o"  # 4 points: markers show where they are
    train_line = [line for line in ax.get_lines() if line.get_label() == "train/loss"][0]
    assert train_line.get_marker() in (None, "None", "")
    fig, ax = plt.subplots()
    draw(ax, series, chosen["grad_norm"], clip_threshold(tmp_path))
    assert any(line.get_label() == "clip_grad 1" and set(line.get_ydata()) == {1.0} for line in ax.get_lines())
    plt.close("all")
    assert main([str(tmp_path), "--out", str(tmp_path / "png")]) == 0
    names = set(chosen) | {"overview"}
    assert {p.stem for p in (tmp_path / "png").glob("*.png")} == names
    assert all((tmp_path / "png" / f"{n}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)


def test_plot_of_a_missing_run_is_one_line(tmp_path, capsys):
    from jsft.plot import main

    assert main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.jsonl not found" in err


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
