"""The MoE layer with experts split over a mesh axis (expert parallelism), inside `jax.shard_map`.

Each device of the `expert_axis` holds E / n experts (weights split on their leading `experts` dim) and a
shard of the tokens (the batch split over `batch_axes`, each row's tokens over `length_axes`: sequence
parallelism; tokens are independent in the MoE MLP, so a device just sees its local tokens). A device routes its own tokens, all-gathers the
tokens and their routing over the expert axis, runs the assignments that hit its own experts (the same
dispatch as on one device: `moe.dispatch_combine`, other experts' assignments are not computed), and a
reduce-scatter (psum_scatter) sums each token's partial outputs back onto the device that owns it. The
transposes are the same pair reversed, so the backward moves the same bytes.

All-gather + reduce-scatter moves S*n*D values per device where ragged all-to-all would move ~S*R*D; it
needs no send/receive size exchange and keeps the compute shapes static, which is the simpler choice at the
expert-axis sizes a fine-tune uses (2-8). Router statistics are summed over all token shards (psum), so the
router losses are those of the whole global batch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jsft.models.moe import MoeSpec, dispatch_combine, route, router_logits, router_stats

# parameters with a leading experts dim; the router (and its bias) are replicated
EXPERT_PARAMS = ("gate_up_proj", "down_proj", "gate_up_bias", "down_bias")


def expert_axis_sizes(num_experts: int, devices: int) -> list[int]:
    """The expert-axis sizes that work: those dividing both the experts and the devices."""
    return [e for e in range(1, min(num_experts, devices) + 1) if num_experts % e == 0 and devices % e == 0]


def check_expert_axis(spec: MoeSpec, mesh: Mesh, expert_axis: str) -> int:
    """The expert-axis size, or a one-line error naming the sizes that divide the experts."""
    if expert_axis not in mesh.shape:
        raise ValueError(f"MoE: mesh axes {tuple(mesh.shape)} have no expert axis {expert_axis!r}")
    n = mesh.shape[expert_axis]
    if spec.num_experts % n:
        ok = expert_axis_sizes(spec.num_experts, mesh.size)
        raise ValueError(
            f"MoE: mesh.{expert_axis}={n} does not divide num_experts={spec.num_experts}; sizes that work on "
            f"{mesh.size} devices: {ok}")
    return n


def moe_expert_parallel(p: dict, x, spec: MoeSpec, mask=None, *, mesh: Mesh, expert_axis: str = "expert",
                        batch_axes: tuple[str, ...] | None = None, length_axes: tuple[str, ...] = ()):
    """As `moe.moe`, with experts split over `expert_axis`, the batch of x [B, T, D] split over `batch_axes`
    (default: the expert axis alone) and its length over `length_axes` (sequence parallelism). If the expert
    axis is not a batch axis, every device of it sees the same tokens and the partial outputs are summed
    (psum) instead. Returns (y [B, T, D], MoeStats summed over the whole batch)."""
    n = check_expert_axis(spec, mesh, expert_axis)
    batch_axes = (expert_axis,) if batch_axes is None else tuple(batch_axes)
    length_axes = tuple(length_axes)
    if expert_axis in length_axes:
        raise ValueError(f"MoE: the expert axis {expert_axis!r} splits rows (batch_axes), not their tokens")
    for dim, axes in ((0, batch_axes), (1, length_axes)):
        shards = math.prod(mesh.shape[a] for a in axes)
        if x.shape[dim] % shards:
            raise ValueError(f"MoE: x {list(x.shape)} dim {dim} does not split over {axes} ({shards} shards)")
    token_axes = (*batch_axes, *length_axes)  # every axis that splits tokens: the stats sum over them
    mask = jnp.ones(x.shape[:2], bool) if mask is None else mask
    gathered = expert_axis in batch_axes
    e_local = spec.num_experts // n

    def local(p, x, mask):
        b, t, d = x.shape
        xf, m = x.reshape(b * t, d), mask.reshape(b * t)
        logits = router_logits(p, xf, spec)  # [S, E] fp32, this device's tokens
        weights, ids = route(logits, spec)
        ids = jnp.where(m[:, None], ids, spec.num_experts)
        stats = router_stats(logits, ids, m, spec.num_experts, 0)
        if gathered:  # [S * n, ...]: the tokens of every device on the expert axis
            xf, weights, ids = (jax.lax.all_gather(a, expert_axis, tiled=True) for a in (xf, weights, ids))
        else:  # the same tokens on every expert device, each computing a different part: mark them varying
            xf, weights = (jax.lax.pcast(a, expert_axis, to="varying") for a in (xf, weights))
        local_ids = ids - jax.lax.axis_index(expert_axis) * e_local  # other devices' experts fall outside
        if gathered and spec.capacity_factor is None:
            y, dropped = _per_source(p, xf, weights, local_ids, spec, n)
        else:
            y, dropped = dispatch_combine(p, xf, weights, local_ids, spec, num_tokens=xf.shape[0])
        if gathered:
            y = jax.lax.psum_scatter(y, expert_axis, scatter_dimension=0, tiled=True)
        else:
            y = jax.lax.psum(y, expert_axis)
        stats = jax.lax.psum(stats, token_axes)
        # each device counted the drops of its own experts
        dropped = jax.lax.psum(dropped.astype(jnp.float32), tuple(dict.fromkeys((*token_axes, expert_axis))))
        return y.reshape(b, t, d), stats._replace(dropped=dropped)

    p_specs = {k: P(expert_axis) if k in EXPERT_PARAMS else P() for k in p}
    tokens = P(batch_axes, length_axes or None)  # [B, T]: rows over the batch axes, each row's tokens over S
    return jax.shard_map(
        local, mesh=mesh, in_specs=(p_specs, tokens, tokens), out_specs=(tokens, P()),
    )(p, x, mask)


def _per_source(p: dict, xf, weights, local_ids, spec: MoeSpec, n: int):
    """Dropless dispatch of the gathered tokens one source device's shard at a time, each shard's expert MLP
    recomputed in the backward (jax.checkpoint). A dispatch over all n*S gathered tokens sizes its buffers for
    all n*S*R assignments (any of them may route here), n times what one device's experts receive on average;
    per shard they are S*R, so the layer's temporaries do not grow with E. The cost: one more forward of this
    device's experts in the backward."""
    s = xf.shape[0] // n

    @jax.checkpoint
    def shard(args):
        x, w, ids = args
        return dispatch_combine(p, x, w, ids, spec, num_tokens=s)[0]

    y = jax.lax.map(shard, (xf.reshape(n, s, -1), weights.reshape(n, s, -1), local_ids.reshape(n, s, -1)))
    return y.reshape(n * s, -1), jnp.zeros((), jnp.int32)
