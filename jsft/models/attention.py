"""Attention over (possibly packed) rows: one function, several implementations.

Masking is defined once by `segment_ids` and `positions`: query i may attend to key j when both belong to
the same non-padding segment and positions[j] <= positions[i]. Packed samples therefore never see each
other, and the same rule serves a KV cache (cache slots carry their positions; empty slots segment 0).
A query that sees no key at all (padding) has an unspecified output (the reference averages the values,
`blockwise` returns 0); the loss never reads it.

Implementations:
  xla        reference: the full [T, S] masked softmax in fp32. O(T * S) memory and work, whatever the mask.
  blockwise  (blockwise.py) flash-style over [block x block] tiles, visiting only the tiles the mask does not zero out
             (a 2048-token row of ~600-token samples keeps ~1/3 of its 256-tiles), with an online softmax
             and a recomputing backward; the default off GPU. O(T) memory.
  pallas_gpu packed causal flash attention, a Pallas (Triton) kernel that reads segment ids per tile and
             skips every masked tile (attention_gpu.py); the default on GPU.
  cudnn      cuDNN fused attention with the packed layout (per-segment lengths and offsets, causal; no mask
             or bias), GPU with bf16/fp16 only (attention_gpu.py).
  splash     jax's Pallas TPU splash attention with segment ids (attention_tpu.py); the default on TPU.

pallas_gpu, cudnn and splash serve self-attention over packed training rows (T = S, each segment one
contiguous run whose positions grow with the index: what packing produces). Calls they do not cover (a KV
cache: T != S) take blockwise / xla. Off their platform, pallas_gpu and splash run in Pallas interpret
mode: exact but slow, for tests and --cpu-smoke.

Dimension letters: B batch, T query length, S key length, N query heads, K kv heads, G = N / K, H head dim.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from jsft.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS
from jsft.models import attention_gpu, attention_tpu, ring, ulysses
from jsft.models.blockwise import _MASKED, BLOCK, attention_mask, blockwise_attention
from jsft.sharding import activation_spec


def xla_attention(q, k, v, mask, *, sinks=None, softcap=None, scale=None):
    """Reference: full masked softmax in fp32. q [B,T,N,H], k/v [B,S,K,H], mask [B,T,S] -> [B,T,N,H].
    `scale` multiplies q.k (default H**-0.5); `softcap` c caps the scaled scores at c * tanh(s / c) before the
    mask; `sinks` [N] (one fp32 logit per query head) join each softmax's denominator only (gpt-oss)."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
    scale = h**-0.5 if scale is None else scale
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
    if sinks is None:
        probs = jax.nn.softmax(scores, axis=-1)
    else:  # a sink is one more logit per row whose probability mass goes nowhere
        sink = sinks.astype(jnp.float32).reshape(1, kv_heads, n // kv_heads, 1, 1)
        top = jnp.maximum(scores.max(axis=-1, keepdims=True), sink)
        e = jnp.exp(scores - top)
        probs = e / (e.sum(axis=-1, keepdims=True) + jnp.exp(sink - top))
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


def _per_device(fn, *args, check_vma: bool = True):
    """Run `fn` on each device's rows when a mesh is active and the batch splits evenly over its
    data-parallel axes, so each device lists the live tiles of its own rows only; else run it as is.
    check_vma=False for Pallas kernels, whose outputs carry no varying-axes annotation."""
    mesh = jax.sharding.get_abstract_mesh()
    spec = activation_spec(("batch",))
    if mesh.empty or args[0].shape[0] % math.prod(mesh.shape[a] for a in spec[0]):
        return fn(*args)
    return jax.shard_map(fn, in_specs=spec, out_specs=spec, check_vma=check_vma)(*args)


# ---- dispatch ---------------------------------------------------------------------------------------------------


# cuDNN's fused attention takes half-precision inputs only.
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def resolve_impl(impl: str, dtype=jnp.bfloat16) -> str:
    """`auto`: the packed flash kernel of the platform (pallas_gpu on GPU, splash on TPU), blockwise on CPU."""
    backend, half = jax.default_backend(), jnp.dtype(dtype) in CUDNN_DTYPES
    if impl == "auto":
        return {"gpu": "pallas_gpu", "tpu": "splash"}.get(backend, "blockwise")
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation '{impl}' is not supported; allowed: auto, {', '.join(IMPLEMENTATIONS)}")
    if impl == "cudnn" and backend != "gpu":
        raise ValueError("attention_impl=cudnn needs a GPU backend")
    if impl == "cudnn" and not half:
        raise ValueError(f"attention_impl=cudnn needs bfloat16 or float16 compute (model.dtype), not {jnp.dtype(dtype)}")
    for name, home in (("pallas_gpu", "gpu"), ("splash", "tpu")):
        if impl == name and backend not in (home, "cpu"):  # cpu: interpret mode
            raise ValueError(f"attention_impl={name} needs a {home.upper()} backend (or CPU, interpreted), not {backend}")
    return impl


def _kernel(impl: str):
    """A packed-row kernel (q, k, v, segment_ids) -> out; interpreted off its platform."""
    interpret = jax.default_backend() == "cpu"
    kernels = {
        "pallas_gpu": partial(attention_gpu.pallas_attention, interpret=interpret),
        "cudnn": attention_gpu.cudnn_packed_attention,
        "splash": partial(attention_tpu.splash_attention, interpret=interpret),
    }
    return kernels[impl]


def _packed(impl: str, q, k, v, segment_ids):
    """The packed-row kernels, each device on its own rows."""
    return _per_device(_kernel(impl), q, k, v, segment_ids, check_vma=False)


def _local_self_attention(impl: str, q, k, v, segment_ids, positions):
    """Self-attention on one device's whole rows (inside Ulysses' shard_map): no further shard_map."""
    if impl in _PACKED:
        return _kernel(impl)(q, k, v, segment_ids)
    if impl == "blockwise" and q.shape[1] > BLOCK:
        return blockwise_attention(q, k, v, segment_ids, segment_ids, positions, positions)
    return xla_attention(q, k, v, attention_mask(segment_ids, segment_ids, positions, positions))


_PACKED = ("pallas_gpu", "cudnn", "splash")


def attention(q, k, v, *, q_segment_ids, kv_segment_ids, q_positions, kv_positions, impl: str = "xla",
              sequence_parallel: str = "ulysses", window=None, sinks=None, softcap=None, scale=None):
    """`sequence_parallel` (ulysses | ring): how self-attention runs when rows are split over the sequence
    axis; ring attends per KV block with `blockwise` whatever `impl` (the kernels return no lse).
    `window` (None: full causal; an int or traced int32 scalar: keys p - window < p' <= p), `sinks` ([N]
    fp32 logits joining the softmax denominator), `softcap` (c * tanh(s / c) on the scaled scores) and
    `scale` (None: H**-0.5) as in `xla_attention`."""
    if window is not None or sinks is not None or softcap is not None or scale is not None:
        # kern's branch implements them in every impl
        mask = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions, window)
        return xla_attention(q, k, v, mask, sinks=sinks, softcap=softcap, scale=scale)
    self_attention = q_segment_ids is kv_segment_ids and q_positions is kv_positions
    if self_attention and sequence_parallel == "ring" and ulysses.applies(q):
        return ring.ring_attention(q, k, v, q_segment_ids, q_positions)
    if self_attention and ulysses.applies(q):  # tokens split over the sequence axis
        return ulysses.ulysses_attention(partial(_local_self_attention, impl), q, k, v, q_segment_ids, q_positions,
                                         check_vma=impl not in _PACKED)
    if impl in _PACKED:
        if q.shape[1] == k.shape[1] and q_segment_ids is kv_segment_ids:
            return _packed(impl, q, k, v, q_segment_ids)
        impl = "blockwise"  # a KV cache (generation): not packed self-attention
    # Queries that fit one tile (decoding, short prompts) have nothing to skip along T, and their full
    # [T, S] scores are small: the fused reference is faster there.
    if impl == "blockwise" and q.shape[1] > BLOCK:
        return _per_device(blockwise_attention, q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    return xla_attention(q, k, v, attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions))
