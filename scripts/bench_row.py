"""Where a jsft micro-step's time goes: one packed row of the bench workload under variants.

    python scripts/bench_row.py [--workdir D]

Builds (or reuses, in D) the workload of scripts/bench.py, takes the first packed row of its first step
and times the grad micro-step (median of 5, one CPU device) with logits at the targets (the trainer's
default), at every position (trainer.shape_buckets=1) and with the reference `xla` attention; then the
grad of `blockwise` attention alone for one layer under several tile shapes. Prints MFU against a matmul
peak probed before and after.
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
import numpy as np  # noqa: E402

import bench_workload as bench  # noqa: E402
import jsft.models as jm  # noqa: E402
from jsft.data.pipeline import build_train_batches  # noqa: E402
from jsft.data.tokenizer import load_tokenizer  # noqa: E402
from jsft.models import attention  # noqa: E402
from jsft.models.params import param_arrays  # noqa: E402
from jsft.sharding import make_mesh  # noqa: E402
from jsft.train.batch import attach_weights, bucketed, gather_step, shaped  # noqa: E402
from jsft.train.optim import make_optimizer  # noqa: E402
from jsft.train.perf import measured_matmul_flops  # noqa: E402
from jsft.train.step import TrainStep  # noqa: E402


def median_time(fn, repeats: int = 5) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def first_row(paths: dict, cfg) -> dict:
    data = build_train_batches(cfg.data, load_tokenizer(paths["tokenizer"]), seed=0, process_index=0,
                               process_count=1, local_devices=1)
    g = gather_step(next(data), data.empty_micro_batch())
    attach_weights(g.micro_batches, cfg.trainer.loss_agg_mode, samples=g.samples, targets=g.target_tokens,
                   max_length=cfg.data.max_length)
    return g.micro_batches[0]


def step_variants(paths: dict, cfg, row: dict, peak: float) -> None:
    length = row["input_ids"].shape[1]
    lengths = [int(n) for n in np.bincount(row["segment_ids"][0])[1:] if n]
    targets = int((row["loss_weight"] != 0).sum())
    capacity = bucketed(targets, length, cfg.trainer.shape_buckets)
    mesh = make_mesh({"fsdp": -1})
    model_cfg = jm.ModelConfig.from_pretrained(paths["model"])
    flops = bench.sample_flops(model_cfg, lengths)
    print(f"row          {sum(lengths)} real tokens in {length} columns, samples {lengths}, {targets} targets; "
          f"{flops / 1e9:.0f} model GFLOPs")
    for impl, slots, label in [
        ("blockwise", capacity, f"logits at the targets (capacity {capacity}), blockwise attention"),
        ("blockwise", length, "logits at every position (trainer.shape_buckets=1)"),
        ("xla", capacity, "reference xla attention"),
    ]:
        model = jm.from_pretrained(paths["model"], dtype="float32", mesh=mesh, remat_policy="none", attention_impl=impl)
        step = TrainStep(model, make_optimizer(cfg.optim, 10), mesh, chunk_size=cfg.trainer.loss_chunk_size)
        params, batch = param_arrays(model), step.device_batch(shaped(row, length, slots))
        s = median_time(lambda: step.gradients(params, [batch])[0])  # noqa: B023
        print(f"  {label:<62} {s:.2f} s/row, MFU {flops / s / peak:.0%}")


def attention_tiles(model_cfg, segments=(1100, 600, 300), length: int = 2048) -> None:
    seg = np.zeros((1, length), np.int32)
    pos = np.zeros((1, length), np.int32)
    start = 0
    for i, n in enumerate(segments, 1):
        seg[0, start : start + n], pos[0, start : start + n] = i, np.arange(n)
        start += n
    n, kh, h = model_cfg.num_heads, model_cfg.num_kv_heads, model_cfg.head_dim
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (1, length, n, h))
    k, v = (jax.random.normal(x, (1, length, kh, h)) for x in keys[1:])
    print(f"attention    grad of one layer's blockwise attention, samples {list(segments)} in {length} columns:")
    for bq, bk in [(256, 256), (256, 128), (128, 256), (128, 128), (512, 256)]:
        grad = jax.jit(jax.grad(lambda q, k, v: attention.blockwise_attention(  # noqa: B023
            q, k, v, seg, seg, pos, pos, block=(bq, bk)).sum(), argnums=(0, 1, 2)))
        print(f"  tiles {bq} x {bk}: {median_time(lambda: grad(q, k, v)) * 1e3:.0f} ms")  # noqa: B023


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="a bench workload directory (built there when absent)")
    args = p.parse_args()
    w = bench.Workload()
    workdir, paths = bench.workdir_workload(args.workdir, "jsft-bench-row-", w)
    cfg = bench.jsft_config(paths, w, workdir)
    before = measured_matmul_flops("float32")
    print(f"matmul peak  {before / 1e9:.0f} GFLOP/s (probed before)")
    step_variants(paths, cfg, first_row(paths, cfg), before)
    attention_tiles(jm.ModelConfig.from_pretrained(paths["model"]))
    print(f"matmul peak  {measured_matmul_flops('float32') / 1e9:.0f} GFLOP/s (probed after)")


if __name__ == "__main__":
    main()
