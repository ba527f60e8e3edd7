"""Ring attention (context parallelism): attention over rows whose tokens are split over the `sequence` axis,
without splitting heads (so any head count works, and S may exceed the heads).

Each of the S devices of a sequence group keeps its T/S queries; the KV blocks (keys, values and their
segment ids and positions) travel around the ring with `ppermute`, one hop per step. At step t device d
holds the block of device d - t, attends its queries to it (blockwise.py's block_fwd: only the block's
live tiles, so a block the mask hides entirely costs no matmul) and merges the result into its running
output with an online log-sum-exp:

    lse = logaddexp(lse, lse_t);  out = out * exp(lse_old - lse) + out_t * exp(lse_t - lse)

S compute steps, S - 1 sends of the KV; XLA may overlap each send with the step's compute. The backward
(custom_vjp) runs the same ring with FlashAttention-2's per-block backward against the GLOBAL out and lse:
dq accumulates locally, dk/dv in buffers that travel with their KV block and make one last hop home.

Masking is only by segment ids and positions (attention.py), so the exactness does not depend on which
tokens a device holds: a sliding window follows the (global, per-sample) positions across block boundaries,
and a block wholly outside every query's window has no live tile, so it costs no matmul. A softcap applies
inside each block's tiles. Sinks join once, in the final merge (blockwise.add_sinks), not once per block; the
backward then uses the lse with the sink, and the sinks' gradient is summed over the local queries (and
over devices by shard_map's transpose of the replicated input).
Load balance does: with a contiguous split, device S-1's queries see every block
and device 0's only its own. The zigzag layout (MaxText, torchtitan) cuts each row into 2S chunks and gives
device d chunks d and 2S-1-d: the host lays every row out so (jsft/data/batch.py::zigzag_order), after the
causal shift, so the loss (a sum over target slots) is unchanged and this module needs no order of its own.

Dimension letters as attention.py: B batch, T tokens per device, N query heads, K kv heads, G = N/K, H head dim.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jsft.models import blockwise as A
from jsft.sharding import ACTIVATION_RULES

AXIS = ACTIVATION_RULES["length"][0]  # the mesh axis a row's tokens are split over


def _send(x, s: int):
    """Every array of x one hop along the ring: device d -> d + 1."""
    return jax.lax.ppermute(x, AXIS, [(d, (d + 1) % s) for d in range(s)])


def _merge(acc, block):
    """Two (out, lse) of the same queries over disjoint keys -> over both (an online softmax step)."""
    (out, lse), (o_t, lse_t) = acc, block
    new = jnp.logaddexp(lse, lse_t)
    return out * jnp.exp(lse - new)[..., None] + o_t * jnp.exp(lse_t - new)[..., None], new


@partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _ring(q, k, v, q_ids, kv_ids, window, sinks, s: int, bq: int, bk: int, softcap):
    return _ring_fwd(q, k, v, q_ids, kv_ids, window, sinks, s, bq, bk, softcap)[0]


def _mask_ids(q_ids, kv_ids, window):
    return (q_ids[0], kv_ids[0], q_ids[1], kv_ids[1], window)


def _ring_fwd(q, k, v, q_ids, kv_ids, window, sinks, s, bq, bk, softcap):
    """q [B,K,T*G,H] (pre-scaled), k/v [B,K,T,H], ids (segment ids, positions) [B, T] of this device,
    window an int32 scalar, sinks [K, G] or None."""

    def attend(acc, block):
        k_t, v_t, ids_t = block
        return _merge(acc, A.block_fwd(q, k_t, v_t, _mask_ids(q_ids, ids_t, window), bq, bk, softcap=softcap))

    def step(_, carry):
        acc, block = carry
        return attend(acc, block), _send(block, s)

    init = (jnp.zeros_like(q, jnp.float32), jnp.full_like(q[..., 0], A._MASKED, jnp.float32))
    acc, block = jax.lax.fori_loop(0, s - 1, step, (init, (k, v, kv_ids)))
    out, lse = A.add_sinks(*attend(acc, block), sinks)  # the last block: nothing left to send; then the sinks
    return out.astype(q.dtype), (q, k, v, q_ids, kv_ids, window, sinks, out, lse)


def _ring_bwd(s, bq, bk, softcap, residuals, d_out):
    q, k, v, q_ids, kv_ids, window, sinks, out, lse = residuals
    d_out = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out * out, axis=-1)  # rowsum(dO * O) of the final output

    def attend(dq, block):
        k_t, v_t, ids_t, dk_t, dv_t = block
        mask_ids = _mask_ids(q_ids, ids_t, window)
        dq_t, dk_b, dv_b = A.block_bwd(q, k_t, v_t, mask_ids, lse, delta, d_out, bq, bk, softcap=softcap)
        return dq + dq_t, (k_t, v_t, ids_t, dk_t + dk_b, dv_t + dv_b)

    def step(_, carry):
        dq, block = attend(*carry)
        return dq, _send(block, s)

    zeros = partial(jnp.zeros_like, dtype=jnp.float32)
    carry = (zeros(q), (k, v, kv_ids, zeros(k), zeros(v)))
    dq, block = attend(*jax.lax.fori_loop(0, s - 1, step, carry))
    dk, dv = _send(block[3:], s)  # the buffers hold block d+1's gradients: one hop home
    no_grad = jax.tree.map(lambda x: None, (q_ids, kv_ids, window))
    d_sinks = None if sinks is None else A.sinks_grad(sinks, lse, delta).astype(sinks.dtype)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), *no_grad, d_sinks)


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(q, k, v, segment_ids, positions, block=A.BLOCK, *, window=None, sinks=None, softcap=None,
                   scale=None):
    """Self-attention of q [B,T,N,H], k/v [B,T,K,H] split over (batch, sequence), with the row's segment ids
    and positions [B, T] split alike, in any token order (the trainer's is jsft/data/batch.py::zigzag_order).
    Returns [B,T,N,H], split like q. window / sinks [N] / softcap / scale: as attention.attention."""
    s = jax.sharding.get_abstract_mesh().shape[AXIS]
    rows = ACTIVATION_RULES["batch"]
    tokens, ids = P(rows, AXIS, None, None), P(rows, AXIS)

    def per_device(q, k, v, segment_ids, positions, window, sinks):
        qi, ki, vi, (q_seg, kv_seg, q_pos, kv_pos, win), (bq, bk) = A.to_blocks(
            q, k, v, segment_ids, segment_ids, positions, positions, block, window=window, scale=scale)
        with jax.named_scope("ring_attention"):
            out = _ring(qi, ki, vi, (q_seg, q_pos), (kv_seg, kv_pos), win, A.inner_sinks(sinks, k.shape[2], like=qi), s,
                        bq, bk, softcap)
        return A.from_blocks(out, q.shape).astype(q.dtype)

    specs = (tokens, tokens, tokens, ids, ids, P(), P())
    return jax.shard_map(per_device, in_specs=specs, out_specs=tokens)(
        q, k, v, segment_ids, positions, A.window_data(window), sinks)
