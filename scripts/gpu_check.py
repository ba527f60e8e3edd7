"""One prepared check of jsft's accelerator path: attention parity, train-step speed and memory.

    python scripts/gpu_check.py [--out DIR] [--presets qwen2.5-0.5b,qwen2.5-1.5b] [--impls auto,cudnn]
                                [--rows 8] [--length 4096] [--steps 5] [--budget-s 360]
    python scripts/gpu_check.py --cpu-smoke      # tiny shapes on CPU, Pallas kernels interpreted (CI)

Sized to finish in under 8 minutes on one H100/H200. Writes DIR/gpu_check.json and DIR/gpu_check.md (rows
for BENCHMARKS.md) and prints both:

  1. attention parity: every packed-attention implementation of this backend (pallas_gpu and cudnn on a
     GPU, splash on a TPU; pallas_gpu and splash interpreted with --cpu-smoke) against the fp32 reference
     `xla_attention`, forward and backward, on packed bf16 rows (several samples, padding, GQA);
  2. a bf16 train step (fp32 parameters and AdamW, random init from `jsft.plan` presets) on rows of
     `--length` tokens packed with samples of 200-1500 tokens, for each preset and attention
     implementation: compile time, tokens/s, MFU (jsft.train.perf peaks), the device's peak memory
     against `jsft.plan`'s prediction for the same step.

Cases run in order and stop starting new ones once `--budget-s` has passed (recorded as skipped), so the
check always finishes and writes what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOKE_MODEL = dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


def packed_rows(rows: int, length: int, lengths: tuple[int, int], seed: int):
    """segment_ids, positions [rows, length] int32: samples of random lengths back to back, the tail padding."""
    import numpy as np

    rng = np.random.default_rng(seed)
    seg, pos = np.zeros((rows, length), np.int32), np.zeros((rows, length), np.int32)
    for r in range(rows):
        start, s = 0, 1
        while start < length:
            n = int(rng.integers(*lengths))
            if start + n > length:
                n = length - start if s == 1 else 0
            if n == 0:
                break
            seg[r, start:start + n], pos[r, start:start + n] = s, np.arange(n)
            start, s = start + n, s + 1
    return seg, pos


# ---- 1. attention parity ---------------------------------------------------------------------------------------


def attention_inputs(*, length: int, heads: int, kv_heads: int, head_dim: int) -> dict:
    """Two packed bf16 rows (several samples, a padded tail, GQA) and the weights of the scalar whose gradient
    the check compares: q, k, v, weights, segment_ids, positions."""
    import jax
    import jax.numpy as jnp

    seg, pos = packed_rows(2, length, (length // 8, length // 2), seed=1)
    seg[1, -length // 5:] = 0  # a padded tail
    pos[1, -length // 5:] = 0
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (2, length, heads, head_dim)).astype(jnp.bfloat16)
    k = jax.random.normal(keys[1], (2, length, kv_heads, head_dim)).astype(jnp.bfloat16)
    v = jax.random.normal(keys[2], (2, length, kv_heads, head_dim)).astype(jnp.bfloat16)
    weights = jax.random.normal(keys[3], q.shape) * (seg > 0)[..., None, None]
    return dict(q=q, k=k, v=v, weights=weights, segment_ids=seg, positions=pos)


def attention_run(impl: str, inputs: dict, dtype=None, options: dict | None = None):
    """(output, (dq, dk, dv)) of `impl` on `inputs` (cast to `dtype` when given), the gradients those of
    sum(output * weights). `options`: attention's window / sinks / softcap."""
    import jax
    import jax.numpy as jnp

    from jsft.models import attention as A

    seg, pos = inputs["segment_ids"], inputs["positions"]
    ids = dict(q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos, **(options or {}))
    q, k, v = (inputs[n] if dtype is None else inputs[n].astype(dtype) for n in "qkv")
    f = lambda q, k, v: A.attention(q, k, v, impl=impl, **ids)  # noqa: E731
    loss = lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * inputs["weights"])  # noqa: E731
    return jax.jit(f)(q, k, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def parity_errors(out, grads, ref_out, ref_grads, segment_ids) -> dict:
    """Max |kernel - reference| of the outputs (real tokens) and of dq, dk, dv, each over the reference's
    largest magnitude."""
    import numpy as np

    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    valid = np.asarray(segment_ids) > 0
    rel = lambda a, b, m=None: float(np.abs(f32(a) - f32(b))[m].max() / np.abs(f32(b)).max())  # noqa: E731
    return {"out": rel(out, ref_out, valid), **{f"d{n}": rel(g, r) for n, g, r in zip("qkv", grads, ref_grads)}}


def attention_parity(impl: str, *, length: int, heads: int, kv_heads: int, head_dim: int,
                     features: bool = False) -> dict:
    """`parity_errors` of `impl` on bf16 inputs against the fp32 reference `xla` on the same values.
    `features`: with a sliding window of length / 8, sinks and a softcap (cudnn: the window only; the rest
    falls back)."""
    import jax
    import jax.numpy as jnp

    inputs = attention_inputs(length=length, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    options = {}
    if features:
        options["window"] = length // 8
        if impl != "cudnn":
            options.update(sinks=jnp.linspace(-1.0, 2.0, heads), softcap=20.0)
    t = time.perf_counter()
    out, grads = attention_run(impl, inputs, options=options)
    jax.block_until_ready(grads)
    seconds = time.perf_counter() - t
    ref_out, ref_grads = attention_run("xla", inputs, dtype=jnp.float32, options=options)
    errors = parity_errors(out, grads, ref_out, ref_grads, inputs["segment_ids"])
    return {"impl": impl, "length": length, "features": features, "errors": errors, "ok": max(errors.values()) < 3e-2,
            "first_call_s": round(seconds, 2)}


# ---- 2. the train step -----------------------------------------------------------------------------------------


def train_step_case(model_fields: dict, impl: str, *, rows: int, length: int, steps: int, sample_lengths) -> dict:
    import jax
    import numpy as np

    import jsft.models as jm
    from jsft.config import OptimConfig
    from jsft.data.batch import Counts, Rows, fit_shapes, weigh
    from jsft.models.config import ModelConfig
    from jsft.models.params import abstract_model, param_arrays
    from jsft.train.planner import plan_memory
    from jsft.sharding import make_mesh
    from jsft.train.optim import make_optimizer
    from jsft.train.perf import device_peak_flops
    from jsft.train.step import TrainStep

    cfg = ModelConfig.from_init(dict(model_fields))
    mesh = make_mesh({"fsdp": -1})
    kwargs = dict(dtype="bfloat16", param_dtype="float32", remat_policy="full", attention_impl=impl)
    optimizer = make_optimizer(OptimConfig(lr=1e-5), 100)
    chunk = 4096
    plan = plan_memory(abstract_model(cfg, **kwargs), optimizer, mesh, rows=rows, row_length=length, chunk_size=chunk)
    model = jm.init_model(cfg, seed=0, mesh=mesh, **kwargs)
    step = TrainStep(model, optimizer, mesh, chunk_size=chunk)
    params = param_arrays(model)
    opt_state = step.init_opt_state(params)

    seg, pos = packed_rows(rows, length, sample_lengths, seed=0)
    rng = np.random.default_rng(0)
    micro = Rows(input_ids=rng.integers(0, cfg.vocab_size, seg.shape).astype(np.int32),
                 loss_mask=((seg > 0) & (rng.random(seg.shape) < 0.6)).astype(np.int32), segment_ids=seg, positions=pos)
    samples = sum(len(np.unique(r[r > 0])) for r in seg)
    counts = Counts(samples=samples, target_tokens=int(micro.loss_mask.sum()), tokens=int((seg > 0).sum()))
    batches = [step.device_batch(mb) for mb in fit_shapes([weigh(micro, counts, "token-mean", length)], 1)]

    t = time.perf_counter()
    params, opt_state, loss, _ = step.train_step_stats(params, opt_state, batches)
    first_loss = float(loss)
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        params, opt_state, loss, _ = step.train_step_stats(params, opt_state, batches)
        float(loss)
        times.append(time.perf_counter() - t)
    dt = sorted(times)[len(times) // 2]
    tokens = int((seg > 0).sum())
    flops = cfg.flops_per_token(tokens / samples) * tokens
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {
        "model": f"{cfg.num_params() / 1e9:.2f}B", "impl": model.attention_impl, "rows": rows, "length": length,
        "tokens": tokens, "samples": samples, "compile_s": round(compile_s, 1), "step_s": round(dt, 4),
        "tokens_per_s": round(tokens / dt, 1), "mfu": round(flops / dt / device_peak_flops("bfloat16"), 4),
        "loss_first": round(first_loss, 4), "loss_last": round(float(loss), 4),
        "peak_bytes": peak, "plan_peak_bytes": plan.peak,
        "peak_vs_plan": round(peak / plan.peak, 3) if peak else None,
    }


def in_subprocess(case: dict) -> dict:
    """One train-step case in a fresh process: its own peak device memory, and a crash stays contained."""
    import os
    import subprocess

    proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True,
                          env=os.environ.copy())
    rows = [line for line in proc.stdout.splitlines() if line.startswith("CASE ")]
    if proc.returncode != 0 or not rows:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"case exited {proc.returncode}: {tail[0][:300]}")
    return json.loads(rows[-1][5:])


def run_case(case: dict) -> None:
    import jax

    # plan_memory compiles the same step from abstract shapes: the persistent cache serves the second compile
    jax.config.update("jax_compilation_cache_dir", case["cache_dir"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    row = train_step_case(case["fields"], case["impl"], rows=case["rows"], length=case["length"], steps=case["steps"],
                          sample_lengths=tuple(case["sample_lengths"]))
    print("CASE " + json.dumps({"preset": case["preset"], **row}), flush=True)


# ---- the check -------------------------------------------------------------------------------------------------


def parity_impls(backend: str) -> list[str]:
    return {"gpu": ["pallas_gpu", "cudnn"], "tpu": ["splash"], "cpu": ["pallas_gpu", "splash"]}.get(backend, [])


def run_check(args) -> dict:
    import jax

    from jsft.train.planner import PRESETS

    backend = jax.default_backend()
    device = jax.devices()[0]
    started = time.perf_counter()
    result = {"device": f"{device.platform} {device.device_kind}", "devices": jax.device_count(),
              "jax": jax.__version__, "cpu_smoke": args.cpu_smoke, "parity": [], "train_step": [], "skipped": []}

    def budget_left(what: str) -> bool:
        if time.perf_counter() - started < args.budget_s:
            return True
        result["skipped"].append(f"{what}: time budget of {args.budget_s} s spent")
        return False

    def attempt(kind: str, what: str, fn):
        print(f"[gpu_check] {what} ...", flush=True)
        try:
            row = fn()
        except Exception as e:  # recorded, so one failing implementation does not hide the others
            traceback.print_exc()
            row = {"case": what, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        print(f"[gpu_check]   {json.dumps(row)}", flush=True)
        result[kind].append(row)

    if args.cpu_smoke:
        parity_shape = dict(length=128, heads=4, kv_heads=2, head_dim=64)
        models = {"smoke": SMOKE_MODEL}
    else:
        p = PRESETS[args.presets.split(",")[0]]
        parity_shape = dict(length=args.length, heads=p["num_attention_heads"], kv_heads=p["num_key_value_heads"],
                            head_dim=p["hidden_size"] // p["num_attention_heads"])
        models = {name: PRESETS[name] for name in args.presets.split(",")}
    for impl in parity_impls(backend):
        if budget_left(f"parity {impl}"):
            attempt("parity", f"parity {impl}", lambda: attention_parity(impl, **parity_shape))
        if budget_left(f"parity {impl} window/sinks/softcap"):
            attempt("parity", f"parity {impl} window/sinks/softcap",
                    lambda: attention_parity(impl, **parity_shape, features=True))
    lengths = (args.length // 16, args.length // 2) if args.cpu_smoke else (200, 1500)
    for name, fields in models.items():
        for impl in args.impls.split(","):
            case = dict(preset=name, fields=fields, impl=impl, rows=args.rows, length=args.length, steps=args.steps,
                        sample_lengths=lengths, cache_dir=str(Path(args.out).absolute() / "xla_cache"))
            if budget_left(f"train step {name} {impl}"):
                attempt("train_step", f"train step {name} {impl}", lambda: in_subprocess(case))
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def markdown(r: dict) -> str:
    """Rows for BENCHMARKS.md."""
    lines = [f"gpu_check on {r['device']} x{r['devices']} (jax {r['jax']}{', CPU smoke' if r['cpu_smoke'] else ''}),"
             f" {r['seconds']} s", "", "| attention | T | out | dq | dk | dv | ok |", "|---|---|---|---|---|---|---|"]
    for p in r["parity"]:
        if "error" in p:
            lines.append(f"| {p['case']} | | | | | | error: {p['error']} |")
            continue
        e = p["errors"]
        lines.append(f"| {p['impl']} | {p['length']} | {e['out']:.1e} | {e['dq']:.1e} | {e['dk']:.1e} | {e['dv']:.1e} "
                     f"| {'yes' if p['ok'] else 'NO'} |")
    lines += ["", "| preset | attention | rows x T | tokens/s | MFU | step s | compile s | peak / plan GiB |",
              "|---|---|---|---|---|---|---|---|"]
    gib = lambda n: f"{n / 2**30:.2f}" if n else "n/a"  # noqa: E731
    for s in r["train_step"]:
        if "error" in s:
            lines.append(f"| {s['case']} | | | | | | | error: {s['error']} |")
            continue
        lines.append(f"| {s['preset']} ({s['model']}) | {s['impl']} | {s['rows']} x {s['length']} | {s['tokens_per_s']:.0f} "
                     f"| {s['mfu']:.1%} | {s['step_s']} | {s['compile_s']} | {gib(s['peak_bytes'])} / {gib(s['plan_peak_bytes'])} |")
    lines += [f"- skipped: {s}" for s in r["skipped"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu_check", help="directory for gpu_check.json and gpu_check.md")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, Pallas interpreted")
    parser.add_argument("--presets", default="qwen2.5-0.5b,qwen2.5-1.5b", help="jsft.plan presets, comma-separated")
    parser.add_argument("--impls", help="attention implementations of the train step (default: auto,cudnn on GPU)")
    parser.add_argument("--rows", type=int, help="packed rows per step (default 8; 2 with --cpu-smoke)")
    parser.add_argument("--length", type=int, help="tokens per row (default 4096; 128 with --cpu-smoke)")
    parser.add_argument("--steps", type=int, help="timed steps after the compiling one (default 5; 1 smoke)")
    parser.add_argument("--budget-s", type=float, default=360, help="start no new case after this many seconds")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one train-step case (JSON), see in_subprocess
    args = parser.parse_args(argv)
    if args.case:
        run_case(json.loads(args.case))
        return 0
    if args.cpu_smoke:
        import os

        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    smoke = args.cpu_smoke
    gpu = jax.default_backend() == "gpu"
    args.impls = args.impls or ("blockwise,pallas_gpu" if smoke else "auto,cudnn" if gpu else "auto")
    args.rows = args.rows or (2 if smoke else 8)
    args.length = args.length or (128 if smoke else 4096)
    args.steps = args.steps or (1 if smoke else 5)
    result = run_check(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    md = markdown(result)
    (out / "gpu_check.md").write_text(md)
    print(md)
    failed = [c for c in result["parity"] + result["train_step"] if "error" in c or c.get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
