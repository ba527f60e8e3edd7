"""What a new user meets first: one-line errors before any work (and no run directory left behind), --help
that describes every flag, a finished run that says so, dropped samples counted, a console for people."""

import argparse
import importlib
import json

import pytest

from jsft_testing import sft_overrides

ENTRY_POINTS = ["jsft.train.__main__", "jsft.inspect", "jsft.export", "jsft.plan", "jsft.plot"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_describes_every_flag(module, monkeypatch):
    """Each entry point's parser: every option and positional has a help text."""
    seen = {}

    def capture(self, *args, **kwargs):
        seen["parser"] = self
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_intermixed_args", capture)
    with pytest.raises(SystemExit):
        importlib.import_module(module).main([])
    parser = seen["parser"]
    assert parser.description
    undocumented = [a.dest for a in parser._actions if not isinstance(a, argparse._HelpAction) and not a.help]
    assert undocumented == []


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_missing_inputs_are_one_line_errors_without_a_run_dir(sft_setup, tmp_path, capsys):
    from jsft.train.__main__ import main

    run = tmp_path / "run"
    cases = [
        ({"data.train_files": str(tmp_path / "missing.jsonl")}, "data.train_files: data file not found"),
        ({"data.val_files": str(tmp_path / "nope" / "*.jsonl")}, "data.val_files: no data file matches"),
        ({"model.path": str(tmp_path / "no_model")}, "no such directory"),
        ({"model.path": str(tmp_path)}, "has no config.json"),
        ({"data.tokenizer": str(tmp_path / "no_tok")}, "data.tokenizer="),
    ]
    for extra, message in cases:
        assert main(sft_overrides(sft_setup, run, **extra)) == 2
        assert message in _one_line_error(capsys)
        assert not run.exists()


def test_other_entry_points_fail_in_one_line(tmp_path, capsys):
    from jsft import export, inspect, plan, plot

    assert export.main(["--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file or directory" in _one_line_error(capsys)
    assert inspect.main(["--data", str(tmp_path / "x.jsonl"), "--tokenizer", str(tmp_path)]) == 1
    _one_line_error(capsys)
    assert plan.main(["model.path=" + str(tmp_path / "none")]) == 2
    _one_line_error(capsys)
    assert plot.main([str(tmp_path / "none")]) == 2
    assert "metrics.jsonl not found" in _one_line_error(capsys)


def test_a_finished_run_says_it_is_complete_and_how_to_go_on(sft_setup, tmp_path, capsys):
    from jsft.train.__main__ import main

    run = tmp_path / "run"
    overrides = sft_overrides(sft_setup, run, **{"trainer.total_training_steps": 2})
    assert main(overrides) == 0
    lines = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(overrides) == 0
    out = capsys.readouterr().out
    assert "is complete: its checkpoint is at step 2 of 2; nothing to train" in out
    for hint in ("trainer.total_training_steps", "trainer.resume_mode=disable", "trainer.default_local_dir"):
        assert hint in out
    assert (run / "metrics.jsonl").read_text() == lines  # nothing trained, nothing logged


def test_console_summary_table_and_dropped_remainder(sft_setup, tmp_path, capsys):
    from jsft.train.__main__ import main

    run = tmp_path / "run"
    # 48 training rows in batches of 10: 8 samples of each epoch are left out
    overrides = sft_overrides(sft_setup, run, **{"trainer.total_training_steps": 1, "data.train_batch_size": 10,
                                                 "trainer.logger": "[console]"})
    assert main(overrides) == 0
    out = capsys.readouterr().out
    assert "8 samples per epoch left out" in out
    assert json.loads((run / "run_info.json").read_text())["dropped_samples_per_epoch"] == 8
    assert "optim:" not in out and "\n  optim    lr 0.001" in out  # the summary, not the whole config
    assert "\n  parameters " in out and "run info: {" not in out  # the run info as a table
    step_lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert step_lines and all(len(line) <= 120 for line in step_lines)
    assert main(overrides + ["--print-config", "trainer.resume_mode=disable"]) == 0
    assert "optim:\n  lr: 0.001" in capsys.readouterr().out
