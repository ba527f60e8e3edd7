"""Peak FLOP/s of the devices a run uses, for MFU: datasheet tables for GPUs and TPUs, a measured matmul on
CPU, `trainer.peak_tflops` to override; an accelerator in no table gives None (MFU logged as null)."""

from __future__ import annotations

import re
import time
import warnings
from typing import Optional

import jax
import jax.numpy as jnp

# dense (no sparsity) bf16 tensor-core peaks, FLOP/s per device, matched as whole words in device_kind
# (so "H20" is not "H200"); more specific names first. fp32 runs use the TF32 figure, about half.
_GPU_BF16_PEAK = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("H800", 989e12),
    ("H20", 148e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("GB200", 2500e12),
    ("B200", 2250e12),
    ("MI300X", 1307e12),
)
# TPU: bf16 peak per JAX device, by exact device_kind. v2/v3 expose each of a chip's two cores as a device.
_TPU_BF16_PEAK = {
    "TPU v2": 22.5e12,
    "TPU v3": 61.5e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5": 459e12,  # v5p
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
}


def datasheet_peak(platform: str, device_kind: str) -> Optional[float]:
    """bf16 dense peak FLOP/s of one device from the tables, None when the device is not in them."""
    if platform == "tpu":
        return _TPU_BF16_PEAK.get(device_kind)
    for name, peak in _GPU_BF16_PEAK:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(name)}(?![A-Za-z0-9])", device_kind):
            return peak
    return None


def device_peak_flops(compute_dtype, peak_tflops: Optional[float] = None) -> Optional[float]:
    """Peak FLOP/s of ALL devices of this run together (so MFU = achieved FLOP/s / this), or None (with one
    warning) for an accelerator in no table: the run trains, MFU is logged as null.
    `peak_tflops` (trainer.peak_tflops): one device's peak for the compute dtype, replacing the tables."""
    if peak_tflops is not None:
        return peak_tflops * 1e12 * jax.device_count()
    platform = jax.default_backend()
    if platform == "cpu":
        # fake devices share the host's cores, so the peak is one host's measured matmul rate per process
        return measured_matmul_flops(compute_dtype) * jax.process_count()
    kind = jax.devices()[0].device_kind
    peak = datasheet_peak(platform, kind)
    if peak is None:
        warnings.warn(f"no peak FLOP/s known for {platform} device '{kind}': train/mfu is logged as null; set "
                      "trainer.peak_tflops (dense TFLOP/s of one device) to get it", stacklevel=2)
        return None
    scale = 1.0 if jnp.dtype(compute_dtype).itemsize == 2 else 0.5
    return peak * scale * jax.device_count()


def measured_matmul_flops(dtype="float32", n: int = 2048, repeats: int = 3) -> float:
    """Best-of-`repeats` FLOP/s of an n^3 matmul on one local device."""
    device = jax.local_devices()[0]
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
