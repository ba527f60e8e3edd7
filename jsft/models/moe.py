"""A mixture-of-experts MLP: router, top-k routing, dispatch by sorting, grouped matmuls, un-permute, combine.

Dimension letters used in einsums and shape comments:
  S tokens (batch x sequence, flattened), D hidden, E experts, F expert MLP hidden, R routed experts per token
  (top-k), A assignments (S*R), P dispatch slots, G tiles, C rows per tile or per expert (capacity).

Routing as each family defines it (`MoeSpec.routing`):
  "softmax_topk"  Qwen3-MoE / Mixtral: softmax over all E logits, top-R of the probabilities; renormalised to
                  sum 1 iff `norm_topk_prob` (Mixtral always renormalises: its spec sets it true).
  "topk_softmax"  gpt-oss: top-R of the logits (router with bias), softmax over the R selected logits.

Dispatch: the A = S*R (token, expert) assignments are sorted by expert (a stable argsort, so ties keep token
order) and laid out in P slots, one contiguous run per expert; the experts run as grouped matmuls over the
runs; the outputs return to assignment order and are summed with the routing weights. Both moves are gathers
by an explicit index and its inverse (`_take`), so the backward is a gather too: no scatter-add over tokens.
The slot layout depends on `MoeSpec.kernel`:
  "ragged_dot"  slots = the sorted order, experts run as `jax.lax.ragged_dot` (one group per expert).
  "tiles"       each expert's run padded to a multiple of `tile_rows`; every tile belongs to one expert and a
                loop over the tiles multiplies each by its expert's weights. Dropless, at most E*(tile_rows-1)
                padding rows. XLA:CPU lowers ragged_dot to E masked dense matmuls (E times the
                flops), so this is the CPU default; see BENCHMARKS.md.
  "plan"        jsft.plan on XLA:CPU only, never trained: ragged_dot's operand and result shapes as one dense
                matmul, so the compiled memory is what ragged_dot needs on a GPU (XLA:CPU expands ragged_dot to
                E dense matmuls, and the tiles loop saves a weight copy per tile: both report E-fold memory).
  capacity      with `capacity_factor`, each expert gets C = ceil(cf * S * R / E) slots ([E, C] rows, one batched
                matmul); assignments past an expert's C-th (in token order) are dropped and counted.
Padding tokens (mask false) get the sentinel expert E: sorted past every run, never computed, never counted.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import transformers

ROUTINGS = ("softmax_topk", "topk_softmax")
ACTIVATIONS = ("silu", "gpt_oss")  # silu(gate) * up; gpt-oss' clamped SwiGLU
KERNELS = ("auto", "ragged_dot", "tiles", "plan")
MOE_MODEL_TYPES = ("qwen3_moe", "mixtral", "gpt_oss")


def expert_hidden_size(hf: transformers.PretrainedConfig) -> int:
    """F, each expert's MLP hidden size."""
    return hf.moe_intermediate_size if hf.model_type == "qwen3_moe" else hf.intermediate_size


def sparse_layers(hf: transformers.PretrainedConfig) -> tuple[bool, ...]:
    """Which decoder layers are MoE (the others dense): Qwen3-MoE's `mlp_only_layers` and
    `decoder_sparse_step`, as transformers' Qwen3MoeDecoderLayer decides; Mixtral and gpt-oss: all."""
    n = hf.num_hidden_layers
    if hf.model_type != "qwen3_moe":
        return (True,) * n
    return tuple(i not in hf.mlp_only_layers and hf.num_experts > 0 and (i + 1) % hf.decoder_sparse_step == 0
                 for i in range(n))


@dataclasses.dataclass(frozen=True)
class MoeSpec:
    """What one MoE layer computes; the decoder builds it from the HF config."""

    num_experts: int
    top_k: int
    routing: str = "softmax_topk"  # one of ROUTINGS
    norm_topk_prob: bool = True  # softmax_topk only: renormalise the R selected probabilities to sum 1
    activation: str = "silu"  # one of ACTIVATIONS
    swiglu_alpha: float = 1.702  # gpt_oss: glu = gate * sigmoid(alpha * gate)
    swiglu_limit: float = 7.0  # gpt_oss: gate clamped above, up clamped to [-limit, limit]
    router_bias: bool = False  # gpt-oss' router has a bias
    expert_bias: bool = False  # gpt-oss' experts have gate_up and down biases
    capacity_factor: float | None = None  # None: dropless; else capacity-bounded dispatch
    kernel: str = "auto"  # one of KERNELS; auto: ragged_dot on GPU/TPU, tiles on CPU
    tile_rows: int = 128  # rows per tile of the "tiles" kernel

    def __post_init__(self):
        if self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"MoE: top_k={self.top_k} must lie in [1, num_experts={self.num_experts}]")
        for field, value, allowed in (
            ("routing", self.routing, ROUTINGS), ("activation", self.activation, ACTIVATIONS),
            ("kernel", self.kernel, KERNELS),
        ):
            if value not in allowed:
                raise ValueError(f"MoE: {field}={value!r} is not supported; use one of {allowed}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"MoE: capacity_factor={self.capacity_factor} must be > 0 (or None for dropless)")
        if self.tile_rows < 1:
            raise ValueError(f"MoE: tile_rows={self.tile_rows} must be >= 1")

    @classmethod
    def from_hf(cls, hf: transformers.PretrainedConfig, **options) -> "MoeSpec":
        """The spec of an HF MoE config (qwen3_moe, mixtral, gpt_oss); `options`: capacity_factor, kernel,
        tile_rows. A config this layer would compute differently from transformers is refused, naming the
        family and the field."""
        mt = hf.model_type
        if mt not in MOE_MODEL_TYPES:
            raise ValueError(f"MoE: model_type {mt!r} is not supported; supported: {', '.join(MOE_MODEL_TYPES)}")
        for field in ("shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts"):
            if getattr(hf, field, None):
                raise ValueError(f"MoE: {mt} config sets {field}={getattr(hf, field)}; shared experts are not "
                                 "implemented")
        if hf.hidden_act != "silu":
            raise ValueError(f"MoE: {mt} hidden_act={hf.hidden_act!r} is not supported (only silu)")
        if getattr(hf, "router_jitter_noise", None):  # transformers multiplies the inputs by noise in training
            raise ValueError(f"MoE: {mt} router_jitter_noise={hf.router_jitter_noise} is not supported (set 0)")
        experts = hf.num_experts if mt == "qwen3_moe" else hf.num_local_experts
        if mt == "gpt_oss":
            return cls(experts, hf.num_experts_per_tok, "topk_softmax", activation="gpt_oss",
                       swiglu_alpha=hf.swiglu_alpha, swiglu_limit=hf.swiglu_limit, router_bias=True,
                       expert_bias=True, **options)
        norm = hf.norm_topk_prob if mt == "qwen3_moe" else True  # Mixtral always renormalises
        return cls(experts, hf.num_experts_per_tok, "softmax_topk", norm_topk_prob=norm, **options)

    def resolved_kernel(self) -> str:
        if self.kernel != "auto":
            return self.kernel
        return "tiles" if jax.default_backend() == "cpu" else "ragged_dot"

    def capacity(self, num_tokens: int) -> int:
        """Slots per expert under capacity_factor: ceil(cf * tokens * R / E)."""
        return max(1, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts))


_normal = jax.nn.initializers.normal(0.02)
_zeros = jax.nn.initializers.zeros


def param_table(spec: MoeSpec, hidden: int, expert_hidden: int) -> dict[str, tuple[tuple[int, ...], tuple, Callable]]:
    """Every parameter of one MoE layer: name -> (shape, logical axes, init), as decoder's `_param_table`.
    gate_up_proj holds gate ([:, :, 0]) and up ([:, :, 1]) so one grouped matmul computes both."""
    d, e, f = hidden, spec.num_experts, expert_hidden
    table = {
        "router": ((d, e), ("embed", None), _normal),
        "gate_up_proj": ((e, d, 2, f), ("experts", "embed", None, "mlp"), _normal),
        "down_proj": ((e, f, d), ("experts", "mlp", "embed"), _normal),
    }
    if spec.router_bias:
        table["router_bias"] = ((e,), (None,), _zeros)
    if spec.expert_bias:
        table["gate_up_bias"] = ((e, 2, f), ("experts", None, "mlp"), _zeros)
        table["down_bias"] = ((e, d), ("experts", "embed"), _zeros)
    return table


class MoeStats(NamedTuple):
    """Sums over one layer's real tokens (stack layers on a leading axis); all add exactly over micro-batches
    and devices. See `load_balancing_loss`, `z_loss` and `expert_load`."""

    expert_counts: jax.Array  # [E] real assignments routed to each expert (before capacity drops)
    prob_sum: jax.Array  # [E] sum over real tokens of softmax(router logits)
    tokens: jax.Array  # [] real tokens
    z_sum: jax.Array  # [] sum over real tokens of logsumexp(router logits)^2
    dropped: jax.Array  # [] real assignments dropped by the capacity bound


# ---- routing ----------------------------------------------------------------------------------------------------


def router_logits(p: dict, x, spec: MoeSpec):
    """x [S, D] -> fp32 logits [S, E] (the matmul accumulates in fp32; bias added in fp32)."""
    logits = jnp.matmul(x, p["router"].astype(x.dtype), preferred_element_type=jnp.float32)
    if spec.router_bias:
        logits = logits + p["router_bias"].astype(jnp.float32)
    return logits


def route(logits, spec: MoeSpec):
    """fp32 logits [S, E] -> (weights [S, R] fp32, expert ids [S, R] int32) as the family defines them."""
    if spec.routing == "softmax_topk":
        weights, ids = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), spec.top_k)
        if spec.norm_topk_prob:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    else:
        top, ids = jax.lax.top_k(logits, spec.top_k)
        weights = jax.nn.softmax(top, axis=-1)
    return weights, ids.astype(jnp.int32)


def router_stats(logits, ids, mask, num_experts: int, dropped) -> MoeStats:
    """Sums over real tokens (mask [S] bool) for the router losses and load metrics."""
    m = mask.astype(jnp.float32)
    # padding carries the sentinel id num_experts, which the scatter drops
    counts = jnp.zeros((num_experts,), jnp.float32).at[ids.reshape(-1)].add(1.0, mode="drop")
    lse = jax.nn.logsumexp(logits, axis=-1)  # [S]
    return MoeStats(
        expert_counts=jax.lax.stop_gradient(counts),
        prob_sum=jnp.sum(jax.nn.softmax(logits, axis=-1) * m[:, None], axis=0),
        tokens=jnp.sum(m),
        z_sum=jnp.sum(m * lse * lse),
        dropped=jnp.asarray(dropped, jnp.float32),
    )


def load_balancing_loss(stats: MoeStats):
    """transformers' `load_balancing_loss_func` (Switch Transformer) from stats summed over layers, tokens and
    devices: E * sum_e (count_e / rows) * (prob_e / rows), rows = real tokens summed over layers (0 for
    stats of no real token, e.g. a padding micro-batch)."""
    e = stats.expert_counts.shape[-1]
    rows = jnp.maximum(jnp.sum(stats.tokens), 1.0)
    counts = stats.expert_counts.reshape(-1, e).sum(0)
    probs = stats.prob_sum.reshape(-1, e).sum(0)
    return e * jnp.sum(counts * probs) / (rows * rows)


def z_loss(stats: MoeStats):
    """Router z-loss (ST-MoE): the mean over real tokens and layers of logsumexp(logits)^2, as (sum, count)."""
    return jnp.sum(stats.z_sum), jnp.sum(stats.tokens)


def expert_load(stats: MoeStats):
    """Per layer (leading axes kept): (max, mean) of tokens per expert; max/mean = 1 is perfect balance."""
    return jnp.max(stats.expert_counts, axis=-1), jnp.mean(stats.expert_counts, axis=-1)


# ---- dispatch ---------------------------------------------------------------------------------------------------


@jax.custom_vjp
def _take(x, idx, inv):
    """x [N, ...] -> [len(idx), ...]: row i is x[idx[i]], or zeros where idx[i] == N. idx must be injective on
    its valid entries and inv its inverse (inv[j] = the i with idx[i] == j, or len(idx) for rows not taken);
    then the transpose is the gather `_take(dy, inv, idx)`, never a scatter-add."""
    return jnp.concatenate([x, jnp.zeros_like(x[:1])])[idx]


def _take_fwd(x, idx, inv):
    return _take(x, idx, inv), (idx, inv)


def _take_bwd(res, dy):
    idx, inv = res
    return _take(dy, inv, idx), None, None


_take.defvjp(_take_fwd, _take_bwd)


class Layout(NamedTuple):
    """Where each assignment sits among the P dispatch slots, and which expert owns each slot."""

    slot: jax.Array  # [A] slot of each assignment, P where it is dropped or padding
    source: jax.Array  # [P] assignment in each slot, A where the slot is empty
    slot_expert: jax.Array  # [P] expert owning each slot (clipped to E-1 for empty tail slots)
    groups: jax.Array  # ragged_dot: [E] rows per expert; tiles: [G] expert of each tile; capacity: unused
    dropped: jax.Array  # [] real assignments dropped by the capacity bound
    used_tiles: jax.Array  # [] tiles: tiles holding rows (the rest of the G are empty)


def plan_dispatch(ids, num_experts: int, kind: str, *, capacity: int = 0, tile_rows: int = 0) -> Layout:
    """ids [A] int32 (num_experts marks padding) -> the slot layout for `kind` in ("ragged_dot", "tiles",
    "capacity"). Integer bookkeeping only: nothing here carries a gradient."""
    a, e = ids.shape[0], num_experts
    order = jnp.argsort(ids, stable=True)  # [A] assignments sorted by expert, token order within an expert
    sorted_ids = ids[order]
    counts = jnp.zeros((e + 1,), jnp.int32).at[ids].add(1)[:e]  # [E]
    start = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts)])  # [E+1]; start[E] = real total
    rank = jnp.arange(a, dtype=jnp.int32) - start[sorted_ids]  # position within its expert's run
    real = sorted_ids < e
    dropped = used_tiles = jnp.zeros((), jnp.int32)
    if kind == "ragged_dot":
        p = a
        slot_sorted = jnp.arange(a, dtype=jnp.int32)
        slot_expert = jnp.minimum(sorted_ids, e - 1)
        groups = counts
    elif kind == "tiles":
        tiles = -(-counts // tile_rows)  # [E] tiles per expert
        tile_start = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(tiles)])  # [E+1]
        num_tiles = -(-(a + e * (tile_rows - 1)) // tile_rows)  # static bound on sum(tiles)
        p = num_tiles * tile_rows
        slot_sorted = tile_start[jnp.minimum(sorted_ids, e - 1)] * tile_rows + rank
        groups = jnp.minimum(jnp.searchsorted(tile_start[1:], jnp.arange(num_tiles), side="right"), e - 1)
        slot_expert = jnp.repeat(groups, tile_rows, total_repeat_length=p)
        used_tiles = tile_start[e]
    elif kind == "capacity":
        p = e * capacity
        kept = rank < capacity
        dropped = jnp.sum(real & ~kept)
        real = real & kept
        slot_sorted = jnp.minimum(sorted_ids, e - 1) * capacity + rank
        slot_expert = jnp.repeat(jnp.arange(e, dtype=jnp.int32), capacity, total_repeat_length=p)
        groups = counts
    else:
        raise ValueError(f"MoE: unknown dispatch kind {kind!r}")
    slot_sorted = jnp.where(real, slot_sorted, p).astype(jnp.int32)
    slot = jnp.zeros((a,), jnp.int32).at[order].set(slot_sorted)
    # dropped/padding assignments all write to the extra row p, which is cut off
    source = jnp.full((p + 1,), a, jnp.int32).at[slot_sorted].set(order.astype(jnp.int32))[:p]
    return Layout(slot, source, slot_expert, groups, dropped, used_tiles)


def _grouped_matmul(xs, w, layout: Layout, kind: str):
    """xs [P, D'] (slots) @ each slot's expert's w [E, D', N] -> [P, N] fp32."""
    if kind == "ragged_dot":
        return jax.lax.ragged_dot(xs, w, layout.groups, preferred_element_type=jnp.float32)
    if kind == "plan":  # memory stand-in for ragged_dot (see the module docstring): wrong values, right shapes
        return jnp.matmul(xs, w[0], preferred_element_type=jnp.float32)
    if kind == "tiles":
        # a loop over the tiles, each reading its expert's weights in place: gathering [G, D', N] weight copies
        # for one batched matmul ran ~1.6x slower on XLA:CPU (fwd+bwd, 72 tiles of 128 rows)
        def tile(_, xt_e_used):
            xt, e, used = xt_e_used  # [C, D'], expert id, whether the tile holds rows
            we = jax.lax.dynamic_index_in_dim(w, e, keepdims=False)  # [D', N]
            # empty tail tiles (padding, or other devices' experts) cost nothing; the operands are passed
            # explicitly: a branch closing over all of w ran ~1.6x slower (fwd+bwd)
            y = jax.lax.cond(
                used, lambda xt, we: jnp.matmul(xt, we, preferred_element_type=jnp.float32),
                # zeros as an empty contraction, so they carry the operands' shard_map varying axes
                lambda xt, we: jnp.matmul(xt[:, :0], we[:0], preferred_element_type=jnp.float32), xt, we)
            return None, y

        g = layout.groups.shape[0]
        used = jnp.arange(g) < layout.used_tiles
        _, y = jax.lax.scan(tile, None, (xs.reshape(g, -1, xs.shape[-1]), layout.groups, used))  # [G, C, N]
        return y.reshape(xs.shape[0], -1)
    e = w.shape[0]
    y = jnp.einsum("ecd,edn->ecn", xs.reshape(e, -1, xs.shape[-1]), w, preferred_element_type=jnp.float32)
    return y.reshape(xs.shape[0], -1)


def _activation(gate, up, spec: MoeSpec):
    if spec.activation == "silu":
        return jax.nn.silu(gate) * up
    # gpt-oss: clamp, then (up + 1) * gate * sigmoid(alpha * gate)
    gate = jnp.minimum(gate, spec.swiglu_limit)
    up = jnp.clip(up, -spec.swiglu_limit, spec.swiglu_limit)
    return (up + 1) * (gate * jax.nn.sigmoid(gate * spec.swiglu_alpha))


def experts(p: dict, xs, layout: Layout, spec: MoeSpec, kind: str):
    """The expert MLPs over the dispatch slots: xs [P, D] -> [P, D] (compute dtype)."""
    e, d, _, f = p["gate_up_proj"].shape
    h = _grouped_matmul(xs, p["gate_up_proj"].reshape(e, d, 2 * f).astype(xs.dtype), layout, kind)  # [P, 2F]
    if spec.expert_bias:
        h = h + p["gate_up_bias"].reshape(e, 2 * f).astype(jnp.float32)[layout.slot_expert]
    h = h.astype(xs.dtype)
    h = _activation(h[:, :f], h[:, f:], spec)  # [P, F]
    y = _grouped_matmul(h, p["down_proj"].astype(xs.dtype), layout, kind)  # [P, D]
    if spec.expert_bias:
        y = y + p["down_bias"].astype(jnp.float32)[layout.slot_expert]
    return y.astype(xs.dtype)


def dispatch_combine(p: dict, x, weights, ids, spec: MoeSpec, *, num_tokens: int):
    """Run the routed tokens through the experts in `p` and combine. x [S, D]; weights [S, R]; ids [S, R] in
    [0, E_p) where E_p = p's experts, any other value = not computed here (padding, or an expert on another
    device). `num_tokens` sizes the capacity. Returns (y [S, D], dropped)."""
    s, r = ids.shape
    e = p["gate_up_proj"].shape[0]
    ids = jnp.where((ids >= 0) & (ids < e), ids, e).reshape(-1)  # [A]
    if spec.capacity_factor is not None:
        kind, layout = "capacity", plan_dispatch(ids, e, "capacity", capacity=spec.capacity(num_tokens))
    else:
        kind = spec.resolved_kernel()
        layout = plan_dispatch(ids, e, "ragged_dot" if kind == "plan" else kind, tile_rows=spec.tile_rows)
    with jax.named_scope("dispatch"):
        xa = jnp.broadcast_to(x[:, None, :], (s, r, x.shape[-1])).reshape(s * r, -1)  # [A, D]
        xs = _take(xa, layout.source, layout.slot)  # [P, D]
    with jax.named_scope("experts"):
        ys = experts(p, xs, layout, spec, kind)
    with jax.named_scope("combine"):
        ya = _take(ys, layout.slot, layout.source).reshape(s, r, -1)  # [S, R, D]
        y = jnp.einsum("srd,sr->sd", ya, weights.astype(x.dtype))
    return y, layout.dropped


def moe(p: dict, x, spec: MoeSpec, mask=None):
    """The MoE MLP on one device. x [B, T, D]; mask [B, T] bool (False: padding, neither routed nor counted;
    its output is zero). Returns (y [B, T, D], MoeStats)."""
    b, t, d = x.shape
    xf = x.reshape(b * t, d)
    m = jnp.ones((b * t,), bool) if mask is None else mask.reshape(b * t)
    with jax.named_scope("router"):
        logits = router_logits(p, xf, spec)  # [S, E] fp32
        weights, ids = route(logits, spec)
        ids = jnp.where(m[:, None], ids, spec.num_experts)
    y, dropped = dispatch_combine(p, xf, weights, ids, spec, num_tokens=b * t)
    return y.reshape(b, t, d), router_stats(logits, ids, m, spec.num_experts, dropped)
