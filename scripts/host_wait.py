"""How long the device waits for the host between optimizer steps, measured on the real training loop.

    python scripts/host_wait.py [--steps 12] [--workdir DIR] [key=value ...]

Runs `jsft.train` (the built-in demo job, shortened) with two probes around `TrainStep`: the time each step's
first program is dispatched (`gradients` is entered), and, from a watcher thread, the time its update has
finished on the device (`block_until_ready` on the update's small, never-donated outputs). The device's
wait before step N is  max(0, dispatch(N) - done(N-1)): the host was still preparing step N after the
device had finished N-1. Printed as median / mean / max over the steps after the first two (compiles).

Works on any jsft revision whose `TrainStep` has `gradients` and `_apply`, so the same script measures the
loop before and after a change (run it with PYTHONPATH pointing at either checkout).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path


def probe(step_cls) -> dict:
    """Patch TrainStep to record dispatch and completion times; returns the dict they are written to."""
    import jax

    times = {"dispatch": [], "done": []}
    watch: list = []
    cond = threading.Condition()

    def watcher():
        while True:
            with cond:
                while not watch:
                    cond.wait()
                outputs = watch.pop(0)
            jax.block_until_ready(outputs)
            times["done"].append(time.perf_counter())

    threading.Thread(target=watcher, daemon=True).start()  # a daemon: it ends with the process
    original_gradients, original_init = step_cls.gradients, step_cls.__init__

    def gradients(self, params, micro_batches):
        times["dispatch"].append(time.perf_counter())
        return original_gradients(self, params, micro_batches)

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        apply = self._apply

        def watched_apply(*a):
            out = apply(*a)
            with cond:
                watch.append(out[2])  # grad norm / step stats: fresh outputs, never donated
                cond.notify()
            return out

        self._apply = watched_apply

    step_cls.gradients, step_cls.__init__ = gradients, init
    return times


def gaps(times: dict, skip: int = 2) -> list[float]:
    d, e = times["dispatch"], times["done"]
    return [max(0.0, d[n] - e[n - 1]) for n in range(max(1, skip), min(len(d), len(e) + 1))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--workdir", help="run directory (default: a temporary one)")
    parser.add_argument("--label", default="", help="a name for the printed result")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from jsft.config import DEFAULT_CONFIG, load_config
    from jsft.train import loop
    from jsft.train.step import TrainStep

    workdir = args.workdir or tempfile.mkdtemp(prefix="host_wait_")
    overrides = [
        f"trainer.default_local_dir={workdir}", f"trainer.total_training_steps={args.steps}", "trainer.export_hf=false",
        "trainer.test_freq=-1", "demo.num_train=400", "demo.num_val=2", "demo.max_new_tokens=8", *args.overrides,
    ]
    times = probe(TrainStep)
    loop.train(load_config(DEFAULT_CONFIG, overrides))
    time.sleep(0.5)  # the watcher records the last step
    g = gaps(times)
    steps = [json.loads(line) for line in open(Path(workdir) / "metrics.jsonl")]
    step_times = [s["train/step_time"] for s in steps[2:]]
    result = {
        "label": args.label, "steps_measured": len(g),
        "device_wait_ms": {"median": 1e3 * statistics.median(g), "mean": 1e3 * statistics.mean(g), "max": 1e3 * max(g)},
        "step_time_s_median": statistics.median(step_times),
    }
    print("HOST_WAIT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
