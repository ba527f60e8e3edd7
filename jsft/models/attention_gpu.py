"""Packed causal flash attention for GPUs: a Pallas (Triton) kernel and cuDNN's packed ("ragged") layout.

Both take self-attention over packed rows: q [B,T,N,H], k/v [B,T,K,H] and segment_ids [B,T] (0 = padding),
where every segment is one contiguous run of the row whose positions count up by one (what packing
produces). Then "same segment and kv position <= q position" (jsft's rule, attention.py) is "same run and
kv index <= q index", and a window's "q position - kv position < w" is "q index - kv index < w", which
need no [T, S] mask or bias: the kernels read run bounds per tile or per segment and skip every tile that
the causal, segment and window masks zero out.

`pallas_attention` (attention_impl=pallas_gpu): a FlashAttention-2 forward and backward written for
packed rows, with a sliding window (constant or traced), per-head sinks and a logit softcap. Each query tile
visits only the key tiles from the earliest key its tokens see (their segment's start, or the window's) up
to the diagonal; each key tile in the backward visits only the query tiles from the diagonal to the last
query that sees one of its keys (its segment's end, or the window's): a 4096-token row of 200-1000-token samples visits ~12% of the [T, T] tiles
(a causal-only kernel, such as jax's Pallas `mha`, visits 50%). GQA reads
the shared kv head through the BlockSpec (no repeat in the forward); the backward writes dK/dV per query
head (fp32, the size of q) and sums each group outside the kernel. `interpret=True` runs the same kernel
on CPU, which is how the test suite proves it.

`cudnn_packed_attention` (attention_impl=cudnn): jax's cuDNN fused attention with q/kv segment lengths and
offsets (MaskType.PADDING_CAUSAL), so cuDNN runs each sample as its own causal sequence; a constant window
is cuDNN's sliding_window_length. GPU (Hopper+) only.

Lengths the kernels cannot take are padded inside the call: T up to a whole number of tiles (the padding
is segment 0), the head dim of the Pallas kernel up to a power of two (zeros change no score).
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

_MASKED = -1e30  # finite: exp2(_MASKED - m) is exactly 0, never NaN


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile edges: forward query/key tiles, backward outer tile (one key tile for dK/dV, one query tile for
    dQ) and inner tile. T is padded to a multiple of all four."""

    fwd_q: int = 128
    fwd_k: int = 64
    bwd: int = 64
    bwd_inner: int = 64

    def multiple(self) -> int:
        return math.lcm(self.fwd_q, self.fwd_k, self.bwd, self.bwd_inner)


# ---- host-side preparation (plain XLA, O(T)) -------------------------------------------------------------------


def run_bounds(segment_ids, window=None):
    """(lo, hi) [B, T] int32: the first / last index of the keys that token i sees as a query (lo) and of the
    queries that see it as a key (hi). Without a window, the first / last token of its run (padding tokens:
    each its own one-token run, so every query sees at least itself and no row is empty); a window w clips
    them to i - w + 1 / i + w - 1 (positions step by one inside a run). Query i then sees exactly the keys
    lo[i] <= j <= i: the kernels' tile ranges and masks come from lo and hi alone, so a traced window costs
    nothing more than a constant one."""
    b, t = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    ids = jnp.where(segment_ids == 0, -1 - idx, segment_ids).astype(jnp.int32)
    starts = jnp.concatenate([jnp.ones((b, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)
    ends = jnp.concatenate([ids[:, 1:] != ids[:, :-1], jnp.ones((b, 1), bool)], axis=1)
    lo = lax.cummax(jnp.where(starts, idx, 0), axis=1)
    hi = lax.cummin(jnp.where(ends, idx, t - 1), axis=1, reverse=True)
    if window is not None:
        lo, hi = jnp.maximum(lo, idx - window + 1), jnp.minimum(hi, idx + window - 1)
    return lo, hi


def _pad_axis(x, axis: int, size: int, value=0):
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


# ---- the Pallas kernels ------------------------------------------------------------------------------------------
#
# Refs inside a kernel are one (row, head) slice: q/k/v/o [T, H], lo/hi [T], lse/delta/sink [T]. Scores are
# kept in base 2 (exp2 with log2(e) folded in), as jax's reference Triton kernel does. A softcap is applied
# in natural units (c * tanh(s / c)) before the base change; the backward multiplies dS by 1 - tanh^2.
# Sinks enter the forward as the running max and sum's start (m = sink, l = 1: exp2(sink - m)); without sinks
# the start is m = _MASKED, whose l = 1 the first visible score scales to exactly 0. The saved lse holds the
# sink, so the backward's P needs no change; d sinks is computed outside the kernel from lse and delta.

_LOG2E = math.log2(math.e)


def _dot_nt(a, b):  # a @ b.T in fp32
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):  # a.T @ b in fp32
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _scores(q, k, sm_scale: float, softcap):
    """(base-2 scores of q @ k.T, the softcap's tanh or None)."""
    s = _dot_nt(q, k) * sm_scale
    if softcap is None:
        return s * _LOG2E, None
    t = jnp.tanh(s / softcap)
    return t * (softcap * _LOG2E), t


def _tile_mask(q_lo, q_start, k_start, bq: int, bk: int):
    """Query q_start + a sees key k_start + b when q_lo[a] <= k_start + b <= q_start + a (run_bounds)."""
    k_idx = (k_start + jnp.arange(bk))[None, :]
    return ((q_start + jnp.arange(bq))[:, None] >= k_idx) & (k_idx >= q_lo[:, None])


def _fwd_kernel(q_ref, k_ref, v_ref, lo_ref, sink_ref, o_ref, lse_ref, *, sm_scale: float, softcap, bq: int,
                bk: int):
    i = pl.program_id(0)
    q_start = i * bq
    q = q_ref[...]  # [bq, H]
    q_lo = lo_ref[pl.ds(q_start, bq)]
    # key tile of the earliest key any query of the tile sees (lax.div, not //: integers here are
    # non-negative, and Triton lowers a plain division)
    first = lax.div(jnp.min(q_lo), bk)
    last = lax.div(q_start + bq + bk - 1, bk)  # causal: up to the diagonal

    def body(j, carry):
        o, m, l = carry
        k_start = j * bk
        s, _ = _scores(q, k_ref[pl.ds(k_start, bk), :], sm_scale, softcap)
        s = jnp.where(_tile_mask(q_lo, q_start, k_start, bq, bk), s, _MASKED)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp2(s - m_new[:, None])
        corr = jnp.exp2(m - m_new)
        o = o * corr[:, None] + _dot(p.astype(v_ref.dtype), v_ref[pl.ds(k_start, bk), :])
        return o, m_new, l * corr + jnp.sum(p, axis=1)

    h = q_ref.shape[-1]
    init = (jnp.zeros((bq, h), jnp.float32), sink_ref[...], jnp.ones((bq,), jnp.float32))
    o, m, l = lax.fori_loop(first, last, body, init)
    o_ref[...] = (o / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log2(l)


def _bwd_kernel(
    q_ref, k_ref, v_ref, lo_ref, hi_ref, do_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref,
    *, sm_scale: float, softcap, block: int, inner: int, t: int,
):
    """One program: dK/dV of key tile `pid`, then dQ of query tile `pid` (the FlashAttention-2 backward,
    fused as in jax's Triton kernel). dS = P * (dO V^T - delta) * scale, with P from the saved logsumexp."""
    pid = pl.program_id(2)
    h = q_ref.shape[-1]
    start = pid * block

    def ds_of(p, dp_minus_delta, tanh):
        ds = p * dp_minus_delta
        return ds if tanh is None else ds * (1.0 - tanh * tanh)

    # dK, dV of keys [start, start + block): queries from the diagonal to the last one that sees a key here
    k, v = k_ref[pl.ds(start, block), :], v_ref[pl.ds(start, block), :]
    q_first = lax.div(start, inner)
    q_last = jnp.minimum(lax.div(jnp.max(hi_ref[pl.ds(start, block)]), inner) + 1, t // inner)

    def dkv_body(i, carry):
        dk, dv = carry
        qs = i * inner
        q, do = q_ref[pl.ds(qs, inner), :], do_ref[pl.ds(qs, inner), :]
        s, tanh = _scores(q, k, sm_scale, softcap)
        mask = _tile_mask(lo_ref[pl.ds(qs, inner)], qs, start, inner, block)
        p = jnp.where(mask, jnp.exp2(s - lse_ref[pl.ds(qs, inner)][:, None]), 0.0)  # [inner, block]
        dv = dv + _dot_tn(p.astype(do.dtype), do)
        ds = ds_of(p, _dot_nt(do, v) - delta_ref[pl.ds(qs, inner)][:, None], tanh)
        dk = dk + _dot_tn(ds.astype(q.dtype), q)
        return dk, dv

    zeros = jnp.zeros((block, h), jnp.float32)
    dk, dv = lax.fori_loop(q_first, q_last, dkv_body, (zeros, zeros))
    dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)

    # dQ of queries [start, start + block): keys from the earliest one seen to the diagonal
    q, do = q_ref[pl.ds(start, block), :], do_ref[pl.ds(start, block), :]
    q_lo = lo_ref[pl.ds(start, block)]
    lse, delta = lse_ref[pl.ds(start, block)], delta_ref[pl.ds(start, block)]
    k_first = lax.div(jnp.min(q_lo), inner)
    k_last = lax.div(start + block + inner - 1, inner)

    def dq_body(j, dq):
        ks = j * inner
        k, v = k_ref[pl.ds(ks, inner), :], v_ref[pl.ds(ks, inner), :]
        s, tanh = _scores(q, k, sm_scale, softcap)
        p = jnp.where(_tile_mask(q_lo, start, ks, block, inner), jnp.exp2(s - lse[:, None]), 0.0)
        ds = ds_of(p, _dot_nt(do, v) - delta[:, None], tanh)
        return dq + _dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(k_first, k_last, dq_body, jnp.zeros((block, h), jnp.float32))
    dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


def _row_head(t: int, h: int, head_of=lambda n: n):
    """BlockSpec of one (row, head) slice [T, H] of a [B, T, heads, H] array on a (tile, row, head) grid."""
    return pl.BlockSpec((None, t, None, h), lambda i, b, n: (b, 0, head_of(n), 0))


def _ids_spec(t: int):
    return pl.BlockSpec((None, t), lambda i, b, n: (b, 0))


def _sink_start(sinks, n: int, t: int):
    """[N, T] fp32: each query's starting running max, base 2: its head's sink, or _MASKED without sinks."""
    if sinks is None:
        return jnp.full((n, t), _MASKED, jnp.float32)
    return jnp.broadcast_to((sinks.astype(jnp.float32) * _LOG2E)[:, None], (n, t))


def _forward(q, k, v, lo, sinks, blocks: Blocks, sm_scale: float, softcap, interpret: bool):
    b, t, n, h = q.shape
    groups = n // k.shape[2]
    kernel = partial(_fwd_kernel, sm_scale=sm_scale, softcap=softcap, bq=blocks.fwd_q, bk=blocks.fwd_k)
    kv_spec = _row_head(t, h, lambda n: n // groups)  # GQA: query head n reads kv head n // G
    return pl.pallas_call(
        kernel,
        grid=(t // blocks.fwd_q, b, n),
        in_specs=[
            pl.BlockSpec((None, blocks.fwd_q, None, h), lambda i, b, n: (b, i, n, 0)),
            kv_spec, kv_spec, _ids_spec(t),
            pl.BlockSpec((None, blocks.fwd_q), lambda i, b, n: (n, i)),
        ],
        out_specs=[
            pl.BlockSpec((None, blocks.fwd_q, None, h), lambda i, b, n: (b, i, n, 0)),
            pl.BlockSpec((None, None, blocks.fwd_q), lambda i, b, n: (b, n, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
        interpret=interpret,
        name="jsft_packed_flash_fwd",
    )(q, k, v, lo, _sink_start(sinks, n, t))


def _backward(q, k, v, lo, hi, out, lse, d_out, blocks: Blocks, sm_scale: float, softcap, interpret: bool):
    b, t, n, h = q.shape
    kh = k.shape[2]
    groups = n // kh
    delta = jnp.einsum("BTNH,BTNH->BNT", out.astype(jnp.float32), d_out.astype(jnp.float32))
    kernel = partial(_bwd_kernel, sm_scale=sm_scale, softcap=softcap, block=blocks.bwd, inner=blocks.bwd_inner, t=t)
    vec = pl.BlockSpec((None, None, t), lambda b, n, i: (b, n, 0))
    full = pl.BlockSpec((None, t, None, h), lambda b, n, i: (b, 0, n, 0))
    tile = pl.BlockSpec((None, blocks.bwd, None, h), lambda b, n, i: (b, i, n, 0))
    ids_spec = pl.BlockSpec((None, t), lambda b, n, i: (b, 0))
    kv_spec = pl.BlockSpec((None, t, None, h), lambda b, n, i: (b, 0, n // groups, 0))
    dq, dk, dv = pl.pallas_call(
        kernel,
        grid=(b, n, t // blocks.bwd),
        in_specs=[full, kv_spec, kv_spec, ids_spec, ids_spec, full, vec, vec],
        out_specs=[tile, tile, tile],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            # dK/dV per query head, summed over each group below
            jax.ShapeDtypeStruct(q.shape, jnp.float32),
            jax.ShapeDtypeStruct(q.shape, jnp.float32),
        ],
        interpret=interpret,
        name="jsft_packed_flash_bwd",
    )(q, k, v, lo, hi, d_out, lse, delta)
    group_sum = lambda x: x.reshape(b, t, kh, groups, h).sum(3)  # noqa: E731
    return dq, group_sum(dk).astype(k.dtype), group_sum(dv).astype(v.dtype), delta


@partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _flash(q, k, v, lo, hi, sinks, blocks: Blocks, sm_scale: float, softcap, interpret: bool):
    return _forward(q, k, v, lo, sinks, blocks, sm_scale, softcap, interpret)[0]


def _flash_fwd(q, k, v, lo, hi, sinks, blocks, sm_scale, softcap, interpret):
    out, lse = _forward(q, k, v, lo, sinks, blocks, sm_scale, softcap, interpret)
    return out, (q, k, v, lo, hi, sinks, out, lse)


def _flash_bwd(blocks, sm_scale, softcap, interpret, residuals, d_out):
    q, k, v, lo, hi, sinks, out, lse = residuals
    dq, dk, dv, delta = _backward(q, k, v, lo, hi, out, lse, d_out.astype(q.dtype), blocks, sm_scale, softcap,
                                  interpret)
    d_sinks = None
    if sinks is not None:  # the sink is a key of value 0: dS_sink = p_sink * (0 - delta), summed over queries
        p_sink = jnp.exp2(_sink_start(sinks, q.shape[2], q.shape[1])[None] - lse)  # [B, N, T]
        d_sinks = -jnp.sum(p_sink * delta, axis=(0, 2)).astype(sinks.dtype)
    return dq, dk, dv, None, None, d_sinks


_flash.defvjp(_flash_fwd, _flash_bwd)


def pallas_attention(q, k, v, segment_ids, *, window=None, sinks=None, softcap=None, scale=None,
                     blocks: Blocks = Blocks(), interpret: bool = False):
    """Packed causal attention, q [B,T,N,H], k/v [B,T,K,H], segment_ids [B,T] -> [B,T,N,H] (module docstring).
    window: int or traced int32 scalar; sinks [N]; softcap, scale (default H^-0.5) floats."""
    b, t, n, h = q.shape
    if k.shape[1] != t:
        raise ValueError(f"pallas_gpu attention is self-attention over packed rows: got {t} queries, {k.shape[1]} keys")
    t_pad = -(-t // blocks.multiple()) * blocks.multiple()
    h_pad = max(16, pl.next_power_of_2(h))  # Triton tiles want power-of-two widths (>= 16 for tensor cores)
    pad = lambda x: _pad_axis(_pad_axis(x, 1, t_pad), 3, h_pad)  # noqa: E731
    lo, hi = run_bounds(_pad_axis(segment_ids, 1, t_pad), window)
    # the softmax scale is the true head dim's: zero-padded head dims leave every score unchanged
    out = _flash(pad(q), pad(k), pad(v), lo, hi, sinks, blocks, h**-0.5 if scale is None else scale, softcap,
                 interpret)
    return out[:, :t, :, :h]


# ---- cuDNN, packed layout ---------------------------------------------------------------------------------------


def cudnn_packed_args(segment_ids, max_segments: int):
    """(seqlens [B, M], offsets [B, M + 1]) int32 of each row's non-padding runs, as jax's cuDNN fused
    attention takes them for packed rows: run lengths and start indices in row order, -1 past the last run.
    `max_segments` (M) must be at least the number of runs of any row: runs past M would be dropped."""
    b = segment_ids.shape[0]
    real = segment_ids != 0
    starts = real & jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    ends = real & jnp.concatenate([segment_ids[:, 1:] != segment_ids[:, :-1], jnp.ones((b, 1), bool)], axis=1)
    indices = jax.vmap(lambda m: jnp.nonzero(m, size=max_segments, fill_value=-1)[0].astype(jnp.int32))
    begin, end = indices(starts), indices(ends)  # [B, M] each run's first / last token
    seqlens = jnp.where(begin >= 0, end - begin + 1, -1)
    offsets = jnp.concatenate([begin, jnp.full((b, 1), -1, jnp.int32)], axis=1)
    return seqlens, offsets


def cudnn_packed_attention(q, k, v, segment_ids, *, window: int | None = None, scale=None,
                           max_segments: int | None = None):
    """Packed causal attention through cuDNN (GPU, Hopper or newer): each run of `segment_ids` is its own
    causal sequence (MaskType.PADDING_CAUSAL with per-segment lengths and offsets); no mask, no bias.
    `window`: a constant sliding window (cuDNN's sliding_window_length: at most `window` keys, itself
    included). cuDNN takes no sinks or softcap (attention.py runs pallas_gpu for those).
    q [B,T,N,H], k/v [B,T,K,H] in bf16/fp16 -> [B,T,N,H]."""
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    b, t, n, h = q.shape
    if k.shape[2] != n:
        # jax scales packed kv offsets by the query head count (fused_attention_stablehlo._fix_seqlen_offsets),
        # which is only right when K = N: repeat the kv heads for this path
        k, v = (jnp.repeat(x, n // k.shape[2], axis=2) for x in (k, v))
    seqlens, offsets = cudnn_packed_args(segment_ids, max_segments or t)
    return dot_product_attention(
        q, k, v, q_seqlen=seqlens, kv_seqlen=seqlens, q_offsets=offsets, kv_offsets=offsets,
        scale=h**-0.5 if scale is None else scale, mask_type=MaskType.PADDING_CAUSAL, qkv_layout="BTNH",
        sliding_window_length=window,
    )
