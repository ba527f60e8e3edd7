"""CPU step time of a tiny model on one long packed row with sequence parallelism (S = 1, 2, 4).

    python scripts/seqpar_step_time.py --length 16384 --sizes 1 2 4 [--mode ulysses|ring] [--profile DIR]
                                       [--layers 2 --hidden 128 --heads 8 --kv-heads 2]

8 fake CPU devices; one row per sequence group (rows = 8 / S), as the trainer lays out
micro_batch_size_per_gpu=1: S=1 runs 8 rows of T tokens (one per device), S=4 two rows split over 4
devices each (T/4 tokens per device). Prints the median grad-step time and tokens/s per S and, with --profile, the seconds per device spent in all-to-all ops (from the profiler trace).
--mode ring: ring attention on zigzag rows (trainer.sequence_parallel=ring); --profile then sums its
ppermute ops (the KV hops; on CPU this includes waiting for the neighbour) instead.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jsft.config import OptimConfig  # noqa: E402
from jsft.data.batch import WeightedRows, shaped, zigzag_rows  # noqa: E402
from jsft.models.config import ModelConfig  # noqa: E402
from jsft.models.params import init_model, param_arrays  # noqa: E402
from jsft.sharding import make_mesh  # noqa: E402
from jsft.train.optim import make_optimizer  # noqa: E402
from jsft.train.step import TrainStep  # noqa: E402


def model_config(layers: int = 2, hidden: int = 128, heads: int = 8, kv_heads: int = 2) -> ModelConfig:
    return ModelConfig.from_init(dict(
        model_type="qwen2", vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1 << 16,
    ))


def long_rows(rows: int, length: int, seed: int = 0):
    """`rows` rows, each ONE sample of `length` tokens with the second half as targets (a long conversation)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 512, (rows, length)).astype(np.int32)
    weight = np.zeros((rows, length), np.float32)
    weight[:, length // 2:] = 1.0 / (rows * (length - length // 2))
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape).copy()
    return shaped(WeightedRows(ids, np.ones_like(ids), positions, weight), length, length)


def step_for(s: int, length: int, cfg: ModelConfig, mode: str = "ulysses"):
    mesh = make_mesh({"sequence": s})
    model = init_model(cfg, seed=0, mesh=mesh, remat_policy="full", attention_impl="blockwise",
                       sequence_parallel=mode)
    step = TrainStep(model, make_optimizer(OptimConfig(), 10), mesh, chunk_size=512)
    rows = long_rows(8 // s, length)
    batch = step.device_batch(zigzag_rows(rows, s) if mode == "ring" and s > 1 else rows)
    return step, param_arrays(model), batch


def all_to_all_seconds(trace_dir: Path, op: str = "all-to-all") -> float:
    """Seconds per device in `op` ops: their trace events summed over the 8 devices' threads, / 8."""
    total = 0.0
    for path in trace_dir.rglob("*.trace.json.gz"):
        for ev in json.load(gzip.open(path))["traceEvents"]:
            if ev.get("ph") == "X" and ev.get("name", "").startswith(op):
                total += ev.get("dur", 0.0)
    return total / 1e6 / 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", type=Path, default=None)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--mode", choices=["ulysses", "ring"], default="ulysses", help="trainer.sequence_parallel")
    args = ap.parse_args()
    cfg = model_config(args.layers, args.hidden, args.heads, args.kv_heads)
    for s in args.sizes:
        step, params, batch = step_for(s, args.length, cfg, args.mode)
        t0 = time.perf_counter()
        jax.block_until_ready(step.gradients(params, [batch]))  # compile + first run
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(step.gradients(params, [batch]))
            times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        line = (f"{args.mode} S={s}: rows {8 // s} x {args.length}, grad step {median:.2f} s, "
                f"{8 // s * args.length / median:.0f} tokens/s (first {compile_s:.1f} s)")
        if args.profile is not None and s > 1:
            out = args.profile / f"s{s}"
            with jax.profiler.trace(str(out)):
                jax.block_until_ready(step.gradients(params, [batch]))
            op = "ppermute" if args.mode == "ring" else "all-to-all"  # the ops' names in the trace
            line += f", {op} {all_to_all_seconds(out, op):.3f} s per device (profiled step)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
