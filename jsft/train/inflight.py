"""An optimizer step that has been dispatched but not read yet: the loop's async pipeline.

JAX dispatches asynchronously: `TrainStep.train_step_stats` returns as soon as the device has its programs,
with the loss, gradient norm and new optimizer state as arrays that are still being computed. The loop dispatches
step N, and only then reads step N-1 (already finished, so reading costs nothing), logs it, and prepares
batch N+1 on the host while the device works on step N. The device waits for the host only when the host's
work per step (metrics, logging, stop checks, packing and transfer of the next batch) outlasts the step.

A step's figures are read once (`read`); its step number and values are those of that step, one loop
iteration later than they were dispatched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import jax


@dataclass
class InFlightStep:
    step: int
    started: float  # perf_counter when the host began preparing this step's batch
    device: dict  # name -> jax.Array, not yet read (reading blocks until the step is done)
    host: dict  # figures known on the host at dispatch: counts, ratios, shapes
    tokens: int
    flops: float
    extra: dict = field(default_factory=dict)  # added before reading, e.g. validation metrics
    done: Optional[float] = None  # perf_counter when the step was seen done (wait)
    dispatch_begin: Optional[float] = None  # perf_counter when its device work began to be dispatched
    was_ready: bool = False  # already done when first waited on: `done` is then only an upper bound

    @classmethod
    def dispatched(cls, step: int, started: float, loss, stats: dict, host: dict, tokens: int,
                   flops: float, dispatch_begin: Optional[float] = None) -> "InFlightStep":
        """stats: TrainStep.train_step_stats' (its own arrays, not views of the donated optimizer state)."""
        device = {"train/loss": loss, **{f"train/{k}": v for k, v in stats.items() if k != "consecutive_skips"},
                  "consecutive_skips": stats["consecutive_skips"]}
        return cls(step, started, device, host, tokens, flops, dispatch_begin=dispatch_begin)

    def wait(self) -> None:
        """Block until the step is done and note when: later host work (validation) is not step time."""
        if self.done is None:
            self.was_ready = all(x.is_ready() for x in jax.tree.leaves(self.device))
            jax.block_until_ready(self.device)
            self.done = time.perf_counter()

    def end_for(self, following: Optional["InFlightStep"]) -> Optional[float]:
        """When the device may have started `following` (dispatched before this step was read): this step's
        end, but no later than `following`'s dispatch if this step was already done when read (its `done`
        is then late). So a step's time is never shorter than its device time: MFU never above the truth."""
        if following is None or following.dispatch_begin is None or not self.was_ready:
            return self.done
        return min(self.done, following.dispatch_begin)

    def read(self, previous_done: Optional[float], peak_flops: Optional[float]) -> tuple[dict, int, float]:
        """(metrics, consecutive non-finite steps, time the step was seen done). Blocks until the step is done.
        The step time runs from the later of this step's start and the previous step's end: with the
        pipeline full, successive steps' ends are one device step apart."""
        self.wait()
        values = jax.device_get(self.device)
        done = self.done
        dt = done - max(self.started, previous_done or self.started)
        skips = int(values.pop("consecutive_skips"))
        metrics = {
            **{k: float(v) for k, v in values.items()},
            "train/skipped_steps": int(values["train/skipped_steps"]),
            **self.host,
            "train/tokens_per_sec": self.tokens / dt,
            "train/mfu": self.flops / dt / peak_flops if peak_flops else None,  # None: a device of unknown peak
            "train/step_time": dt,
            **self.extra,
        }
        return metrics, skips, done
