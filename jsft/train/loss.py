"""Causal-LM loss: per-token NLL chunked over the sequence, and per-token weights that make it exact.

The trainer's loss for one optimizer step is `sum(loss_weights(...) * token_nll(...))` summed over every
micro-batch, device and host. All normalisation lives in the weights, which are computed on the host from
GLOBAL counts, so the sum is the same number however the global batch is split or packed.

Alignment: `loss_mask[t] = 1` means token t is a target. The shift to "hidden state t-1 predicts token t"
happens in exactly one place, `token_nll`, and the result is aligned with `input_ids` again:

    input_ids    a0 a1 a2 b0 b1 0          segment_ids  1 1 1 2 2 0
    predictor    -- a0 a1 -- b0 --         (hidden state of the previous token, same segment only)
    nll[t]        0  *  *  0  *  0
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def token_nll(
    hidden: jax.Array, unembed: jax.Array, input_ids: jax.Array, segment_ids: jax.Array, chunk_size: int
) -> jax.Array:
    """Per-token causal-LM negative log-likelihood, float32 [B, T], aligned with `input_ids`.

    nll[b, t] = -log softmax(hidden[b, t-1] @ unembed)[input_ids[b, t]] where token t continues the
    segment of token t-1 (segment_ids equal and non-zero), else 0.

    hidden [B, T, D] (compute dtype), unembed [D, V]. Logits are computed in float32 one chunk of
    `chunk_size` positions at a time ([B, chunk_size, V] live, forward and backward), never [B, T, V].
    """
    labels = jnp.roll(input_ids, -1, axis=1)  # [B, T] label of position t is token t+1
    valid = _continues_segment(segment_ids)  # [B, T] token t has a predecessor in its sample
    valid_next = jnp.roll(valid, -1, axis=1).at[:, -1].set(False)
    nll_next = _chunked_nll(hidden, unembed, labels, valid_next, chunk_size)  # [B, T] predicts t+1
    return jnp.pad(nll_next[:, :-1], ((0, 0), (1, 0)))


def _continues_segment(segment_ids) -> jax.Array:
    prev = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)))  # position 0 has no predecessor
    return (segment_ids == prev) & (segment_ids != 0)


def _chunked_nll(hidden, unembed, labels, valid, chunk_size):
    """nll of `labels` under softmax(hidden @ unembed), scanned over sequence chunks.

    Chunks run along the sequence, not the flattened token axis: the batch axis is sharded over devices
    and a scan over a sharded axis would gather it; this way every device scans its own rows.
    """
    B, T, D = hidden.shape
    chunk = min(chunk_size, T)
    n = -(-T // chunk)
    pad = n * chunk - T

    def to_chunks(x):  # [B, T, ...] -> [n, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.swapaxes(x.reshape(B, n, chunk, *x.shape[2:]), 0, 1)

    # Rematerialised so the backward pass, too, holds one chunk's logits instead of saving all of them.
    @jax.checkpoint
    def chunk_nll(args):
        h, y, ok = args
        logits = jnp.einsum("bcd,dv->bcv", h, unembed, preferred_element_type=jnp.float32)
        target = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        return jnp.where(ok, jax.nn.logsumexp(logits, axis=-1) - target, 0.0)

    nll = jax.lax.map(chunk_nll, (to_chunks(hidden), to_chunks(labels), to_chunks(valid)))
    return jnp.swapaxes(nll, 0, 1).reshape(B, n * chunk)[:, :T]


def target_mask(loss_mask: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    """The tokens `token_nll` scores: masked AND preceded by a token of the same sample. Bool [..., L]."""
    seg = np.asarray(segment_ids)
    prev = np.concatenate([np.zeros_like(seg[..., :1]), seg[..., :-1]], axis=-1)
    return (np.asarray(loss_mask) > 0) & (seg == prev) & (seg != 0)


def _sample_keys(segment_ids: np.ndarray) -> np.ndarray:
    """One integer id per (row, segment) for every token: a sample's identity across the batch. [..., L]"""
    seg = np.asarray(segment_ids).astype(np.int64)
    rows = np.arange(seg.size // seg.shape[-1]).reshape(seg.shape[:-1] + (1,))
    return rows * (seg.max(initial=0) + 1) + seg


def batch_counts(loss_mask: np.ndarray, segment_ids: np.ndarray) -> tuple[int, int]:
    """(samples, target tokens) in a batch; a sample is one segment of one row with >= 1 target.

    The trainer sums these over every micro-batch and host to get the global counts for `loss_weights`.
    """
    targets = target_mask(loss_mask, segment_ids)
    return int(np.unique(_sample_keys(segment_ids)[targets]).size), int(targets.sum())


def loss_weights(
    loss_mask: np.ndarray,
    segment_ids: np.ndarray,
    mode: str,
    *,
    num_samples: int,
    num_target_tokens: int,
    max_length: int,
) -> np.ndarray:
    """Per-token weights w, float32 [..., L], such that sum(w * nll) over the GLOBAL batch is the loss.

    `num_samples` and `num_target_tokens` are global counts (`batch_counts` summed over all micro-batches,
    devices and hosts); a sample is one segment of one row with at least one target token. Modes (veRL
    names), with m the target mask and n_s the target count of sample s:

    - token-mean: sum(m * nll) / num_target_tokens. Every target token weighs the same.
    - seq-mean-token-sum: sum(m * nll) / num_samples. Each sample contributes its summed NLL.
    - seq-mean-token-mean: sum_s (sum_{t in s} nll) / n_s / num_samples. Each sample weighs the same,
      whatever its length.
    - seq-mean-token-sum-norm: sum(m * nll) / (num_samples * max_length). Summed NLL over a constant
      horizon (Dr. GRPO), so a token's weight depends on neither its sample's length nor the batch's
      token count.
    """
    targets = target_mask(loss_mask, segment_ids)
    m = targets.astype(np.float64)
    if mode == "token-mean":
        w = m / max(num_target_tokens, 1)
    elif mode == "seq-mean-token-sum":
        w = m / max(num_samples, 1)
    elif mode == "seq-mean-token-mean":
        key = _sample_keys(segment_ids)
        per_sample = np.bincount(key.ravel(), weights=m.ravel())[key]  # targets in each token's sample
        w = m / np.maximum(per_sample, 1) / max(num_samples, 1)
    elif mode == "seq-mean-token-sum-norm":
        w = m / (max(num_samples, 1) * max_length)
    else:
        raise ValueError(f"trainer.loss_agg_mode={mode!r} is not supported; allowed: {', '.join(LOSS_AGG_MODES)}")
    return w.astype(np.float32)
