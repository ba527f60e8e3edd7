"""scripts/gpu_check.py: its packed rows and its attention parity numbers against a dense torch reference
computed here (Pallas kernels interpreted on CPU), and `--cpu-smoke` end to end (tiny shapes), so the command a
GPU session runs cannot rot."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(length=128, heads=4, kv_heads=2, head_dim=64)  # what --cpu-smoke checks


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_packed_rows_are_whole_samples_back_to_back(gpu_check):
    seg, pos = gpu_check.packed_rows(6, 200, (20, 90), seed=3)
    for s, p in zip(seg, pos):
        used = int((s > 0).sum())
        assert (s[used:] == 0).all() and (p[used:] == 0).all()  # padding only at the tail
        ids, starts = np.unique(s[:used], return_index=True)
        assert list(ids) == list(range(1, len(ids) + 1)) and list(starts) == sorted(starts)  # 1, 2, ... in order
        for i, start in zip(ids, starts):
            n = int((s == i).sum())
            assert (s[start:start + n] == i).all() and list(p[start:start + n]) == list(range(n))
            assert 20 <= n < 90 or (len(ids) == 1 and n == 200)  # drawn lengths; a lone sample may fill the row


def _dense_reference(inputs):
    """Causal attention within each sample, in float64 torch from the same (bf16) values: output and the
    gradients of sum(output * weights)."""
    import torch

    t = {n: torch.tensor(np.asarray(inputs[n], np.float64)) for n in ("q", "k", "v", "weights")}
    seg, pos = (torch.tensor(np.asarray(inputs[n])) for n in ("segment_ids", "positions"))
    q, k, v = (t[n].clone().requires_grad_(True) for n in "qkv")
    repeat = q.shape[2] // k.shape[2]  # query head h reads KV head h // repeat
    kr, vr = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kr) / q.shape[-1] ** 0.5
    allowed = (seg[:, :, None] == seg[:, None, :]) & (pos[:, None, :] <= pos[:, :, None]) & (seg[:, :, None] > 0)
    allowed |= torch.eye(seg.shape[1], dtype=torch.bool)  # padding queries (weight 0) attend to themselves
    probs = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vr)
    (out * t["weights"]).sum().backward()
    return out.detach().numpy(), tuple(x.grad.numpy() for x in (q, k, v))


@pytest.mark.parametrize("impl", ["pallas_gpu", "splash"])
def test_parity_numbers_agree_with_a_dense_reference(gpu_check, impl):
    """The kernel (interpreted) is within bf16 error of the dense reference, and the errors the script reports
    (against its fp32 `xla` reference) are the errors against this one."""
    import jax.numpy as jnp

    inputs = gpu_check.attention_inputs(**SHAPE)
    valid = np.asarray(inputs["segment_ids"]) > 0
    ref_out, ref_grads = _dense_reference(inputs)
    xla_out, xla_grads = gpu_check.attention_run("xla", inputs, dtype=jnp.float32)
    for got, want in zip((np.asarray(xla_out)[valid], *xla_grads), (ref_out[valid], *ref_grads)):  # outputs: real tokens
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max())
    out, grads = gpu_check.attention_run(impl, inputs)
    f32 = [np.asarray(x, np.float32) for x in (out, *grads)]
    ours = {"out": np.abs(f32[0] - ref_out)[valid].max() / np.abs(ref_out).max(),
            **{f"d{n}": np.abs(g - r).max() / np.abs(r).max() for n, g, r in zip("qkv", f32[1:], ref_grads)}}
    reported = gpu_check.parity_errors(out, grads, xla_out, xla_grads, inputs["segment_ids"])
    assert set(ours) == {"out", "dq", "dk", "dv"} and max(ours.values()) < 3e-2
    for name in ours:
        assert reported[name] == pytest.approx(ours[name], abs=1e-4), name


def test_gpu_check_cpu_smoke(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # one CPU device, as the check runs on one GPU
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu-smoke", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    # each kernel plain and with window / sinks / softcap
    assert [(p["impl"], p["features"]) for p in result["parity"]] == [
        ("pallas_gpu", False), ("pallas_gpu", True), ("splash", False), ("splash", True)]
    for p in result["parity"]:  # packed bf16 rows against the fp32 reference, forward and backward
        assert p["ok"] and set(p["errors"]) == {"out", "dq", "dk", "dv"} and max(p["errors"].values()) < 3e-2
    steps = {s["impl"]: s for s in result["train_step"]}
    assert set(steps) == {"blockwise", "pallas_gpu"} and not result["skipped"]
    for s in steps.values():
        assert s["tokens_per_s"] > 0 and 0 < s["mfu"] < 1 and s["plan_peak_bytes"] > 0
        assert math.isfinite(s["loss_first"]) and math.isfinite(s["loss_last"])
    # same weights and batch: the attention implementation does not change the first loss
    assert abs(steps["blockwise"]["loss_first"] - steps["pallas_gpu"]["loss_first"]) < 2e-2
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| pallas_gpu | 128 |" in table and "| smoke (0.00B) | pallas_gpu | 2 x 128 |" in table
