"""The MoE layer, forward + backward, jsft (jit) against transformers' Qwen3MoeSparseMoeBlock (torch), one run.

    python scripts/bench_moe.py [--tokens 4096] [--hidden 256] [--experts 8] [--top-k 2] [--ffn 512] [--repeats 5]

Same weights and inputs on both sides, one CPU device, fp32. Each repeat times every variant once, in turn,
so that load from other work hits all alike; medians. jsft variants: the dispatch kernels of
jsft/models/moe.py ("tiles" at several tile sizes, "ragged_dot", and capacity-bounded [E, C] slots, which
drop tokens and so compute a different function); torch: the block's eager per-expert loop and transformers'
`grouped_mm` experts (the default when a model is loaded with from_pretrained). FLOPs count the active
expert matmuls and the router (x3 for forward + backward); the 2048^3 matmul probe runs in the same run.
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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.models.qwen3_moe import modeling_qwen3_moe  # noqa: E402

from jsft.models import moe as M  # noqa: E402


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _torch_block(args, impl: str):
    cfg = transformers.Qwen3MoeConfig(
        hidden_size=args.hidden, moe_intermediate_size=args.ffn, num_experts=args.experts,
        num_experts_per_tok=args.top_k, norm_topk_prob=True)
    cfg._experts_implementation = None if impl == "eager" else impl
    torch.manual_seed(0)
    block = modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(cfg).float()
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.normal_(0, 1.0 if "gate.weight" in name else 0.05)
    return block


def _jsft_params(block, args) -> dict:
    sd = {k: v.detach().numpy() for k, v in block.state_dict().items()}
    e, f, d = args.experts, args.ffn, args.hidden
    return {
        "router": jnp.asarray(sd["gate.weight"].T),
        "gate_up_proj": jnp.asarray(sd["experts.gate_up_proj"].reshape(e, 2, f, d).transpose(0, 3, 1, 2)),
        "down_proj": jnp.asarray(sd["experts.down_proj"].transpose(0, 2, 1)),
    }


def _jsft_step(spec):
    def f(p, x, cot):
        return jnp.sum(M.moe(p, x, spec)[0] * cot)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))


def _torch_step(block, x, cot):
    def run():
        xt = x.clone().requires_grad_(True)
        block.zero_grad(set_to_none=True)
        (block(xt) * cot).sum().backward()
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    rs = np.random.RandomState(0)
    x = rs.randn(1, args.tokens, args.hidden).astype(np.float32)
    cot = rs.randn(1, args.tokens, args.hidden).astype(np.float32)
    block = _torch_block(args, "eager")
    params = _jsft_params(block, args)
    xj, cj = jnp.asarray(x), jnp.asarray(cot)

    runs = {}
    base = dict(num_experts=args.experts, top_k=args.top_k)
    for name, spec in (
        ("jsft tiles, 64 rows", M.MoeSpec(**base, kernel="tiles", tile_rows=64)),
        ("jsft tiles, 128 rows (default)", M.MoeSpec(**base, kernel="tiles", tile_rows=128)),
        ("jsft tiles, 256 rows", M.MoeSpec(**base, kernel="tiles", tile_rows=256)),
        ("jsft ragged_dot", M.MoeSpec(**base, kernel="ragged_dot")),
        ("jsft capacity 1.25 (drops)", M.MoeSpec(**base, capacity_factor=1.25)),
    ):
        step = _jsft_step(spec)
        t0 = time.perf_counter()
        jax.block_until_ready(step(params, xj, cj))
        print(f"{name}: compile + first step {time.perf_counter() - t0:.1f} s", flush=True)
        runs[name] = lambda step=step: jax.block_until_ready(step(params, xj, cj))
    xt, ct = torch.tensor(x), torch.tensor(cot)
    for impl in ("eager", "grouped_mm"):
        try:
            tb = _torch_block(args, impl)
            _torch_step(tb, xt, ct)()
            runs[f"torch {impl}"] = _torch_step(tb, xt, ct)
        except Exception as e:  # noqa: BLE001 - an implementation torch lacks here is reported, not fatal
            print(f"torch {impl}: unavailable ({type(e).__name__}: {e})")
    # the same function on both sides: jsft's default kernel against torch's eager block
    y_j = np.asarray(M.moe(params, xj, M.MoeSpec(**base))[0])
    with torch.no_grad():
        y_t = block(xt).numpy()
    print(f"max |jsft - torch| output: {np.abs(y_j - y_t).max():.2e}")

    a = jnp.ones((2048, 2048), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    jax.block_until_ready(mm(a))
    times = {name: [] for name in runs}
    probe = []
    for _ in range(args.repeats):
        probe.append(_timed(lambda: jax.block_until_ready(mm(a))))
        for name, fn in runs.items():
            times[name].append(_timed(fn))
    peak = 2 * 2048**3 / statistics.median(probe) / 1e9
    d, f, e, k, s = args.hidden, args.ffn, args.experts, args.top_k, args.tokens
    flops = 3 * s * (2 * k * 3 * d * f + 2 * d * e)
    torch_best = min(statistics.median(times[n]) for n in times if n.startswith("torch"))
    print(f"\n{s} tokens, hidden {d}, {e} experts, top-{k}, expert hidden {f}; matmul probe {peak:.0f} GFLOP/s; "
          f"load {os.getloadavg()[0]:.1f}; torch threads {torch.get_num_threads()}")
    print("| variant | s / step (median) | tokens/s | vs best torch | GFLOP/s (active) | MFU |")
    print("|---|---|---|---|---|---|")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {t:.4f} | {s / t:,.0f} | {torch_best / t:.2f}x | {flops / t / 1e9:.1f} | "
              f"{flops / t / 1e9 / peak:.0%} |")


if __name__ == "__main__":
    main()
