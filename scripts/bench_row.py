"""Where a jsft micro-step's time goes: one packed row of the bench workload under variants.

    python scripts/bench_row.py [--workdir D] [--workload chat|long_tail] [--sections row,step,tiles,ab,padding]
                                [--baseline-attention OLD_attention.py]

Builds (or reuses, in D) the workload of scripts/bench.py; one CPU device.
  row      the first packed row of the first step: the grad micro-step (median of 5) with logits at the
           targets (the default), at every position (trainer.shape_buckets=1), with the reference `xla`
           attention.
  step     one optimizer step of jsft's defaults split into host work (next batch, batch.prepare_step,
           device_batch), the micro-steps and the optimizer update, over a few steps.
  tiles    the grad of one layer's `blockwise` attention under tile edges x sub-tile splits, interleaved.
  ab       blockwise as it is against a previous attention.py (`git show REV:jsft/models/attention.py >
           old.py`), whole tiles for partly masked ones (PARTIAL_SPLIT=1) and one tile list for all rows
           (ROWS_APART=False), interleaved, on the defaults' first micro-batch: attention alone, micro-step.
  padding  padding efficiency of the steps under first- / best-fit decreasing packing, rows per
           micro-batch and bucket counts (host-side, computed), and one two-row micro-batch against its rows
           as two one-row micro-steps.
Prints MFU against a matmul peak probed before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import bench_workload as bench  # noqa: E402
import jsft.models as jm  # noqa: E402
from jsft.data.batch import BatchSpec, MicroBatch, WeightedRows, bucketed, fit_shapes, gather, prepare_step, shaped, weigh  # noqa: E402,E501
from jsft.data.pipeline import build_train_batches  # noqa: E402
from jsft.data.tokenizer import load_tokenizer  # noqa: E402
from jsft.models import attention, blockwise  # noqa: E402
from jsft.models.params import param_arrays  # noqa: E402
from jsft.sharding import make_mesh  # noqa: E402
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


def first_row(paths: dict, cfg) -> WeightedRows:
    data = build_train_batches(cfg.data, load_tokenizer(paths["tokenizer"]), seed=0, process_index=0,
                               process_count=1, local_devices=1)
    g = gather(next(data), data.layout)
    return weigh(g.micro_batches[0], g.counts, cfg.trainer.loss_agg_mode, cfg.data.max_length)


def rows_together(batch, data, cfg) -> list[MicroBatch]:
    """The step's micro-batches of one HostBatch with a micro-batch's rows kept together (fit_shapes'
    rows_per_device=1, as before row splits)."""
    g = gather(batch, data.layout)
    weighted = [weigh(r, g.counts, cfg.trainer.loss_agg_mode, cfg.data.max_length) for r in g.micro_batches]
    return fit_shapes(weighted, cfg.trainer.shape_buckets)


def step_variants(paths: dict, cfg, row: WeightedRows, peak: float) -> None:
    length = row.input_ids.shape[1]
    lengths = [int(n) for n in np.bincount(row.segment_ids[0])[1:] if n]
    targets = int((row.loss_weight != 0).sum())
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


def step_breakdown(paths: dict, cfg, steps: int = 4) -> None:
    """One optimizer step of the trainer's defaults (remat none, which `auto` picks for this model), split
    into its parts, each timed to completion: host work, micro-steps, the optimizer update; and, interleaved,
    the micro-steps with a micro-batch's rows kept together (fit_shapes' rows_per_device=1, as before)."""
    data = build_train_batches(cfg.data, load_tokenizer(paths["tokenizer"]), seed=0, process_index=0,
                               process_count=1, local_devices=1)
    mesh = make_mesh({"fsdp": -1})
    model = jm.from_pretrained(paths["model"], dtype="float32", mesh=mesh, remat_policy="none",
                               attention_impl=cfg.model.attention_impl)
    step = TrainStep(model, make_optimizer(cfg.optim, 100), mesh, chunk_size=cfg.trainer.loss_chunk_size)
    params = param_arrays(model)
    opt_state = step.init_opt_state(params)
    update = step.lower_update(params, opt_state).compile()
    spec = BatchSpec(data.layout, cfg.data.max_length, cfg.trainer.loss_agg_mode, cfg.trainer.shape_buckets)
    print(f"step         one optimizer step of the defaults ({cfg.data.micro_batch_size_per_gpu} rows per "
          f"micro-batch), its steps run twice, the first pass compiles (not shown):")
    rows = []
    batches_of_steps = [next(data) for _ in range(steps)]
    for s, batch in enumerate(batches_of_steps + batches_of_steps):  # the first pass compiles every shape
        t0 = time.perf_counter()
        g = prepare_step(batch, spec)
        batches = jax.block_until_ready([step.device_batch(mb) for mb in g.micro_batches])
        host = time.perf_counter() - t0
        together = [step.device_batch(mb) for mb in rows_together(batch, data, cfg)]
        jax.block_until_ready(step.gradients(params, together))
        train, frozen = step.split(params)
        t = time.perf_counter()
        _, grads = jax.block_until_ready(step.gradients(params, batches))
        micro = time.perf_counter() - t
        t = time.perf_counter()
        jax.block_until_ready(step.gradients(params, together))
        kept = time.perf_counter() - t
        t = time.perf_counter()
        train, opt_state, stats = jax.block_until_ready(update(train, opt_state, grads))
        upd = time.perf_counter() - t
        params = {**frozen, **train}
        if s < steps:
            continue  # compiles
        total = host + micro + upd
        rows.append((host, micro, upd, total, kept))
        shape = lambda bs: " ".join(f"{b.input_ids.shape[0]}x{b.input_ids.shape[1]}" for b in bs)  # noqa: E731
        print(f"  step {s - steps + 1}: host {host * 1e3:.0f} ms, {len(batches)} micro-steps {micro:.2f} s ({shape(batches)}), "
              f"update {upd * 1e3:.0f} ms; total {total:.2f} s. Rows kept together: {len(together)} micro-steps "
              f"{kept:.2f} s ({shape(together)})")
    host, micro, upd, total, kept = (statistics.median(c) for c in zip(*rows))
    print(f"  median: host {host * 1e3:.0f} ms ({host / total:.1%}), micro-steps {micro:.2f} s ({micro / total:.1%}), "
          f"update {upd * 1e3:.0f} ms ({upd / total:.1%}) of {total:.2f} s; rows kept together {kept:.2f} s "
          f"(micro-steps now {micro / kept:.2f}x)")


def attention_tiles(model_cfg, segments=(1100, 600, 300), length: int = 2048, rounds: int = 5) -> None:
    """Tile edge x sub-tile split of partly masked tiles (blockwise.PARTIAL_SPLIT), interleaved; with the
    area each visits (in units of the visible area)."""
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
    visible = int(np.asarray(attention.attention_mask(seg, seg, pos, pos)).sum())
    print(f"attention    grad of one layer's blockwise attention, samples {list(segments)} in {length} columns "
          f"(visible {visible / length**2:.0%} of [T, T]), medians of {rounds} interleaved rounds:")
    fns, area = {}, {}
    saved = blockwise.PARTIAL_SPLIT, blockwise.MIN_SUB_TILE
    for block, split in [(256, 1), (256, 2), (256, 4), (512, 2), (512, 4), (128, 1), (128, 2)]:
        blockwise.PARTIAL_SPLIT, blockwise.MIN_SUB_TILE = split, 32
        grad = jax.jit(jax.grad(lambda q, k, v: attention.blockwise_attention(  # noqa: B023
            q, k, v, seg, seg, pos, pos, block=block).sum(), argnums=(0, 1, 2)))
        jax.block_until_ready(grad(q, k, v))  # traced under this split
        name = f"{block} / split {split}"
        fns[name] = partial(grad, q, k, v)
        _, n_full, _, n_part = blockwise._live_pairs((seg, seg, pos, pos, blockwise.window_data(None)), block, block, split)
        area[name] = (int(n_full) * block**2 + int(n_part) * (block // split) ** 2) / visible
    blockwise.PARTIAL_SPLIT, blockwise.MIN_SUB_TILE = saved
    for name, t in _interleaved(fns, rounds).items():
        print(f"  tiles {name:<14} visits {area[name]:.2f}x the visible area: {t * 1e3:.0f} ms")


def _load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _variant(name: str, old):
    """Trace-time switch of `blockwise` (read when a jitted function first runs): the current code,
    partly masked tiles whole, or a previous attention.py's blockwise_attention."""
    saved = attention.blockwise_attention, blockwise.PARTIAL_SPLIT, blockwise.ROWS_APART
    if name == "before":
        attention.blockwise_attention = old.blockwise_attention
    elif name == "whole tiles":
        blockwise.PARTIAL_SPLIT = 1
    elif name == "one tile list":
        blockwise.ROWS_APART = False
    try:
        yield
    finally:
        attention.blockwise_attention, blockwise.PARTIAL_SPLIT, blockwise.ROWS_APART = saved


def _interleaved(fns: dict, rounds: int) -> dict:
    """Median seconds per variant, the variants run in turn each round so that load hits all alike."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def attention_ab(paths: dict, cfg, baseline: str | None, rounds: int = 5) -> None:
    """`cfg`'s first micro-batch (the defaults: two packed rows) under each blockwise variant."""
    old = _load_module(baseline, "attention_before") if baseline else None
    names = (["before"] if old else []) + ["whole tiles", "one tile list", "current"]
    data = build_train_batches(cfg.data, load_tokenizer(paths["tokenizer"]), seed=0, process_index=0,
                               process_count=1, local_devices=1)
    mb = rows_together(next(data), data, cfg)[0]
    model_cfg = jm.ModelConfig.from_pretrained(paths["model"])
    rows, length = mb.input_ids.shape
    seg, pos = mb.segment_ids, mb.positions
    lengths = [[int(n) for n in np.bincount(r)[1:] if n] for r in seg]
    n, kh, h = model_cfg.num_heads, model_cfg.num_kv_heads, model_cfg.head_dim
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (rows, length, n, h))
    k, v = (jax.random.normal(x, (rows, length, kh, h)) for x in keys[1:])
    attn, steps = {}, {}
    mesh = make_mesh({"fsdp": -1})
    for name in names:
        with _variant(name, old):
            f = jax.jit(jax.grad(lambda q, k, v: attention.blockwise_attention(q, k, v, seg, seg, pos, pos).sum(),
                                 argnums=(0, 1, 2)))
            jax.block_until_ready(f(q, k, v))
            attn[name] = partial(f, q, k, v)
            model = jm.from_pretrained(paths["model"], dtype="float32", mesh=mesh, remat_policy="none",
                                       attention_impl="blockwise")
            step = TrainStep(model, make_optimizer(cfg.optim, 10), mesh, chunk_size=cfg.trainer.loss_chunk_size)
            params, batch = param_arrays(model), step.device_batch(mb)
            jax.block_until_ready(step.gradients(params, [batch]))
            steps[name] = partial(step.gradients, params, [batch])
    print(f"ab           blockwise variants on the first micro-batch (rows of samples {lengths}, {length} columns), "
          f"medians of {rounds} interleaved rounds:")
    for label, fns in (("attention grad, one layer", attn), ("grad micro-step", steps)):
        med = _interleaved(fns, rounds)
        base = med[names[0]]
        print(f"  {label:<26} " + ", ".join(f"{k} {med[k] * 1e3:.0f} ms ({med[k] / base:.2f}x)" for k in names))


def _pack(lengths: list[int], row: int, best: bool) -> list[int]:
    """Fill of each row after first-fit (or best-fit) decreasing packing of these sample lengths."""
    rows: list[int] = []
    for n in sorted(lengths, reverse=True):
        fits = [i for i, used in enumerate(rows) if used + n <= row]
        if not fits:
            rows.append(n)
            continue
        rows[min(fits, key=lambda i: row - rows[i]) if best else fits[0]] += n
    return rows


def _efficiency(steps: list[list[int]], row: int, best: bool, per_micro: int, buckets: int, split: bool = False):
    """(real / computed tokens, micro-steps per step); split: a micro-batch becomes one-row micro-batches
    where that computes fewer columns."""
    real = computed = micro = 0
    for lengths in steps:
        rows = _pack(lengths, row, best)
        for m in range(0, len(rows), per_micro):
            group = rows[m : m + per_micro]
            whole = per_micro * bucketed(max(group), row, buckets)
            apart = sum(bucketed(r, row, buckets) for r in group)
            computed += min(whole, apart) if split else whole
            micro += len(group) if split and apart < whole else 1
        real += sum(lengths)
    return real / computed, micro / len(steps)


def padding(paths: dict, cfg, w, rounds: int = 5) -> None:
    data = build_train_batches(cfg.data, load_tokenizer(paths["tokenizer"]), seed=0, process_index=0,
                               process_count=1, local_devices=1)
    batches = [next(data) for _ in range(w.warmup_steps + w.steps)]
    steps = [[int(n) for mb in b.micro_batches for r in mb.segment_ids for n in np.bincount(r)[1:] if n]
             for b in batches]
    row = cfg.data.max_length
    print(f"padding      real / computed tokens over {len(steps)} steps of {len(steps[0])} samples, rows of {row}:")
    for per_micro in (1, 2):
        for best in (False, True):
            figures = ", ".join(f"{b} buckets {_efficiency(steps, row, best, per_micro, b)[0]:.1%}" for b in (4, 8, 16))
            print(f"  {'best' if best else 'first'}-fit decreasing, {per_micro} rows per micro-batch: {figures}")
    for b in (4, 8):
        eff, micro = _efficiency(steps, row, False, 2, b, split=True)
        print(f"  first-fit, 2 rows split into 1-row micro-batches where fewer columns, {b} buckets: {eff:.1%} "
              f"({micro:.2f} micro-steps per step)")
    mb = rows_together(batches[0], data, cfg)[0]
    mesh = make_mesh({"fsdp": -1})
    model = jm.from_pretrained(paths["model"], dtype="float32", mesh=mesh, remat_policy="none",
                               attention_impl="blockwise")
    step = TrainStep(model, make_optimizer(cfg.optim, 10), mesh, chunk_size=cfg.trainer.loss_chunk_size)
    params = param_arrays(model)
    whole = [step.device_batch(mb)]
    apart = [step.device_batch(jax.tree.map(lambda x: x[r : r + 1], mb)) for r in range(len(mb.input_ids))]  # noqa: B023
    fns = {"one micro-batch": partial(step.gradients, params, whole),
           "one per row": partial(step.gradients, params, apart)}
    for fn in fns.values():
        jax.block_until_ready(fn())
    med = _interleaved(fns, rounds)
    print(f"  the first micro-batch {mb.input_ids.shape} as one micro-step {med['one micro-batch']:.2f} s, "
          f"one per row {med['one per row']:.2f} s (medians of {rounds} interleaved rounds)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="a bench workload directory (built there when absent)")
    p.add_argument("--workload", choices=sorted(bench.WORKLOADS), default="chat")
    p.add_argument("--sections", default="row,step,tiles", help="comma-separated: row, step, tiles, ab, padding")
    p.add_argument("--baseline-attention", help="ab: a previous jsft/models/attention.py to compare against")
    args = p.parse_args()
    sections = set(args.sections.split(","))
    w = bench.WORKLOADS[args.workload]
    workdir, paths = bench.workdir_workload(args.workdir, "jsft-bench-row-", w)
    before = measured_matmul_flops("float32")
    print(f"matmul peak  {before / 1e9:.0f} GFLOP/s (probed before); workload {w.name}")
    if "row" in sections:
        cfg = bench.jsft_config(paths, w, workdir)
        step_variants(paths, cfg, first_row(paths, cfg), before)
    if "step" in sections:
        step_breakdown(paths, bench.jsft_config(paths, w, workdir, "defaults"))
    if "ab" in sections:
        attention_ab(paths, bench.jsft_config(paths, w, workdir, "defaults"), args.baseline_attention)
    if "padding" in sections:
        padding(paths, bench.jsft_config(paths, w, workdir, "defaults"), w)
    if "tiles" in sections:
        attention_tiles(jm.ModelConfig.from_pretrained(paths["model"]))
    print(f"matmul peak  {measured_matmul_flops('float32') / 1e9:.0f} GFLOP/s (probed after)")


if __name__ == "__main__":
    main()
