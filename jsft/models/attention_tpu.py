"""Packed causal attention for TPUs: jax's Pallas splash attention with segment ids (attention_impl=splash).

Same contract as attention_gpu.pallas_attention: self-attention over packed rows, q [B,T,N,H], k/v [B,T,K,H],
segment_ids [B,T] (0 = padding; each segment one contiguous run whose positions grow with the index). The
causal mask is static, so splash skips the tiles above the diagonal; segment ids mask the cross-sample
tiles below it. A constant sliding window is splash's LocalMask (static: the tiles below the window are
skipped too); sinks [N] and the logit softcap are splash's own `sinks` and `attn_logits_soft_cap`. A traced
window cannot build a static mask: attention.py runs blockwise for it. GQA is native (query heads grouped
over kv heads). T is padded to whole tiles inside the call (padding tokens are segment 0 and see only
padding). `interpret=True` runs it on CPU (the tests).
"""

from __future__ import annotations

from functools import lru_cache

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

BLOCK = 512  # tile edge on TPU; T is padded to a multiple of it (or of 128 below one tile)


@lru_cache(maxsize=32)
def _kernel(t: int, heads: int, block: int, window: int | None, softcap: float | None, interpret: bool):
    """The splash kernel for one padded length, window and softcap; its static mask info is built once per
    shape. Built as concrete arrays even when first called under jit, so the cached kernel holds no tracers."""
    with jax.ensure_compile_time_eval():
        return _make_kernel(t, heads, block, window, softcap, interpret)


def _make_kernel(t: int, heads: int, block: int, window: int | None, softcap: float | None, interpret: bool):
    # LocalMask (left, 0): keys q - left .. q, so at most `window` keys with left = window - 1 (causal included)
    one = splash_mask.CausalMask((t, t)) if window is None else splash_mask.LocalMask((t, t), (window - 1, 0), 0)
    mask = splash_mask.MultiHeadMask([one for _ in range(heads)])
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_q_dkv=block, block_kv_dkv=block, block_q_dq=block, block_kv_dq=block
    )
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret,
                                  attn_logits_soft_cap=softcap)


def splash_attention(q, k, v, segment_ids, *, window: int | None = None, sinks=None, softcap: float | None = None,
                     scale=None, block: int = BLOCK, interpret: bool = False):
    """q [B,T,N,H], k/v [B,T,K,H], segment_ids [B,T] -> [B,T,N,H]; window a constant int, sinks [N]."""
    b, t, n, h = q.shape
    if k.shape[1] != t:
        raise ValueError(f"splash attention is self-attention over packed rows: got {t} queries, {k.shape[1]} keys")
    block = min(block, -(-t // 128) * 128)
    t_pad = -(-t // block) * block
    pad = lambda x: jnp.pad(x, [(0, 0), (0, t_pad - t)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    kernel = _kernel(t_pad, n, block, None if window is None else int(window), softcap, interpret)
    scale = jnp.asarray(h**-0.5 if scale is None else scale, q.dtype)

    def one_row(q, k, v, seg):  # splash takes one row, heads first: [N, T, H]
        heads_first = lambda x: x.transpose(1, 0, 2)  # noqa: E731
        ids = splash.SegmentIds(q=seg, kv=seg)
        return heads_first(kernel(heads_first(q) * scale, heads_first(k), heads_first(v), segment_ids=ids,
                                  sinks=sinks))

    out = jax.vmap(one_row)(pad(q), pad(k), pad(v), pad(segment_ids))
    return out[:, :t].astype(q.dtype)
