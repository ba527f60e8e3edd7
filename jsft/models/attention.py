"""Attention over (possibly packed) rows: one function, several implementations.

Masking is defined once by `segment_ids` and `positions`: query i may attend to key j when both belong to
the same non-padding segment and positions[j] <= positions[i]. Packed samples therefore never see each
other, and the same rule serves a KV cache (cache slots carry their positions; empty slots segment 0).

Dimension letters: B batch, T query length, S key length, N query heads, K kv heads, G = N / K, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn")

# finite instead of -inf: a fully masked (padding) query then averages values instead of producing NaN
_MASKED = -1e30


def attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions):
    """[B, T, S] bool: same non-padding segment and causal by position."""
    same = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
    causal = kv_positions[:, None, :] <= q_positions[:, :, None]
    return same & causal


def xla_attention(q, k, v, mask):
    """Reference: full masked softmax in fp32. q [B,T,N,H], k/v [B,S,K,H], mask [B,T,S] -> [B,T,N,H]."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * (h**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


def cudnn_attention(q, k, v, mask):
    """Fused attention through cuDNN (GPU only): jax.nn.dot_product_attention with the same boolean mask."""
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :], implementation="cudnn")
    return out.astype(q.dtype)


def resolve_impl(impl: str) -> str:
    if impl == "auto":
        return "cudnn" if jax.default_backend() == "gpu" else "xla"
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation '{impl}' is not supported; allowed: auto, {', '.join(IMPLEMENTATIONS)}")
    if impl == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError("attention_impl=cudnn needs a GPU backend")
    return impl


def attention(q, k, v, *, q_segment_ids, kv_segment_ids, q_positions, kv_positions, impl: str = "xla"):
    mask = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, mask)
    return xla_attention(q, k, v, mask)
