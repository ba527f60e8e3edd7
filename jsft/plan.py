"""Will this run fit? Per-device memory of the train step, compiled from abstract shapes before any download.

    python -m jsft.plan [--config C] [key=value ...] [--device-memory 80GB] [--devices N] [--preset NAME]

No weight is read and no array is allocated: the model comes from `model.path`'s config.json (or
`model.init`, or `--preset`), parameters, optimizer state and the micro-batch are `jax.ShapeDtypeStruct`s
with the shardings the trainer uses on the configured mesh (`trainer.mesh`), and XLA compiles the real
micro-step (forward + backward + gradient accumulation) and optimizer update. Printed per device:
parameters, optimizer state, gradient accumulator, the micro-step's temporaries (activations), the
update's temporaries, and the peak, then whether the peak fits `--device-memory` x `--mem-fraction`
(JAX preallocates 75% of a GPU by default). Exit status 0 when it fits, 1 when it does not.
model.remat_policy=auto (the default) is resolved as the trainer resolves it (jsft/train/remat.py), against
that budget when given: the first line then says e.g. `remat auto -> dots_saveable`.

The planning itself is jsft/train/planner.py (on the run's set-up, jsft/train/setup.py); this is its command.
On a CPU host, `--devices N` fakes N devices (jax_num_cpu_devices) so an 8-GPU mesh can be planned on a laptop; the
figures are then XLA:CPU's buffer assignment, an estimate of a GPU's (fusion choices differ). On the GPU
host itself they are exact. A mixture of experts is planned on CPU with a stand-in of ragged_dot's shapes
for its grouped matmuls (the `moe` line says so; jsft/train/planner.py says why).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import jax

from jsft.config import load_config, parse_bytes
from jsft.train import planner, setup
from jsft.train.planner import PRESETS, Plan, report


def make_plan(cfg, update: bool = True, budget: Optional[int] = None) -> tuple[Plan, dict]:
    """(Plan, description) of a run config on this process's devices (planner.plan_memory for `update`).
    model.remat_policy=auto is resolved as the trainer does, against `budget` when given."""
    kernel = planner.planning_moe_kernel()  # a mixture of experts: GPU-shaped grouped matmuls on a CPU host
    run = setup.resolve(cfg, tokenizer=False, budget=budget, update=update, moe_kernel=kernel)  # raises before compiling
    if run.remat_choice is not None:  # auto: the chosen candidate's plan, compiled while choosing
        plan, about = run.remat_choice.plan
        about = {**about, "remat": f"auto -> {run.remat_policy}"}
    else:
        plan, about = planner.plan_run(run, run.remat_policy, update=update, moe_kernel=kernel)
    return plan, {**about, "why": run.mesh_reason}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jsft.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML run config")
    parser.add_argument("--device-memory", help="memory of one device, e.g. 80GB; omit to only print the plan")
    parser.add_argument("--mem-fraction", type=float, default=0.75,
                        help="share of device memory jax may use (its GPU default preallocation: 0.75)")
    parser.add_argument("--devices", type=int, help="CPU only: plan for N fake devices")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="plan a known model without a checkpoint")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.max_length=4096")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    if args.devices:  # before jax starts a backend (nothing has touched the devices yet)
        jax.config.update("jax_num_cpu_devices", args.devices)
    overrides = list(args.overrides)
    if args.preset:
        overrides.append(f"model.init={_yaml_inline(PRESETS[args.preset])}")
    try:
        cfg = load_config(args.config, overrides)
        budget = parse_bytes(args.device_memory) * args.mem_fraction if args.device_memory else None
        plan, about = make_plan(cfg, budget=budget)
    except (ValueError, FileNotFoundError) as e:
        print(f"plan error: {e}", file=sys.stderr)
        return 2
    print(report(plan, about, budget))
    return 0 if budget is None or plan.peak <= budget else 1


def _yaml_inline(fields: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "}"


if __name__ == "__main__":
    sys.exit(main())
