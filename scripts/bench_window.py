"""Blockwise attention time of one packed 4096-token row with a sliding window against full causal.

    python scripts/bench_window.py [--length 4096] [--window 512] [--repeats 7] [--rows packed,single]

One layer's attention (8 query heads / 2 KV heads, head dim 64, fp32, one CPU device), forward + backward
(the gradient of a weighted sum w.r.t. q, k, v), on one row of back-to-back samples of 300-1500 tokens
(positions restarting per sample: `packed`) and on one row holding a single sample (`single`, long context). The two variants run interleaved in one process (A B A B ...), so
machine load hits both alike; the window is passed as traced data (as a scanned mixed stack passes it).
Prints each variant's live tiles (the fully visible ones and the partly masked sub-tiles blockwise visits,
as `attention._live_pairs` lists them) with the area they cover, and the median times and their ratio.
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

from jsft.models import blockwise as A  # noqa: E402

N, K, H = 8, 2, 64


def packed_row(length: int, single: bool = False, seed: int = 0):
    """segment_ids, positions [1, length]: samples of 300-1500 tokens back to back, the last one cut to fit
    (or one sample filling the row)."""
    if single:
        return jnp.ones((1, length), jnp.int32), jnp.arange(length, dtype=jnp.int32)[None], 1
    rng = np.random.default_rng(seed)
    seg, pos, start, s = np.zeros(length, np.int32), np.zeros(length, np.int32), 0, 1
    while start < length:
        n = min(int(rng.integers(300, 1500)), length - start)
        seg[start:start + n], pos[start:start + n] = s, np.arange(n)
        start, s = start + n, s + 1
    return jnp.asarray(seg[None]), jnp.asarray(pos[None]), s - 1


def live_tiles(seg, pos, window):
    """(fully visible tiles, partly masked sub-tiles, fraction of the [T, T] area they cover)."""
    bq = bk = min(A.BLOCK, seg.shape[1])
    split = A._split(bq, bk)
    _, n_full, _, n_part = A._live_pairs((seg, seg, pos, pos, A.window_data(window)), bq, bk, split)
    area = int(n_full) * bq * bk + int(n_part) * (bq // split) * (bk // split)
    return int(n_full), int(n_part), area / seg.shape[1] ** 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rows", default="packed,single")
    args = ap.parse_args()
    for kind in args.rows.split(","):
        bench(args, kind)


def bench(args, kind: str) -> None:
    seg, pos, samples = packed_row(args.length, single=kind == "single")
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (1, args.length, N, H))
    k, v = (jax.random.normal(key, (1, args.length, K, H)) for key in keys[1:3])
    weights = jax.random.normal(keys[3], q.shape)

    @jax.jit
    def step(q, k, v, window):
        def loss(q, k, v):
            out = A.blockwise_attention(q, k, v, seg, seg, pos, pos, window)
            return jnp.sum(out * weights)
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    variants = {"full causal": A.NO_WINDOW, f"window {args.window}": args.window}
    visible = np.asarray(A.attention_mask(seg, seg, pos, pos))
    d = np.asarray(pos)[0][:, None] - np.asarray(pos)[0][None, :]
    print(f"{kind}: one row of {args.length} tokens ({samples} samples), {N}/{K} heads, head dim {H}, fp32, "
          f"blockwise tile {A.BLOCK} (partly masked tiles as {A._split(A.BLOCK, A.BLOCK)}^2 sub-tiles), fwd+bwd")
    for name, window in variants.items():
        full, part, area = live_tiles(seg, pos, None if window == A.NO_WINDOW else window)
        vis = (visible[0] & (d < window)).mean()
        print(f"  {name:12s} live tiles: {full} full + {part} partial sub-tiles = {area:.1%} of the [T, T] area "
              f"({vis:.1%} visible)")
    times = {name: [] for name in variants}
    for window in variants.values():
        jax.block_until_ready(step(q, k, v, jnp.int32(window)))  # compile once (one program: the window is data)
    for _ in range(args.repeats):
        for name, window in variants.items():
            t = time.perf_counter()
            jax.block_until_ready(step(q, k, v, jnp.int32(window)))
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name, ts in times.items():
        print(f"  {name:12s} median {med[name] * 1e3:7.1f} ms (min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f})")
    full_name, win_name = variants
    print(f"  ratio full / window: {med[full_name] / med[win_name]:.2f}x")


if __name__ == "__main__":
    main()
