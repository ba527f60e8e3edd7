"""model.remat_policy=auto: the cheapest rematerialisation whose compiled peak fits one device's memory.

Candidates in order of recompute cost: none (nothing recomputed), dots_saveable (matmul outputs kept,
the cheap element-wise rest recomputed), full (each decoder layer recomputed in the backward pass). Each is
compiled from abstract shapes by jsft.plan (the trainer's own micro-step and update, on the run's mesh, for
its largest micro-batch), cheapest first, stopping at the first whose peak fits HEADROOM x the device's
memory. The optimizer update does not depend on the policy, so it is compiled once.

The device's memory: trainer.device_memory when set; else jax's `bytes_limit` (GPU/TPU: what jax may
allocate, 75% of a GPU by default); on CPU the host's available RAM split over the local devices.
veRL's switch keeps its meaning: model.enable_gradient_checkpointing=true means full (or the explicit
remat_policy), false means none; left unset (null), remat_policy decides.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

CANDIDATES = ("none", "dots_saveable", "full")  # cheapest recompute first
HEADROOM = 0.9  # share of the device memory a plan may fill: XLA's estimate vs. fragmentation and runtime buffers


def explicit_policy(model_section) -> Optional[str]:
    """The policy the run config fixes, or None when model.remat_policy=auto is to choose by memory."""
    checkpointing = model_section.enable_gradient_checkpointing
    if checkpointing is False:
        return "none"
    if model_section.remat_policy != "auto":
        return model_section.remat_policy
    return "full" if checkpointing else None


def check_run_config(model_section, trainer_section) -> None:
    """veRL's switch and jsft's policy must not contradict each other; trainer.device_memory must read."""
    from jsft.plan import parse_bytes

    if model_section.enable_gradient_checkpointing is True and model_section.remat_policy == "none":
        raise ValueError("model.enable_gradient_checkpointing=true contradicts model.remat_policy=none: "
                         "drop one of them (or set enable_gradient_checkpointing=false)")
    if trainer_section.device_memory is not None:
        try:
            parse_bytes(str(trainer_section.device_memory))
        except ValueError as e:
            raise ValueError(f"trainer.device_memory: {e}") from None


def device_memory(setting: Optional[str], devices) -> tuple[int, str]:
    """(bytes one device may use, where the figure comes from)."""
    from jsft.plan import parse_bytes

    if setting:
        return parse_bytes(setting), f"trainer.device_memory={setting}"
    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{devices[0].platform} bytes_limit"
    # CPU: no limit from jax; the RAM available now, shared by this host's (possibly fake) devices
    available = _available_ram()
    local = sum(1 for d in devices if d.process_index == devices[0].process_index)
    return available // local, f"host available RAM / {local} local device(s)"


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


def choose_for_run(cfg, model_cfg, mesh, budget: Optional[int] = None, update: bool = True) -> RematChoice:
    """Compile the run's step (jsft.plan) per candidate until one fits `budget` (default: HEADROOM x the
    device memory, the smallest of all hosts, so that every host takes the same choice). `update`: also
    compile the optimizer update (once, with the first candidate), as jsft.plan.plan_run."""
    from jsft import distributed
    from jsft.plan import plan_run

    if budget is None:
        memory, source = device_memory(cfg.trainer.device_memory, list(mesh.devices.flat))
        smallest = int(distributed.all_hosts([memory >> 20]).min())  # in MiB: all_hosts carries int32
        memory = min(memory, (smallest + 1) << 20)  # lowered only where another host has less
        budget, source = int(HEADROOM * memory), f"{HEADROOM:.0%} of {source}"
    else:
        source = "the given budget"
    update_temp, plans = {}, {}

    def peak_of(policy: str) -> int:
        plan, about = plan_run(cfg, model_cfg, mesh, policy, update=update and not update_temp)
        update_temp.setdefault("bytes", plan.update_temp)  # compiled with the first candidate only
        plan.update_temp = update_temp["bytes"]
        plans[policy] = plan, about
        return plan.peak

    choice = choose(peak_of, int(budget), source)
    # the very programs the run compiles: run_info and jsft.plan take them from here, no second compile
    choice.plan = plans[choice.policy]
    choice.step_memory = choice.plan[0].step_memory
    return choice


def resolve(cfg, model_cfg, mesh, log: Callable[[str], None]) -> tuple[str, Optional[RematChoice]]:
    """(the run's remat policy, the auto choice behind it or None when the config fixed it)."""
    policy = explicit_policy(cfg.model)
    if policy is not None:
        return policy, None
    choice = choose_for_run(cfg, model_cfg, mesh)
    log(choice.describe())
    return choice.policy, choice
