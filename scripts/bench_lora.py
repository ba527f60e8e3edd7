"""LoRA against full fine-tuning on the bench workload: CPU step time side by side, and memory per device.

    python scripts/bench_lora.py [--workdir D] [--rank 16] [--repeats 5]

Builds (or reuses, in D) the workload of scripts/bench.py, takes the first packed row of its first step
and times one whole optimizer step (grad micro-step + update, one CPU device, fp32, no remat) of full
fine-tuning and of LoRA r=`rank` on all linear projections, the two interleaved (full, LoRA, full, ...)
so that load from other work hits both alike; medians. Then jsft.plan's per-device figures of both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402

import bench_workload as bench  # noqa: E402
import jsft.models as jm  # noqa: E402
from bench_row import first_row  # noqa: E402
from jsft.data.batch import bucketed, shaped  # noqa: E402
from jsft.models import lora  # noqa: E402
from jsft.models.params import abstract_model, param_arrays  # noqa: E402
from jsft.train.planner import plan_memory  # noqa: E402
from jsft.sharding import make_mesh  # noqa: E402
from jsft.train.optim import make_optimizer  # noqa: E402
from jsft.train.step import TrainStep  # noqa: E402


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="a bench workload directory (built there when absent)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    w = bench.Workload()
    workdir, paths = bench.workdir_workload(args.workdir, "jsft-bench-lora-", w)
    cfg = bench.jsft_config(paths, w, workdir)
    row = first_row(paths, cfg)
    length = row.input_ids.shape[1]
    batch_np = shaped(row, length, bucketed(int((row.loss_weight != 0).sum()), length, cfg.trainer.shape_buckets))
    mesh = make_mesh({"fsdp": -1})
    spec = lora.LoraSpec(rank=args.rank, alpha=2.0 * args.rank, targets=lora.TARGET_MODULES)
    base = jm.from_pretrained(paths["model"], dtype="float32", mesh=mesh, remat_policy="none")
    variants = {"full": base, f"lora r={args.rank}": lora.attach(base, spec, mesh=mesh)}
    runs = {}
    for name, model in variants.items():
        step = TrainStep(model, make_optimizer(cfg.optim, 100), mesh, chunk_size=cfg.trainer.loss_chunk_size)
        params = jax.tree.map(jax.numpy.copy, param_arrays(model))  # the update donates them; the base is shared
        state = {"params": params, "opt": step.init_opt_state(params)}
        batch = step.device_batch(batch_np)

        def one(step=step, state=state, batch=batch):
            state["params"], state["opt"], loss, _ = step.train_step_stats(state["params"], state["opt"], [batch])
            return loss

        t = time.perf_counter()
        jax.block_until_ready(one())
        print(f"{name:<12} compile + first step {time.perf_counter() - t:.1f} s")
        runs[name] = (one, [])
    for _ in range(args.repeats):
        for one, times in runs.values():
            t = time.perf_counter()
            jax.block_until_ready(one())
            times.append(time.perf_counter() - t)
    print(f"one optimizer step on a [1, {length}] packed row ({int((row['segment_ids'] > 0).sum())} real tokens), "
          f"median of {args.repeats}, interleaved:")
    for name, (_, times) in runs.items():
        print(f"  {name:<12} {statistics.median(times):.2f} s  (all: {', '.join(f'{x:.2f}' for x in times)})")
    print("jsft.plan, per device (1 CPU device, the largest micro-batch):")
    optimizer = make_optimizer(cfg.optim, 1)
    for name, spec_or_none in (("full", None), (f"lora r={args.rank}", spec)):
        model = abstract_model(base.config, dtype="float32", remat_policy="none", lora=spec_or_none)
        plan = plan_memory(model, optimizer, mesh, rows=1, row_length=length, chunk_size=cfg.trainer.loss_chunk_size)
        print(f"  {name:<12} trainable {plan.trainable_count / 1e6:.2f}M, params {_mib(plan.params)}, "
              f"optimizer {_mib(plan.opt_state)}, gradient accumulator {_mib(plan.grad_accumulator)}, "
              f"step temporaries {_mib(plan.step_temp)}, peak {_mib(plan.peak)}")


if __name__ == "__main__":
    main()
