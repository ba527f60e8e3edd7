"""Peak FLOP/s of the devices a run uses, for MFU: a datasheet table for GPUs, a measured matmul on CPU."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# dense (no sparsity) bf16 tensor-core peaks, FLOP/s per device; fp32 runs use the TF32 figure / 2
_GPU_BF16_PEAK = {
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "B200": 2250e12,
}


def device_peak_flops(compute_dtype) -> float:
    """Peak FLOP/s of ALL devices of this run together (so MFU = achieved FLOP/s / this)."""
    if jax.default_backend() == "gpu":
        kind = jax.devices()[0].device_kind
        for name, peak in _GPU_BF16_PEAK.items():
            if name in kind:
                scale = 1.0 if jnp.dtype(compute_dtype).itemsize == 2 else 0.5
                return peak * scale * jax.device_count()
        raise ValueError(f"unknown GPU '{kind}': add its peak to jsft/train/perf.py")
    # CPU: fake devices share the host's cores, so the peak is one host's measured matmul rate per process
    return measured_matmul_flops(compute_dtype) * jax.process_count()


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
