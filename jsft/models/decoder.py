"""The decoder: embeddings, a scanned stack of pre-norm blocks (GQA attention + gated MLP), final norm, logits.

Layers that differ only in their attention (Gemma 3's sliding and full layers, each kind with its own rope)
stay ONE scanned stack: the kind travels as data, a per-layer window, inverse frequencies and rope scaling
scanned with the parameters (ModelConfig.layer_specs is the one place they come from).

Dimension letters used in einsums and shape comments:
  B batch, T sequence, D hidden (embed), N query heads, K kv heads, H head dim, F MLP hidden, V vocab, L layers.

Parameters live in a Flax NNX module; each is declared once with its shape, logical axes and init in
`_param_table` (optional LoRA adapters, see jsft/models/lora.py, in `_adapter_table`). Layers are stacked
on a leading `layers` axis and run with `jax.lax.scan`, so compile time does not grow with depth; each
scanned block can be rematerialised with a selectable policy.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jsft.config import REMAT_POLICIES as POLICY_NAMES
from jsft.models.attention import attention, resolve_impl
from jsft.models import moe as moe_layer
from jsft.models.blockwise import NO_WINDOW  # a full layer inside a stack that carries windows as data
from jsft.models.config import GEMMA, ModelConfig
from jsft.models.moe_parallel import moe_expert_parallel
from jsft.sharding import ACTIVATION_RULES, constrain, expert_size

# the jax checkpoint policy of each of the config's remat policies (none: no remat)
REMAT_POLICIES = dict(zip(POLICY_NAMES, (
    None, jax.checkpoint_policies.dots_with_no_batch_dims_saveable, jax.checkpoint_policies.nothing_saveable,
)))


_normal = jax.nn.initializers.normal(0.02)
_ones = jax.nn.initializers.ones
_zeros = jax.nn.initializers.zeros


def _param_table(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], Callable]]:
    """Every per-layer parameter: name -> (shape, logical axes, init). The stack adds a leading `layers` axis."""
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    norm_init = _zeros if cfg.norm_offset else _ones  # Gemma's (1 + w) norms start at w = 0
    table = {
        "attn_norm": ((d,), ("norm",), norm_init),
        "q_proj": ((d, n, h), ("embed", "heads", "head_dim"), _normal),
        "k_proj": ((d, k, h), ("embed", "kv_heads", "head_dim"), _normal),
        "v_proj": ((d, k, h), ("embed", "kv_heads", "head_dim"), _normal),
        "o_proj": ((n, h, d), ("heads", "head_dim", "embed"), _normal),
        "mlp_norm": ((d,), ("norm",), norm_init),
    }
    if cfg.qkv_bias:
        table["q_bias"] = ((n, h), ("heads", "head_dim"), _zeros)
        table["k_bias"] = ((k, h), ("kv_heads", "head_dim"), _zeros)
        table["v_bias"] = ((k, h), ("kv_heads", "head_dim"), _zeros)
    if cfg.o_bias:
        table["o_bias"] = ((d,), ("norm",), _zeros)
    if cfg.qk_norm:
        table["q_norm"] = ((h,), ("norm",), norm_init)
        table["k_norm"] = ((h,), ("norm",), norm_init)
    if cfg.model_type in GEMMA:  # norms on the attention and MLP outputs, before the residual add
        table["post_attn_norm"] = ((d,), ("norm",), norm_init)
        table["post_mlp_norm"] = ((d,), ("norm",), norm_init)
    if cfg.attention_sinks:
        table["sinks"] = ((n,), ("heads",), _zeros)
    return table


# the MoE MLP's parameters carry this prefix; they stack over the sparse layers only
MOE_PREFIX = "moe_"


def _mlp_tables(cfg: ModelConfig) -> dict[str, tuple[int, tuple, tuple, Callable]]:
    """The MLP parameters: name -> (stacked count, shape, logical axes, init). The dense MLP stacks over the
    dense layers, the MoE MLP (jsft.models.moe.param_table, names with MOE_PREFIX) over the sparse ones."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    sparse = sum(cfg.layer_is_sparse())
    dense = cfg.num_layers - sparse
    table = {}
    if dense:
        table.update({
            "gate_proj": (dense, (d, f), ("embed", "mlp"), _normal),
            "up_proj": (dense, (d, f), ("embed", "mlp"), _normal),
            "down_proj": (dense, (f, d), ("mlp", "embed"), _normal),
        })
    if sparse:
        for name, (shape, axes, init) in moe_layer.param_table(cfg.moe, d, cfg.moe_intermediate_size).items():
            table[MOE_PREFIX + name] = (sparse, shape, axes, init)
    return table


def _runs(cfg: ModelConfig) -> list[tuple[int, int, bool, int]]:
    """The stack as runs of consecutive layers of one MLP kind: (first layer, end, sparse, first index into
    that kind's stacked MLP parameters). Dense models, Mixtral and default Qwen3-MoE are one run: one scan."""
    runs, counts = [], [0, 0]
    for i, sparse in enumerate(cfg.layer_is_sparse()):
        if runs and runs[-1][2] == sparse:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1, sparse, counts[sparse]])
        counts[sparse] += 1
    return [tuple(r) for r in runs]


# LoRA: projections whose input spans more than one jsft axis (o_proj reads [N, H])
_INPUT_AXES = {"o_proj": 2}


def _kaiming_uniform(fan_in: int) -> Callable:
    """torch's kaiming_uniform_(a=sqrt(5)) as PEFT initialises lora_A: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def _adapter_table(cfg: ModelConfig, rank: int, targets) -> dict[str, tuple]:
    """LoRA adapters per target projection W [*in, *out]: name -> (a, b), each (shape, logical axes, init):
    a [*in, r] (kaiming-uniform) and b [r, *out] (zeros, so training starts from the base model). `in`/`out`
    keep the base's logical axes, so they shard like the base; the rank axis stays replicated."""
    mlp = {name: (shape, axes, init) for name, (_, shape, axes, init) in _mlp_tables(cfg).items()}
    base, table = {**_param_table(cfg), **mlp}, {}
    for name in targets:
        if name in ("gate_proj", "up_proj", "down_proj") and cfg.moe is not None:
            # PEFT (0.17+) writes expert LoRA only as `target_parameters` on transformers 5's fused 3-D expert
            # tensors (lora_A [r*E, in], lora_B [out, r*E] per tensor), a layout jsft does not import/export yet
            raise ValueError(f"LoRA on the MLP ({name}) of a mixture of experts ({cfg.model_type}) is not supported: "
                             "its experts are fused 3-D tensors that PEFT adapts only via target_parameters, which jsft "
                             "does not read or write yet; set model.lora.target_modules to attention projections "
                             "(q_proj,k_proj,v_proj,o_proj), or fine-tune fully")
        shape, axes, _ = base[name]
        n = _INPUT_AXES.get(name, 1)
        a = ((*shape[:n], rank), (*axes[:n], "lora_rank"), _kaiming_uniform(math.prod(shape[:n])))
        b = ((rank, *shape[n:]), ("lora_rank", *axes[n:]), _zeros)
        table[name] = (a, b)
    return table


def _param(init, key, shape, axes, dtype, kind=nnx.Param) -> nnx.Param:
    return kind(init(key, shape, dtype), logical_axes=tuple(axes))


# ---- the math ---------------------------------------------------------------------------------------------------


def rms_norm(x, scale, eps, offset: float = 0.0):
    """As transformers: normalise in fp32 and round to the compute dtype; the scale multiplies in fp32 (one
    rounding, not two), so its gradient is summed over the tokens in fp32 (see `add_bias`). offset=1: Gemma's
    norm, x * (1 + w) all in fp32 and rounded once at the end."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if offset:
        return (normed * (offset + scale.astype(jnp.float32))).astype(x.dtype)
    return (scale.astype(jnp.float32) * normed.astype(x.dtype)).astype(x.dtype)


def add_bias(x, bias):
    """x + bias in fp32, rounded once: the bias gradient is a sum over all tokens, and summing in fp32 keeps
    the per-device partial sums and their cross-device reduction fp32 under bf16 compute."""
    return (x.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def rope(x, positions, inv_freq, scaling=1.0):
    """Rotary embedding on the two halves of the head dim (transformers' rotate_half layout). x [B,T,N,H];
    `scaling` multiplies cos and sin (yarn's attention factor)."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    cos, sin = (jnp.cos(emb) * scaling).astype(x.dtype), (jnp.sin(emb) * scaling).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def softcap(x, cap):
    """cap * tanh(x / cap) (Gemma's logit softcapping); x itself when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True)}


def dense(x, w, contract: int = 1):
    """x [B, T, *in] @ w [*in, *out] -> [B, T, *out] as ONE 2-D matmul [B*T, in] @ [in, out]. XLA:CPU runs the
    equivalent 3-D einsum, and above all its weight gradient (which contracts over both B and T), ~30%
    slower: it transposes [B*T, out] activations instead of feeding the GEMM directly."""
    b, t = x.shape[:2]
    n_in = math.prod(w.shape[:contract])
    # fp32 accumulation (what a bf16 GEMM does anyway): its transpose, the weight gradient's contraction
    # over the device's tokens, then also yields fp32 partial sums, which XLA reduces across devices in fp32
    y = jnp.matmul(x.reshape(b * t, n_in), w.reshape(n_in, -1), preferred_element_type=jnp.float32)
    return y.astype(x.dtype).reshape(b, t, *w.shape[contract:])


def proj(x, p: dict, name: str, lora_scale: float = 0.0, contract: int = 1):
    """The projection `name`: x @ W, plus scale * (x @ A) @ B where the layer carries its LoRA adapter (PEFT's
    base(x) + lora_B(lora_A(x)) * scaling, in jsft's [in, out] layout)."""
    y = dense(x, p[name], contract)
    if name + ".lora_a" in p:
        y = y + lora_scale * dense(dense(x, p[name + ".lora_a"], contract), p[name + ".lora_b"])  # via [B, T, r]
    return y


def block(p: dict, x, *, cfg: ModelConfig, layer_rope, positions, segment_ids, attn_impl, cache=None, layer=None,
          window=None, lora_scale: float = 0.0, sequence_parallel: str = "ulysses", sparse: bool = False):
    """One pre-norm decoder layer. p: this layer's parameters (already in the compute dtype), with
    "<proj>.lora_a"/"<proj>.lora_b" for projections that carry an adapter. x [B,T,D]. layer_rope: this
    layer's (inverse frequencies [H/2], cos/sin scaling); window: None, or its window (traced, see
    `Decoder.hidden_states`).

    With `cache` (generation: see `init_cache`; its slot ids already cover this chunk), the keys/values go
    into cache layer `layer` at `cache["index"]` and attention runs over all that layer's slots.
    `sparse`: the MLP is the mixture of experts (p's MOE_PREFIX parameters); padding (segment id 0) is
    neither routed nor counted. Returns ((x, cache), MoeStats or None)."""
    eps, off = cfg.rms_norm_eps, cfg.norm_offset
    with jax.named_scope("attention"):
        h = rms_norm(x, p["attn_norm"], eps, off)
        q, k, v = (proj(h, p, name, lora_scale) for name in ("q_proj", "k_proj", "v_proj"))  # [B,T,N|K,H]
        if cfg.qkv_bias:
            q, k, v = add_bias(q, p["q_bias"]), add_bias(k, p["k_bias"]), add_bias(v, p["v_bias"])
        if cfg.qk_norm:
            q, k = rms_norm(q, p["q_norm"], eps, off), rms_norm(k, p["k_norm"], eps, off)
        q, k = rope(q, positions, *layer_rope), rope(k, positions, *layer_rope)
        kv_seg, kv_pos = segment_ids, positions
        if cache is not None:
            cache, k, v = _write_kv(cache, layer, k, v)
            kv_seg, kv_pos = cache["segment_ids"], cache["positions"]
        a = attention(
            q, k, v, q_segment_ids=segment_ids, kv_segment_ids=kv_seg,
            q_positions=positions, kv_positions=kv_pos, impl=attn_impl, sequence_parallel=sequence_parallel,
            window=window, sinks=p.get("sinks"), softcap=cfg.attention_softcap, scale=cfg.attention_scale,
        )
        a = proj(a, p, "o_proj", lora_scale, contract=2)
        if cfg.o_bias:
            a = add_bias(a, p["o_bias"])
        if "post_attn_norm" in p:
            a = rms_norm(a, p["post_attn_norm"], eps, off)
        x = x + a
    with jax.named_scope("mlp"):
        h = rms_norm(x, p["mlp_norm"], eps, off)
        stats = None
        if sparse:
            experts = {k.removeprefix(MOE_PREFIX): v for k, v in p.items() if k.startswith(MOE_PREFIX)}
            mesh = jax.sharding.get_abstract_mesh()
            if _expert_parallel(mesh, h):  # experts split over the expert axis (shard_map)
                m, stats = moe_expert_parallel(experts, h, cfg.moe, segment_ids > 0, mesh=mesh, expert_axis="expert",
                                               batch_axes=ACTIVATION_RULES["batch"],
                                               length_axes=ACTIVATION_RULES["length"])
            else:
                m, stats = moe_layer.moe(experts, h, cfg.moe, segment_ids > 0)
        else:
            act = _ACTIVATIONS[cfg.hidden_act]
            gated = act(proj(h, p, "gate_proj", lora_scale)) * proj(h, p, "up_proj", lora_scale)  # [B, T, F]
            m = proj(gated, p, "down_proj", lora_scale)
        if "post_mlp_norm" in p:
            m = rms_norm(m, p["post_mlp_norm"], eps, off)
        x = x + m
    return (constrain(x, ("batch", "length", None)), cache), stats


def _expert_parallel(mesh, h) -> bool:
    """Whether the MoE layer runs expert-parallel: an expert axis, and rows / tokens of h [B, T, D] that split
    over the batch / length axes (a decode step's single token on a sequence-split mesh, or a generation
    batch that does not divide, falls back to the one-device layer, which XLA partitions)."""
    if mesh.empty or expert_size(mesh) == 1:
        return False
    split = lambda axes: math.prod(mesh.shape[a] for a in axes)  # noqa: E731
    return h.shape[0] % split(ACTIVATION_RULES["batch"]) == 0 and h.shape[1] % split(ACTIVATION_RULES["length"]) == 0


def _write_kv(cache, layer, k, v):
    """Write one layer's keys/values [B, T, K, H] at slot cache["index"]; return (cache, that layer's
    keys, values [B, S, K, H]). The stacked cache is a scan carry, so XLA updates it in place; as scanned
    inputs and outputs, every layer's slice would be copied out and back at each decode step."""
    start = (layer, 0, cache["index"], 0, 0)
    new = dict(cache)
    new["k"] = jax.lax.dynamic_update_slice(cache["k"], k[None].astype(cache["k"].dtype), start)
    new["v"] = jax.lax.dynamic_update_slice(cache["v"], v[None].astype(cache["v"].dtype), start)
    return new, new["k"][layer], new["v"][layer]


def _write_slots(cache, segment_ids, positions):
    """Record a chunk's segment ids and positions [B, T] in the slots it is about to fill (all layers)."""
    i = cache["index"]
    return {
        **cache,
        "segment_ids": jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids, i, axis=1),
        "positions": jax.lax.dynamic_update_slice_in_dim(cache["positions"], positions, i, axis=1),
    }


# ---- the module -------------------------------------------------------------------------------------------------


class Decoder(nnx.Module):
    """A decoder-only LM built from a ModelConfig. `model(input_ids)` returns logits [B, T, V]."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        dtype="float32",
        param_dtype="float32",
        remat_policy: str = "none",
        attention_impl: str = "auto",
        lora=None,
        sequence_parallel: str = "ulysses",
    ):
        """`lora`: a jsft.models.lora.LoraSpec (rank, scale, targets, dtype) to add adapters (nnx.LoRAParam,
        flat names 'lora_a/q_proj', 'lora_b/q_proj'), or None. `sequence_parallel`: ulysses | ring, the
        attention over rows split across the sequence axis (jsft/models/sequence_parallel.py)."""
        if remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat policy '{remat_policy}' is not supported; allowed: {', '.join(REMAT_POLICIES)}")
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.param_dtype = jnp.dtype(param_dtype)
        self.remat_policy = remat_policy
        self.attention_impl = resolve_impl(attention_impl, self.dtype)
        if sequence_parallel not in ("ulysses", "ring"):
            raise ValueError(f"sequence_parallel={sequence_parallel!r} is not supported; allowed: ulysses, ring")
        self.sequence_parallel = sequence_parallel
        self.lora = lora
        pd, L = self.param_dtype, cfg.num_layers
        self.embed = _param(_normal, rngs.params(), (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd)
        self.layers = nnx.Dict(
            {
                name: _param(init, rngs.params(), (L, *shape), ("layers", *axes), pd)
                for name, (shape, axes, init) in _param_table(cfg).items()
            }
        )
        for name, (count, shape, axes, init) in _mlp_tables(cfg).items():
            self.layers[name] = _param(init, rngs.params(), (count, *shape), ("layers", *axes), pd)
        self.final_norm = _param(_zeros if cfg.norm_offset else _ones, rngs.params(), (cfg.hidden_size,), ("norm",), pd)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(_normal, rngs.params(), (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd)
        # adapters last, so the base parameters draw the same random numbers with or without them
        if lora is not None:
            self.lora_a, self.lora_b = nnx.Dict(), nnx.Dict()
            for name, (a, b) in _adapter_table(cfg, lora.rank, lora.targets).items():
                for store, (shape, axes, init) in ((self.lora_a, a), (self.lora_b, b)):
                    store[name] = _param(init, rngs.params(), (L, *shape), ("layers", *axes), lora.dtype, nnx.LoRAParam)

    def unembed(self) -> jax.Array:
        """[D, V] output projection in the compute dtype (the embedding's transpose when tied)."""
        w = self.embed[...].T if self.config.tie_word_embeddings else self.lm_head[...]
        return w.astype(self.dtype)

    def hidden_states(self, input_ids, positions=None, segment_ids=None, cache=None):
        """Final-normed hidden states [B, T, D]. With a `cache` (see `init_cache`), the chunk is written at
        the cache's next free slots and attends to everything cached; returns (hidden, cache) with the index
        advanced past the chunk, so the caller just feeds the next one."""
        x, cache, _ = self.hidden_states_and_stats(input_ids, positions, segment_ids, cache)
        return x if cache is None else (x, cache)

    def hidden_states_and_stats(self, input_ids, positions=None, segment_ids=None, cache=None):
        """(hidden [B, T, D], cache or None, MoeStats stacked over the sparse layers [L_sparse, ...] or None
        for a dense model): the router statistics for the router losses and expert-load metrics."""
        cfg = self.config
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
        if segment_ids is None:
            segment_ids = jnp.ones(input_ids.shape, jnp.int32)
        with jax.named_scope("embed"):
            x = jnp.take(self.embed[...], input_ids, axis=0).astype(self.dtype)
            if cfg.model_type in GEMMA:  # x sqrt(D), the factor rounded to the compute dtype as transformers does
                x = x * jnp.asarray(math.sqrt(cfg.hidden_size), jnp.float32).astype(self.dtype)
            # rows over data and hidden over fsdp first, then rows over all devices: the lookup's backward
            # (a scatter into the fsdp-sharded table) then reshards within each fsdp group; straight from
            # rows over all devices, XLA replicates the whole [B, T, D] gradient when data > 1 (HSDP)
            # (tokens over the sequence axis throughout: Ulysses, jsft/models/ulysses.py)
            x = constrain(x, ("batch", "length", None), via=("replica_batch", "length", "embed"))
        # sinks stay fp32: a logit that joins fp32 softmax statistics
        params = {name: p[...].astype(jnp.float32 if name == "sinks" else self.dtype) for name, p in self.layers.items()}
        lora_scale = 0.0
        if self.lora is not None:
            lora_scale = self.lora.scale
            for name in self.lora.targets:
                params[name + ".lora_a"] = self.lora_a[name][...].astype(self.dtype)
                params[name + ".lora_b"] = self.lora_b[name][...].astype(self.dtype)
        inv_freq, rope_scaling = cfg.rope_tables()  # [L, H/2], [L]: each layer's rope, scanned with it
        # windows as data ([L] int32, full layers a window no row reaches); None keeps full-causal models static
        windows = [s.window or NO_WINDOW for s in cfg.layer_specs()] if cfg.has_window else None
        if cache is not None:
            cache = _write_slots(cache, segment_ids, positions)

        def body(carry, scanned, sparse):
            x, cache = carry
            p, layer, layer_rope, window = scanned
            return block(
                p, x, cfg=cfg, layer_rope=layer_rope, positions=positions, segment_ids=segment_ids,
                attn_impl=self.attention_impl, cache=cache, layer=layer, window=window, lora_scale=lora_scale,
                sequence_parallel=self.sequence_parallel, sparse=sparse,
            )

        policy = REMAT_POLICIES[self.remat_policy]
        rope_arrays = (jnp.asarray(inv_freq), jnp.asarray(rope_scaling))
        windows = None if windows is None else jnp.asarray(windows, jnp.int32)
        mlp_names = set(_mlp_tables(cfg))
        stats = []
        for start, end, sparse, mlp_start in _runs(cfg):
            # a run's slice of the stacked parameters (the whole stack when the model is one run)
            whole = (start, end) == (0, cfg.num_layers)
            mlp_end = mlp_start + end - start
            run = {
                name: v if whole else (v[mlp_start:mlp_end] if name in mlp_names else v[start:end])
                for name, v in params.items()
                if name not in mlp_names or name.startswith(MOE_PREFIX) == sparse
            }
            cut = (lambda a: a) if whole else (lambda a: a[start:end])  # noqa: E731
            step = partial(body, sparse=sparse)
            if self.remat_policy != "none":
                step = jax.checkpoint(step, policy=policy, prevent_cse=False)
            scanned = (run, jnp.arange(start, end), jax.tree.map(cut, rope_arrays),
                       None if windows is None else cut(windows))
            (x, cache), run_stats = jax.lax.scan(step, (x, cache), scanned)
            if sparse:
                stats.append(run_stats)
        x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps, cfg.norm_offset)
        stats = jax.tree.map(lambda *s: jnp.concatenate(s), *stats) if stats else None
        if cache is not None:
            cache = {**cache, "index": cache["index"] + input_ids.shape[1]}
        return x, cache, stats

    def __call__(self, input_ids, positions=None, segment_ids=None):
        """Logits [B, T, V] in fp32 (tests, generation; training uses the chunked loss on hidden states)."""
        x = self.hidden_states(input_ids, positions, segment_ids)
        return self.logits(x)

    def logits(self, hidden):
        """fp32 logits [..., V] of hidden states [..., D], softcapped where the model caps them (the
        training loss applies the same cap inside its vocabulary chunks: jsft/train/loss.py)."""
        raw = jnp.einsum("...D,DV->...V", hidden, self.unembed(), preferred_element_type=jnp.float32)
        return softcap(raw, self.config.final_logit_softcapping)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype) -> dict:
    """An empty KV cache for `length` tokens: k/v [L, B, S, K, H]; each slot's segment id and position
    [B, S], shared by the layers (empty slots are segment 0, so attention skips them); index: the next
    free slot."""
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "segment_ids": jnp.zeros((batch, length), jnp.int32),
        "positions": jnp.zeros((batch, length), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }
