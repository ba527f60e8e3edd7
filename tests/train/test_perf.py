"""Peak FLOP/s for MFU: datasheet tables, the trainer.peak_tflops override, and no failure on an unknown
accelerator (MFU null, one warning)."""

import types
import warnings

import jax
import pytest

from jsft.train import perf


def fake_devices(monkeypatch, platform, kind, count=8):
    monkeypatch.setattr(perf.jax, "default_backend", lambda: platform)
    monkeypatch.setattr(perf.jax, "devices", lambda: [types.SimpleNamespace(device_kind=kind)] * count)
    monkeypatch.setattr(perf.jax, "device_count", lambda: count)


def test_datasheet_names_match_whole_words():
    assert perf.datasheet_peak("gpu", "NVIDIA H20") == 148e12
    assert perf.datasheet_peak("gpu", "NVIDIA H200") == 989e12  # not H20's
    assert perf.datasheet_peak("gpu", "NVIDIA H100 80GB HBM3") == 989e12
    assert perf.datasheet_peak("gpu", "NVIDIA H100 PCIe") == 756e12
    assert perf.datasheet_peak("gpu", "NVIDIA L4") == 121e12
    assert perf.datasheet_peak("gpu", "NVIDIA L40S") == 362e12  # not L4's
    assert perf.datasheet_peak("gpu", "NVIDIA A100-SXM4-80GB") == 312e12
    assert perf.datasheet_peak("tpu", "TPU v5 lite") == 197e12
    assert perf.datasheet_peak("tpu", "TPU v5") == 459e12
    assert perf.datasheet_peak("gpu", "Tesla V100-SXM2-16GB") is None


def test_an_unknown_gpu_gives_null_mfu_with_one_warning(monkeypatch):
    fake_devices(monkeypatch, "gpu", "NVIDIA RTX A6000")
    with pytest.warns(UserWarning, match="trainer.peak_tflops") as record:
        assert perf.device_peak_flops("bfloat16") is None
    assert len(record) == 1


def test_known_devices_and_the_override(monkeypatch):
    fake_devices(monkeypatch, "gpu", "NVIDIA H100 80GB HBM3", count=8)
    assert perf.device_peak_flops("bfloat16") == 8 * 989e12
    assert perf.device_peak_flops("float32") == 8 * 989e12 / 2
    fake_devices(monkeypatch, "tpu", "TPU v6 lite", count=4)
    assert perf.device_peak_flops("bfloat16") == 4 * 918e12
    fake_devices(monkeypatch, "gpu", "NVIDIA RTX A6000", count=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the override needs no table, so no warning
        assert perf.device_peak_flops("bfloat16", peak_tflops=150.0) == 2 * 150e12


def test_the_trainer_logs_null_mfu_when_the_peak_is_unknown(sft_setup, tmp_path, monkeypatch):
    """metrics.jsonl stays strict JSON: train/mfu is null, the run is not refused."""
    import json

    from jsft.config import load_config
    from jsft.train import loop

    from jsft_testing import sft_overrides

    monkeypatch.setattr(loop, "device_peak_flops", lambda dtype, override: None)
    loop.train(load_config(None, sft_overrides(sft_setup, tmp_path, **{"trainer.total_training_steps": 1})))
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert row["train/mfu"] is None and row["train/loss"] > 0
    assert json.loads((tmp_path / "run_info.json").read_text())["peak_flops"] is None
    assert jax.device_count() == 8
