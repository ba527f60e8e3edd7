"""Attention over (possibly packed) rows: one function, several implementations.

Masking is defined once by `segment_ids` and `positions`: query i may attend to key j when both belong to
the same non-padding segment and positions[j] <= positions[i] (and, with a sliding `window` w,
positions[i] - positions[j] < w: at most w keys, itself included, as transformers' `sliding_window`).
Packed samples therefore never see each other, and the same rule serves a KV cache (cache slots carry their
positions; empty slots segment 0).

The families of 2026 add three options, each honoured by every implementation (or routed to one that does,
see `_fallback`): `window` (a Python int, or an int32 scalar that may be traced: per-layer data in a scanned
stack; full layers of a mixed stack pass a large one), `sinks` ([N] fp32 logits, one per query head, that
join the softmax's denominator only: gpt-oss) and `softcap` (scores = c * tanh(scores / c) after scaling,
before masking: Gemma 2). `scale` (default H^-0.5) multiplies q.k.
A query that sees no key at all (padding) has an unspecified output (the reference averages the values,
`blockwise` returns 0); the loss never reads it.

Implementations:
  xla        reference: the full [T, S] masked softmax in fp32. O(T * S) memory and work, whatever the mask.
  blockwise  flash-style over [block x block] tiles, visiting only the tiles the mask does not zero out
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

import logging
import math
from functools import cache, partial

import jax
import jax.numpy as jnp
import numpy as np

from jsft.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS
from jsft.models import attention_gpu, attention_tpu, ring, ulysses
from jsft.models.blockwise import _MASKED, BLOCK, _scale, attention_mask, blockwise_attention, window_data
from jsft.sharding import activation_spec


def xla_attention(q, k, v, mask, *, sinks=None, softcap=None, scale=None):
    """Reference: full masked softmax in fp32. q [B,T,N,H], k/v [B,S,K,H], mask [B,T,S] -> [B,T,N,H]."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * _scale(scale, h)
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
    if sinks is None:
        probs = jax.nn.softmax(scores, axis=-1)
    else:  # the sink joins the denominator as one more column, whose probability is dropped
        sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, kv_heads, -1, 1, 1), (*scores.shape[:-1], 1))
        probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


def _per_device(fn, *args, shared=(), check_vma: bool = True):
    """Run `fn(*args, *shared)` on each device's rows when a mesh is active and the batch splits evenly over
    its data-parallel axes, so each device lists the live tiles of its own rows only; else run it as is.
    `shared`: arguments every device takes whole (the window scalar, sinks; None passes through).
    check_vma=False for Pallas kernels, whose outputs carry no varying-axes annotation."""
    mesh = jax.sharding.get_abstract_mesh()
    spec = activation_spec(("batch",))
    if mesh.empty or args[0].shape[0] % math.prod(mesh.shape[a] for a in spec[0]):
        return fn(*args, *shared)
    in_specs = (spec,) * len(args) + (jax.sharding.PartitionSpec(),) * len(shared)
    return jax.shard_map(fn, in_specs=in_specs, out_specs=spec, check_vma=check_vma)(*args, *shared)


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


def _kernel(impl: str, window, softcap, scale):
    """A packed-row kernel (q, k, v, segment_ids, window data, sinks) -> out; interpreted off its platform.
    pallas_gpu takes the window as data (traced or not); cudnn and splash build their masks from the constant
    `window` (`_fallback` has routed what they cannot take elsewhere)."""
    interpret = jax.default_backend() == "cpu"
    if impl == "pallas_gpu":
        fn = partial(attention_gpu.pallas_attention, softcap=softcap, scale=scale, interpret=interpret)
        return lambda q, k, v, seg, win, sinks: fn(q, k, v, seg, window=win, sinks=sinks)
    if impl == "cudnn":
        fn = partial(attention_gpu.cudnn_packed_attention, window=window, scale=scale)
        return lambda q, k, v, seg, win, sinks: fn(q, k, v, seg)
    fn = partial(attention_tpu.splash_attention, window=window, softcap=softcap, scale=scale, interpret=interpret)
    return lambda q, k, v, seg, win, sinks: fn(q, k, v, seg, sinks=sinks)


def _is_static(window) -> bool:
    return window is None or isinstance(window, (int, np.integer))


def _fallback(impl: str, window, sinks, softcap) -> str:
    """The implementation that runs: `impl`, or where it lacks a feature the one that has it (noted once).
    cuDNN takes a constant window only, and no sinks or softcap: pallas_gpu runs instead. Splash builds its
    mask from a constant window: a traced one (a scanned stack of mixed layers) runs blockwise."""
    if impl == "cudnn" and (sinks is not None or softcap is not None or not _is_static(window)):
        what = "sinks" if sinks is not None else "softcap" if softcap is not None else "a per-layer (traced) window"
        _note(f"attention_impl=cudnn does not take {what}: those layers run pallas_gpu")
        return "pallas_gpu"
    if impl == "splash" and not _is_static(window):
        _note("attention_impl=splash needs a constant window: layers with a per-layer (traced) window run blockwise")
        return "blockwise"
    return impl


@cache
def _note(text: str) -> None:
    """Log each fallback once per process, not once per layer or trace."""
    logging.getLogger(__name__).warning(text)


def _kernel_args(impl: str, window, softcap, scale):
    """(the kernel, its window data argument: pallas_gpu's, None for the kernels that take a constant)."""
    data = window_data(window) if impl == "pallas_gpu" and window is not None else None
    return _kernel(impl, window, softcap, scale), data


def _packed(impl: str, q, k, v, segment_ids, *, window, sinks, softcap, scale):
    """The packed-row kernels, each device on its own rows."""
    kernel, win = _kernel_args(impl, window, softcap, scale)
    return _per_device(kernel, q, k, v, segment_ids, shared=(win, sinks), check_vma=False)


def _local_self_attention(impl: str, q, k, v, segment_ids, positions, window=None, sinks=None, *, softcap=None,
                          scale=None):
    """Self-attention on one device's whole rows (inside Ulysses' shard_map): no further shard_map."""
    if impl in _PACKED:
        kernel, win = _kernel_args(impl, window, softcap, scale)
        return kernel(q, k, v, segment_ids, win, sinks)
    if impl == "blockwise" and q.shape[1] > BLOCK:
        return blockwise_attention(q, k, v, segment_ids, segment_ids, positions, positions, window, sinks,
                                   softcap=softcap, scale=scale)
    mask = attention_mask(segment_ids, segment_ids, positions, positions, window)
    return xla_attention(q, k, v, mask, sinks=sinks, softcap=softcap, scale=scale)


_PACKED = ("pallas_gpu", "cudnn", "splash")


def attention(q, k, v, *, q_segment_ids, kv_segment_ids, q_positions, kv_positions, impl: str = "xla",
              sequence_parallel: str = "ulysses", window=None, sinks=None, softcap=None, scale=None):
    """`sequence_parallel` (ulysses | ring): how self-attention runs when rows are split over the sequence
    axis; ring attends per KV block with `blockwise` whatever `impl` (the kernels return no lse).
    `window`, `sinks`, `softcap`, `scale`: the module docstring."""
    opts = dict(softcap=softcap, scale=scale)
    self_attention = q_segment_ids is kv_segment_ids and q_positions is kv_positions
    if self_attention and sequence_parallel == "ring" and ulysses.applies(q):
        return ring.ring_attention(q, k, v, q_segment_ids, q_positions, window=window, sinks=sinks, **opts)
    impl = _fallback(impl, window, sinks, softcap)
    if self_attention and ulysses.applies(q):  # tokens split over the sequence axis
        return ulysses.ulysses_attention(partial(_local_self_attention, impl, **opts), q, k, v, q_segment_ids,
                                         q_positions, window=window, sinks=sinks, check_vma=impl not in _PACKED)
    if impl in _PACKED:
        if q.shape[1] == k.shape[1] and q_segment_ids is kv_segment_ids:
            return _packed(impl, q, k, v, q_segment_ids, window=window, sinks=sinks, **opts)
        impl = "blockwise"  # a KV cache (generation): not packed self-attention
    # Queries that fit one tile (decoding, short prompts) have nothing to skip along T, and their full
    # [T, S] scores are small: the fused reference is faster there.
    if impl == "blockwise" and q.shape[1] > BLOCK:
        return _per_device(partial(blockwise_attention, **opts), q, k, v, q_segment_ids, kv_segment_ids, q_positions,
                           kv_positions, shared=(window_data(window), sinks))
    mask = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions, window)
    return xla_attention(q, k, v, mask, sinks=sinks, **opts)
