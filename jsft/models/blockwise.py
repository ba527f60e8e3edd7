"""Blockwise (flash-style) attention and its block-level pieces: the tiles of [block x block] that the mask
leaves live, an online softmax over them and a recomputing backward (FlashAttention-2).

attention.py's `blockwise` implementation is `blockwise_attention`; ring attention (ring.py) calls
`block_fwd` / `block_bwd` once per visiting KV block and merges the blocks itself. Both build on this
module, which imports neither. Masking as attention.py: by segment ids and positions.

Dimension letters: B batch, T query length, S key length, N query heads, K kv heads, G = N / K, H head dim.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

# finite instead of -inf: a fully masked (padding) query then averages values instead of producing NaN
_MASKED = -1e30
# a window longer than any row: what the full layers of a mixed stack pass when the window is per-layer data
NO_WINDOW = 2**30

# Tile edge of `blockwise`. 256 keeps each tile's matmuls large enough for the CPU's GEMM
# ([G*256, H] @ [H, 256] per kv head) while skipping most of the masked area of 2k-token packed rows.
BLOCK = 256
# Partly masked tiles (the causal diagonal, sample boundaries, padding) are visited as PARTIAL_SPLIT^2
# sub-tiles, skipping the dead ones (the upper half of a diagonal tile); fully visible tiles stay whole and
# skip the mask. Sub-tiles below MIN_SUB_TILE cost more in per-tile overhead than they skip.
PARTIAL_SPLIT = 4
MIN_SUB_TILE = 64
# Each row of a batch visits its own live tiles (blockwise_attention maps over the rows): one list shared
# by the rows would visit their union, 20-25% more area on the bench's packed rows.
ROWS_APART = True


def attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions, window=None):
    """[B, T, S] bool: same non-padding segment, causal by position, and within `window` if one is given."""
    same = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
    causal = kv_positions[:, None, :] <= q_positions[:, :, None]
    if window is None:
        return same & causal
    return same & causal & (q_positions[:, :, None] - kv_positions[:, None, :] < window)


def _scale(scale, head_dim: int) -> float:
    return head_dim**-0.5 if scale is None else scale


# ---- blockwise --------------------------------------------------------------------------------------------------
#
# Inside, G query heads share a kv head and fold into the rows of each tile: queries are [B, K, T*G, H]
# (row r = t * G + g), keys/values [B, K, S, H], and every tile's matmul is a plain [B*K]-batched
# [rows, contract] @ [contract, cols] product. Operands that a matmul needs transposed (K^T, V^T for the
# scores, Q^T, dO^T for dK, dV) are transposed ONCE outside the loop: transposing per tile copies
# [G*block, block] probability tiles, which cost more than the matmuls themselves on CPU.
#
# The live tiles are listed once per row ((i, j): query tile i, key tile j, row-major; blockwise_attention
# maps over the rows), and while loops of dynamic length visit only those: the masked-out ~3/4 of a packed
# row costs neither FLOPs nor memory. The lists are computed at run time from the mask ids, the window
# included (`mask_ids` = (q_seg, kv_seg, q_pos, kv_pos, window int32 scalar or None)), so a traced window
# skips the tiles it hides as well as a constant one.
# Two lists, two loops: tiles that are visible everywhere skip the mask and its `where`s; the partly masked
# rest is visited in smaller sub-tiles, of which the dead ones are skipped too (_live_pairs).
#
# Sinks are not in the tiles: the blocks' (out, lse) over the keys merge with the sink once at the end
# (`add_sinks`), which is what ring attention needs too (one sink per query, not one per visiting block).
# The backward then recomputes probabilities from the lse WITH the sink, so dS needs no change; the sink's
# own gradient is -sum over queries of p_sink * rowsum(dO * O) (`sinks_grad`).


def _pad_to(x, axis: int, multiple: int):
    pad = -x.shape[axis] % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _live_pairs(mask_ids, bq: int, bk: int, split: int = 1):
    """The tiles to visit, in two lists: (full [P, 2] int32, full count, partial [P', 2] int32, partial count).
    `full`: (query tile, key tile) pairs of bq x bk tiles where EVERY element is visible in every row of the
    batch (no mask to evaluate); `partial`: the live (bq/split) x (bk/split) sub-tiles of the other tiles
    that have some visible key (diagonal, window-edge and sample-boundary tiles, padding). Exact: the element
    mask is evaluated on tile views [B, nq, nk, bq', bk'] and reduced at once, never stored, so no live tile
    is skipped, no dead one visited, and no masked element enters the unmasked loop."""
    q_seg, kv_seg, q_pos, kv_pos, window = mask_ids
    b, fq, fk = q_seg.shape[0], bq // split, bk // split
    qv = lambda x: x.reshape(b, -1, 1, fq, 1)  # noqa: E731
    kv = lambda x: x.reshape(b, 1, -1, 1, fk)  # noqa: E731
    visible = (qv(q_seg) == kv(kv_seg)) & (kv(kv_seg) != 0) & (kv(kv_pos) <= qv(q_pos))
    if window is not None:
        visible = visible & (qv(q_pos) - kv(kv_pos) < window)
    live = visible.any(axis=(0, 3, 4))  # [nq * split, nk * split] sub-tiles
    nq, nk = live.shape[0] // split, live.shape[1] // split
    full = visible.all(axis=(0, 3, 4)).reshape(nq, split, nk, split).all(axis=(1, 3))  # [nq, nk]
    in_full = jnp.repeat(jnp.repeat(full, split, axis=0), split, axis=1)
    return (*_pairs(full), *_pairs(live & ~in_full))


def _pairs(tiles):
    """[n, m] bool -> (the (i, j) pairs where true, row-major, padded to n*m with (0, 0); their count)."""
    flat = jnp.nonzero(tiles.reshape(-1), size=tiles.size, fill_value=0)[0]
    pairs = jnp.stack([flat // tiles.shape[1], flat % tiles.shape[1]], axis=-1).astype(jnp.int32)
    return pairs, jnp.sum(tiles, dtype=jnp.int32)


def window_data(window):
    """The window as mask data: an int32 scalar, traced or not; None (full causal: no compare at all)."""
    return None if window is None else jnp.asarray(window, jnp.int32)


class _Tiles:
    """Tile (i, j) of the inner layouts: bq queries (bq * G rows) by bk keys; `sub` the same layouts cut
    into the (bq / split) x (bk / split) sub-tiles that partly masked tiles are visited in."""

    def __init__(self, mask_ids, bq: int, bk: int, groups: int, split: int = 1):
        self.mask_ids, self.bq, self.bk, self.g, self.split = mask_ids, bq, bk, groups, split
        self.sub = self if split == 1 else _Tiles(mask_ids, bq // split, bk // split, groups)

    def rows(self, x, i):  # [B, K, T*G, ...] -> [B, K, bq*G, ...]
        return jax.lax.dynamic_slice_in_dim(x, i * self.bq * self.g, self.bq * self.g, axis=2)

    def put_rows(self, x, tile, i):
        return jax.lax.dynamic_update_slice_in_dim(x, tile, i * self.bq * self.g, axis=2)

    def keys(self, x, j, axis: int):  # the S axis of [B, K, S, H] (axis 2) or [B, K, H, S] (axis 3)
        return jax.lax.dynamic_slice_in_dim(x, j * self.bk, self.bk, axis=axis)

    def put_keys(self, x, tile, j, axis: int):
        return jax.lax.dynamic_update_slice_in_dim(x, tile, j * self.bk, axis=axis)

    def query_cols(self, x, i):  # the T*G axis of [B, K, H, T*G]
        return jax.lax.dynamic_slice_in_dim(x, i * self.bq * self.g, self.bq * self.g, axis=3)

    def mask(self, i, j):
        """[B, 1, bq*G, bk] bool, broadcastable over a tile's [B, K, bq*G, bk] scores."""
        q_seg, kv_seg, q_pos, kv_pos, window = self.mask_ids
        qs = partial(jax.lax.dynamic_slice_in_dim, start_index=i * self.bq, slice_size=self.bq, axis=1)
        ks = partial(jax.lax.dynamic_slice_in_dim, start_index=j * self.bk, slice_size=self.bk, axis=1)
        m = attention_mask(qs(q_seg), ks(kv_seg), qs(q_pos), ks(kv_pos), window)  # [B, bq, bk]
        b = m.shape[0]
        return jnp.broadcast_to(m[:, None, :, None, :], (b, 1, self.bq, self.g, self.bk)).reshape(b, 1, -1, self.bk)


def _mm(a, b):
    """[B, K, m, c] @ [B, K, c, n] -> fp32 [B, K, m, n]: the canonical batched layout (no operand copies)."""
    return jnp.einsum("BKmc,BKcn->BKmn", a, b, preferred_element_type=jnp.float32)


def _capped(s, softcap):
    """(softcap * tanh(s / softcap), the tanh for the backward's d tanh = 1 - tanh^2); s itself without a cap."""
    if softcap is None:
        return s, None
    t = jnp.tanh(s / softcap)
    return softcap * t, t


def _blockwise_fwd_impl(q, k_t, v, tiles: _Tiles, live, softcap=None):
    """q [B,K,T*G,H] (pre-scaled), k_t [B,K,H,S], v [B,K,S,H] -> out [B,K,T*G,H] fp32, lse [B,K,T*G].
    Fully visible tiles first, without a mask; then the partly masked sub-tiles (`tiles.sub`)."""
    full_pairs, n_full, part_pairs, n_part = live

    def body(t: _Tiles, pairs, masked: bool):
        def step(p, carry):
            out, row_max, row_sum = carry
            i, j = pairs[p, 0], pairs[p, 1]
            s, _ = _capped(_mm(t.rows(q, i), t.keys(k_t, j, 3)), softcap)  # [B, K, bq*G, bk]
            if masked:
                s = jnp.where(t.mask(i, j), s, _MASKED)
            m_old, l_old = t.rows(row_max, i), t.rows(row_sum, i)
            m_new = jnp.maximum(m_old, s.max(-1))
            probs = jnp.exp(s - m_new[..., None])
            if masked:
                # masked scores add exp(_MASKED - m_new) = 0 once the row has seen a key; rows that have seen
                # none yet (m_new = _MASKED) are zeroed by `seen`, cheaper than evaluating the mask again
                probs = probs * (m_new > _MASKED)[..., None]
            scale = jnp.exp(m_old - m_new)
            o_new = t.rows(out, i) * scale[..., None] + _mm(probs.astype(v.dtype), t.keys(v, j, 2))
            row_sum = t.put_rows(row_sum, l_old * scale + probs.sum(-1), i)
            return t.put_rows(out, o_new, i), t.put_rows(row_max, m_new, i), row_sum
        return step

    # *_like (not zeros(shape)): under shard_map the carries must vary over devices like the inputs
    f32 = jnp.float32
    init = (jnp.zeros_like(q, f32), jnp.full_like(q[..., 0], _MASKED, f32), jnp.zeros_like(q[..., 0], f32))
    carry = jax.lax.fori_loop(0, n_full, body(tiles, full_pairs, masked=False), init)
    out, row_max, row_sum = jax.lax.fori_loop(0, n_part, body(tiles.sub, part_pairs, masked=True), carry)
    safe_sum = jnp.where(row_sum > 0, row_sum, 1.0)  # queries that see no key: output 0
    return out / safe_sum[..., None], row_max + jnp.log(safe_sum)


def _swap(x):
    return jnp.swapaxes(x, -1, -2)


def _sink_rows(sinks, rows: int):
    """sinks [K, G] -> [K, rows] of the inner layout (row r = t * G + g reads sinks[:, g])."""
    return jnp.tile(sinks.astype(jnp.float32), (1, rows // sinks.shape[1]))


def add_sinks(out, lse, sinks):
    """(out, lse) of queries over their keys -> over their keys and their head's sink (a value-less key):
    out [B,K,T*G,H] fp32, lse [B,K,T*G], sinks [K, G]. Without sinks: unchanged."""
    if sinks is None:
        return out, lse
    new = jnp.logaddexp(lse, _sink_rows(sinks, lse.shape[-1]))
    return out * jnp.exp(lse - new)[..., None], new


def sinks_grad(sinks, lse, delta):
    """d loss / d sinks [K, G]: the sink is a key whose value is 0, so dS_sink = p_sink * (0 - delta), summed
    over the queries (lse with the sink, delta = rowsum(dO * O) of the final output)."""
    p_sink = jnp.exp(_sink_rows(sinks, lse.shape[-1]) - lse)  # [B, K, T*G]
    b, kh, rows = lse.shape
    return -(p_sink * delta).reshape(b, kh, -1, sinks.shape[1]).sum(axis=(0, 2))


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _blockwise(q, k, v, mask_ids, sinks, bq: int, bk: int, softcap):
    return _blockwise_fwd(q, k, v, mask_ids, sinks, bq, bk, softcap)[0]


def _split(bq: int, bk: int) -> int:
    """How finely partly masked tiles are cut: PARTIAL_SPLIT where both edges divide into sub-tiles of at
    least MIN_SUB_TILE, else 1 (whole tiles)."""
    ok = bq % PARTIAL_SPLIT == 0 and bk % PARTIAL_SPLIT == 0 and min(bq, bk) // PARTIAL_SPLIT >= MIN_SUB_TILE
    return PARTIAL_SPLIT if ok else 1


def _tiles(mask_ids, bq, bk, q):
    return _Tiles(mask_ids, bq, bk, q.shape[2] // mask_ids[0].shape[1], _split(bq, bk))


def _blockwise_fwd(q, k, v, mask_ids, sinks, bq, bk, softcap):
    live = _live_pairs(mask_ids, bq, bk, _split(bq, bk))
    out, lse = add_sinks(*block_fwd(q, k, v, mask_ids, bq, bk, live, softcap=softcap), sinks)
    return out.astype(q.dtype), (q, k, v, mask_ids, sinks, out, lse, live)


def _blockwise_bwd(bq, bk, softcap, residuals, d_out):
    q, k, v, mask_ids, sinks, out, lse, live = residuals
    d_out = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out * out, axis=-1)
    dq, dk, dv = block_bwd(q, k, v, mask_ids, lse, delta, d_out, bq, bk, live, softcap=softcap)
    no_grad = jax.tree.map(lambda x: None, mask_ids)  # integer ids: no cotangent
    d_sinks = None if sinks is None else sinks_grad(sinks, lse, delta).astype(sinks.dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), no_grad, d_sinks


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# Block-level pieces, in the inner layout (q [B,K,T*G,H] pre-scaled, k/v [B,K,S,H], mask_ids padded to whole
# tiles): `_blockwise` above is one call of each; ring attention (ring.py) calls them once per visiting KV
# block and merges the blocks' (out, lse) itself.


def block_fwd(q, k, v, mask_ids, bq: int, bk: int, live=None, *, softcap=None):
    """Attention of q against one KV block over its live tiles: (out fp32 [B,K,T*G,H], normalised within the
    block, 0 where no key is visible; lse fp32 [B,K,T*G], the rows' log-sum-exp, _MASKED where none is)."""
    tiles = _tiles(mask_ids, bq, bk, q)
    live = _live_pairs(mask_ids, bq, bk, tiles.split) if live is None else live
    return _blockwise_fwd_impl(q, _swap(k), v, tiles, live, softcap)


def block_bwd(q, k, v, mask_ids, lse, delta, d_out, bq: int, bk: int, live=None, *, softcap=None):
    """The FlashAttention-2 backward of one KV block, each live tile's probabilities recomputed from the
    GIVEN lse (the row's over all its keys and its sink) and delta = rowsum(dO * O) (its final output):
    dS = P * (dO V^T - delta) (times 1 - tanh^2 under a softcap), dQ = dS K, dK^T = Q^T dS, dV^T = dO^T P.
    d_out fp32; returns fp32 (dq, dk, dv)."""
    tiles = _tiles(mask_ids, bq, bk, q)
    live = _live_pairs(mask_ids, bq, bk, tiles.split) if live is None else live
    q_t, k_t, v_t, do_t = _swap(q), _swap(k), _swap(v), _swap(d_out)
    full_pairs, n_full, part_pairs, n_part = live

    def body(t: _Tiles, pairs, masked: bool):
        def step(p, carry):
            dq, dk_t, dv_t = carry
            i, j = pairs[p, 0], pairs[p, 1]
            s, tanh = _capped(_mm(t.rows(q, i), t.keys(k_t, j, 3)), softcap)
            probs = jnp.exp(s - t.rows(lse, i)[..., None])  # [B, K, bq*G, bk]
            if masked:
                probs = jnp.where(t.mask(i, j), probs, 0.0)
            dp = _mm(t.rows(d_out, i), t.keys(v_t, j, 3))
            ds = probs * (dp - t.rows(delta, i)[..., None])
            if tanh is not None:
                ds = ds * (1.0 - tanh * tanh)
            dv_t = t.put_keys(dv_t, t.keys(dv_t, j, 3) + _mm(t.query_cols(do_t, i), probs), j, 3)
            dk_t = t.put_keys(dk_t, t.keys(dk_t, j, 3) + _mm(t.query_cols(q_t, i), ds), j, 3)
            dq = t.put_rows(dq, t.rows(dq, i) + _mm(ds, t.keys(k, j, 2)), i)
            return dq, dk_t, dv_t
        return step

    zeros = partial(jnp.zeros_like, dtype=jnp.float32)
    carry = jax.lax.fori_loop(0, n_full, body(tiles, full_pairs, masked=False), (zeros(q), zeros(k_t), zeros(v_t)))
    dq, dk_t, dv_t = jax.lax.fori_loop(0, n_part, body(tiles.sub, part_pairs, masked=True), carry)
    return dq, _swap(dk_t), _swap(dv_t)


def blockwise_attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, window=None,
                        sinks=None, *, softcap=None, scale=None, block=BLOCK):
    """Same contract as xla_attention, the mask given by ids (and `window`); q [B,T,N,H], k/v [B,S,K,H] ->
    [B,T,N,H]. `block`: the tile edge, or (query tile, key tile)."""
    qi, ki, vi, mask_ids, (bq, bk) = to_blocks(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                                               block, window=window, scale=scale)
    sinks = inner_sinks(sinks, k.shape[2], like=qi)
    if q.shape[0] == 1 or not ROWS_APART:
        out = _blockwise(qi, ki, vi, mask_ids, sinks, bq, bk, softcap)
    else:  # one row at a time, each visiting its own live tiles (the window scalar is shared)
        ids, win = mask_ids[:4], mask_ids[4]
        one = lambda a: _blockwise(*a[:3], (*a[3], win), sinks, bq, bk, softcap)  # noqa: E731
        out = jax.lax.map(one, jax.tree.map(lambda x: x[:, None], (qi, ki, vi, ids)))[:, 0]
    return from_blocks(out, q.shape).astype(q.dtype)


def inner_sinks(sinks, kv_heads: int, like=None):
    """[N] per query head -> [K, G] of the inner layout (query head n = kv head n // G, group n % G). Inside a
    shard_map, made device-varying like `like` (the queries): each device's custom_vjp returns its own
    d sinks, and the transpose of this cast sums them over the devices."""
    if sinks is None:
        return None
    sinks = sinks.reshape(kv_heads, -1)
    axes = tuple(sorted(_varying(like) - _varying(sinks)))
    return jax.lax.pcast(sinks, axes, to="varying") if axes else sinks


def _varying(x) -> frozenset:
    """The mesh axes x varies over inside a shard_map (empty outside one)."""
    manual = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset() if manual is None else manual.varying


def to_blocks(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, block=BLOCK, *, window=None,
              scale=None):
    """The inner layout of the block functions: (q [B,K,T'*G,H] scaled by `scale` (H^-0.5), k/v [B,K,S',H],
    mask ids (q_seg, kv_seg, q_pos, kv_pos, window), (bq, bk)), T and S padded up to whole tiles."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    bq, bk = (block, block) if isinstance(block, int) else block
    bq, bk = min(bq, t), min(bk, k.shape[1])
    # Padding tokens (segment 0) are never visible, so padding T and S up to whole tiles changes nothing.
    pad_q = lambda x: _pad_to(x, 1, bq)  # noqa: E731
    pad_k = lambda x: _pad_to(x, 1, bk)  # noqa: E731
    mask_ids = (pad_q(q_segment_ids), pad_k(kv_segment_ids), pad_q(q_positions), pad_k(kv_positions),
                window_data(window))
    qi = pad_q(q * jnp.asarray(_scale(scale, h), q.dtype)).reshape(b, -1, kh, n // kh, h)  # [B, T', K, G, H]
    qi = qi.transpose(0, 2, 1, 3, 4).reshape(b, kh, -1, h)  # [B, K, T'*G, H]
    ki, vi = (pad_k(x).transpose(0, 2, 1, 3) for x in (k, v))  # [B, K, S', H]
    return qi, ki, vi, mask_ids, (bq, bk)


def from_blocks(out, q_shape):
    """[B, K, T'*G, H] (the inner layout) -> [B, T, N, H] of q_shape."""
    b, t, n, h = q_shape
    kh = out.shape[1]
    return out.reshape(b, kh, -1, n // kh, h).transpose(0, 2, 1, 3, 4).reshape(b, -1, n, h)[:, :t]
