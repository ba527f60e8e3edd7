"""Ulysses sequence parallelism: attention over rows whose tokens are split over the `sequence` mesh axis.

Outside attention every layer is token-wise, so each of the S devices of a sequence group works on its
T/S tokens of the row (with their true positions: rope runs before this, on the local tokens). Attention
needs every key of a row, so around it two all-to-alls swap what is split (DeepSpeed-Ulysses, veRL):

    q, k, v  [B, T/S, N, H]  --all-to-all-->  [B, T, N/S, H]   each device: all tokens, N/S heads
    out      [B, T, N/S, H]  --all-to-all-->  [B, T/S, N, H]

The row's segment ids and positions are all-gathered ([B, T] int32, small), so the per-device attention
(any implementation of attention.py) masks packed samples exactly as without the split. Query heads must
divide by S. KV heads that S does not divide are repeated first (each kv head r times, keeping which query
heads share it), as veRL does for GQA models with fewer KV heads than S.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jsft.sharding import ACTIVATION_RULES

AXIS = ACTIVATION_RULES["length"][0]  # the mesh axis a row's tokens are split over (jsft/sharding.py names it)


def kv_repeats(num_heads: int, num_kv_heads: int, s: int) -> int:
    """How many times each kv head is repeated so that S divides the kv heads: S / gcd(K, S)."""
    return s // math.gcd(num_kv_heads, s)


def check_heads(num_heads: int, num_kv_heads: int, s: int) -> None:
    """Raise, with the sizes that work, when S cannot split this model's heads (before any work)."""
    if s == 1:
        return
    ok = [d for d in range(1, num_heads + 1) if num_heads % d == 0 and supported(num_heads, num_kv_heads, d)]
    if not supported(num_heads, num_kv_heads, s):
        raise ValueError(
            f"trainer.mesh.sequence={s} cannot split {num_heads} query heads / {num_kv_heads} kv heads "
            f"(Ulysses needs query heads divisible by S, and kv heads repeated up to a multiple of S to "
            f"divide the query heads): use trainer.mesh.sequence in {ok}, or trainer.sequence_parallel=ring "
            f"(ring attention splits tokens, not heads)"
        )


def supported(num_heads: int, num_kv_heads: int, s: int) -> bool:
    r = kv_repeats(num_heads, num_kv_heads, s)
    groups = num_heads // num_kv_heads
    return num_heads % s == 0 and groups % r == 0


def applies(q) -> bool:
    """True under an active mesh with S > 1 whose batch and sequence axes divide q's rows and tokens."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get(AXIS, 1) == 1:
        return False
    rows = math.prod(mesh.shape[a] for a in ACTIVATION_RULES["batch"])
    return q.shape[0] % rows == 0 and q.shape[1] % mesh.shape[AXIS] == 0


def ulysses_attention(local: Callable, q, k, v, segment_ids, positions, *, window=None, sinks=None,
                      check_vma: bool = True):
    """q [B,T,N,H], k/v [B,T,K,H] split over (batch, sequence); `local(q, k, v, segment_ids, positions,
    window, sinks)` is self-attention on one device's rows, whole in T. Returns [B,T,N,H], split like q."""
    s = jax.sharding.get_abstract_mesh().shape[AXIS]
    n, kh = q.shape[2], k.shape[2]
    check_heads(n, kh, s)
    r = kv_repeats(n, kh, s)
    rows = ACTIVATION_RULES["batch"]
    tokens, ids = P(rows, AXIS, None, None), P(rows, AXIS)

    traced = isinstance(window, jax.core.Tracer)

    def per_device(q, k, v, segment_ids, positions, window_arg, sinks):
        if r > 1:  # kv head j becomes heads j*r .. j*r+r-1: query head i still reads original head i // G
            k, v = jnp.repeat(k, r, axis=2), jnp.repeat(v, r, axis=2)
        to_heads = lambda x: jax.lax.all_to_all(x, AXIS, split_axis=2, concat_axis=1, tiled=True)  # noqa: E731
        with jax.named_scope("ulysses_all_to_all"):
            q, k, v = to_heads(q), to_heads(k), to_heads(v)  # [B, T, N/S, H], [B, T, K*r/S, H]
            segment_ids, positions = (jax.lax.all_gather(x, AXIS, axis=1, tiled=True) for x in (segment_ids, positions))
        out = local(q, k, v, segment_ids, positions, window_arg if traced else window, sinks)
        with jax.named_scope("ulysses_all_to_all"):
            return jax.lax.all_to_all(out, AXIS, split_axis=1, concat_axis=2, tiled=True)  # [B, T/S, N, H]

    specs = (tokens, tokens, tokens, ids, ids, P(), P(AXIS))  # sinks [N]: this device's N/S heads
    return jax.shard_map(per_device, in_specs=specs, out_specs=tokens, check_vma=check_vma)(
        q, k, v, segment_ids, positions, window if traced else None, sinks)
