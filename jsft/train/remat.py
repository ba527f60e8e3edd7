"""model.remat_policy=auto: the cheapest rematerialisation whose compiled peak fits one device's memory.

Candidates in order of recompute cost: none (nothing recomputed), dots_saveable (matmul outputs kept,
the cheap element-wise rest recomputed), full (each decoder layer recomputed in the backward pass). Each is
compiled from abstract shapes by the memory planner (jsft/train/planner.py: the trainer's own micro-step and
update, on the run's mesh, for its largest micro-batch), cheapest first, stopping at the first whose peak
fits HEADROOM x the device's memory. The optimizer update does not depend on the policy, so it is compiled
once. This module holds the choice; the run's set-up (jsft/train/setup.py) calls it once.

The device's memory: trainer.device_memory when set; else jax's `bytes_limit` of this process's first
device (GPU/TPU: what jax may allocate, 75% of a GPU by default); on CPU the host's available RAM split over
the local devices.
veRL's switch keeps its meaning: model.enable_gradient_checkpointing=true means full (or the explicit
remat_policy), false means none; left unset (null), remat_policy decides.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

from jsft.config import REMAT_POLICIES, parse_bytes

CANDIDATES = REMAT_POLICIES  # cheapest recompute first
HEADROOM = 0.9  # share of the device memory a plan may fill: XLA's estimate vs. fragmentation and runtime buffers


def explicit_policy(model_section) -> Optional[str]:
    """The policy the run config fixes, or None when model.remat_policy=auto is to choose by memory."""
    checkpointing = model_section.enable_gradient_checkpointing
    if checkpointing is False:
        return "none"
    if model_section.remat_policy != "auto":
        return model_section.remat_policy
    return "full" if checkpointing else None


def device_memory(setting: Optional[str], local_devices) -> tuple[int, str]:
    """(bytes one device may use, where the figure comes from). `local_devices`: this process's devices
    (jax.local_devices(); jax refuses memory_stats of another process's device)."""
    if setting:
        return parse_bytes(setting), f"trainer.device_memory={setting}"
    first = local_devices[0]
    stats = first.memory_stats() if hasattr(first, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{first.platform} bytes_limit"
    # CPU: no limit from jax; the RAM available now, shared by this host's (possibly fake) devices
    local = len(local_devices)
    return _available_ram() // local, f"host available RAM / {local} local device(s)"


def _available_ram() -> int:
    """MemAvailable (free + reclaimable page cache) where /proc/meminfo has it, else free pages."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass
class RematChoice:
    policy: str
    budget_bytes: int  # what the peak must fit: HEADROOM x the device memory
    memory_source: str
    peaks: dict = field(default_factory=dict)  # policy -> compiled per-device peak bytes (the ones tried)
    compile_s: float = 0.0  # start-up cost of choosing
    fits: bool = True  # False: not even `full` fits; the run goes on with full and may run out of memory
    step_memory: dict = field(default_factory=dict)  # the chosen policy's compiled micro-step (run_info reuses it)
    plan: Optional[tuple] = field(default=None, repr=False)  # the chosen policy's (Plan, about): jsft.plan reuses it

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "plan"}

    def describe(self) -> str:
        tried = ", ".join(f"{p} {n / 2**20:.0f} MiB" for p, n in self.peaks.items())
        verdict = "" if self.fits else " (NOT even full fits: expect out-of-memory; see python -m jsft.plan)"
        return (f"remat auto -> {self.policy}{verdict}: per-device peak {tried} vs {self.budget_bytes / 2**20:.0f} MiB "
                f"usable ({self.memory_source}); chosen in {self.compile_s:.1f} s")


def choose(peak_of: Callable[[str], int], budget_bytes: int, memory_source: str) -> RematChoice:
    """The first candidate whose peak (peak_of(policy), compiled on demand) fits budget_bytes."""
    t0 = time.perf_counter()
    peaks = {}
    for policy in CANDIDATES:
        peaks[policy] = int(peak_of(policy))
        if peaks[policy] <= budget_bytes:
            return RematChoice(policy, budget_bytes, memory_source, peaks, time.perf_counter() - t0)
    return RematChoice("full", budget_bytes, memory_source, peaks, time.perf_counter() - t0, fits=False)
