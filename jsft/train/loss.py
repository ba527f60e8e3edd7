"""Causal-LM loss: NLL of the target tokens, chunked over the vocabulary, and weights that make it exact.

The trainer's loss for one optimizer step is `sum(weight * nll)` over every target token of every
micro-batch, device and host. All normalisation lives in the weights (`loss_weights`), computed on the
host from GLOBAL counts, so the sum is the same number however the global batch is split or packed.

Alignment: `loss_mask[t] = 1` means token t is a target, and `loss_weights` keeps only targets that
continue their sample (a sample's first token has nothing to be predicted from). The shift to "hidden
state t-1 predicts token t" happens in exactly one place, `causal_targets`, which lists each row's
targets as (predicting position, label, weight) slots; `target_nll` computes logits at those positions
only:

    input_ids    a0 a1 a2 b0 b1 0          segment_ids  1 1 1 2 2 0
    loss_mask     0  1  1  1  1 0          (b0 is masked in, but starts a sample: weight 0)
    target_pos   0 1 3                     (hidden states of a0, a1, b0)
    target_ids   a1 a2 b1
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def causal_targets(loss_weight: np.ndarray, input_ids: np.ndarray, capacity: int) -> dict[str, np.ndarray]:
    """The causal shift, done here and nowhere else: target token t is predicted by hidden state t-1.

    loss_weight [R, T] (from `loss_weights`: non-zero only at tokens that continue their sample) ->
    per row, the first `capacity` slots list the targets in order, the rest are padding (weight 0):

        target_pos    [R, C] int32    t - 1, the position whose hidden state predicts token t
        target_ids    [R, C] int32    input_ids[t], the label
        target_weight [R, C] float32  loss_weight[t]

    The loss computes logits for these slots only: in chat SFT most tokens (system, user, tool outputs,
    padding) are never targets, and the unembed matmul plus its softmax are a large share of the step.
    """
    w = np.asarray(loss_weight, np.float32)
    rows, length = w.shape
    if (w[:, 0] != 0).any():
        raise ValueError("a token at position 0 has a loss weight but nothing before it to predict it from")
    out = {
        "target_pos": np.zeros((rows, capacity), np.int32),
        "target_ids": np.zeros((rows, capacity), np.int32),
        "target_weight": np.zeros((rows, capacity), np.float32),
    }
    for r in range(rows):
        t = np.flatnonzero(w[r])
        if len(t) > capacity:
            raise ValueError(f"row {r} has {len(t)} targets, more than the capacity {capacity}")
        out["target_pos"][r, : len(t)] = t - 1
        out["target_ids"][r, : len(t)] = input_ids[r, t]
        out["target_weight"][r, : len(t)] = w[r, t]
    return out


def target_nll(hidden: jax.Array, unembed: jax.Array, target_pos, target_ids, target_weight, chunk_size: int) -> jax.Array:
    """Negative log-likelihood of each listed target, float32 [R, C] (0 in padding slots):

        nll[r, k] = -log softmax(hidden[r, target_pos[r, k]] @ unembed)[target_ids[r, k]]

    hidden [R, T, D] (compute dtype), unembed [D, V]; the slots come from `causal_targets`. Logits are
    float32 for `chunk_size` vocabulary columns at a time ([R*C, chunk_size] live, forward and backward),
    never [R, T, V]. Rows stay whole, so a row-sharded batch gathers on its own device.
    """
    picked = jnp.take_along_axis(hidden, target_pos[..., None], axis=1)  # [R, C, D]
    r, c, d = picked.shape
    # Flat [R*C, D]: XLA:CPU runs 2-D matmuls (and the dW contraction over tokens) faster than 3-D einsums.
    nll = _chunked_nll(picked.reshape(r * c, d), unembed, target_ids.reshape(-1), target_weight.reshape(-1) != 0, chunk_size)
    return nll.reshape(r, c)


def weighted_nll(hidden, unembed, batch: dict, chunk_size: int) -> jax.Array:
    """sum(target_weight * nll) of one micro-batch; the weights carry the global normalisation."""
    nll = target_nll(hidden, unembed, batch["target_pos"], batch["target_ids"], batch["target_weight"], chunk_size)
    return jnp.sum(nll * batch["target_weight"])


# Chunks run over the VOCABULARY, not over tokens, because of FSDP: every token chunk would need the
# whole unembed and would add into the whole dW [D, V] inside the loop, which XLA turns into one
# gather + all-reduce of [D, V] per chunk. A vocabulary chunk touches only its own columns, so each
# weight column is gathered and reduced once, and the token axis stays sharded over devices throughout.
#
# The last chunk is shifted left to end at V (overlapping the one before) instead of padding unembed to a
# multiple of the chunk: a padded copy of unembed, and of its gradient, would cost two [D, V] fp32 buffers,
# more than the chunks themselves (1.1 GiB of 1.2 GiB at a 152k vocabulary).


def _chunk(unembed, i, chunk):
    """Chunk i: its first column, weights [D, chunk], and which of its columns no earlier chunk covered."""
    start = jnp.minimum(i * chunk, unembed.shape[1] - chunk)
    fresh = start + jnp.arange(chunk) >= i * chunk
    return start, jax.lax.dynamic_slice_in_dim(unembed, start, chunk, axis=1), fresh


def _logits(hidden, w, fresh):
    """float32 logits [N, chunk]; columns an earlier chunk covered are -inf, so they count once."""
    logits = jnp.einsum("nd,dv->nv", hidden, w, preferred_element_type=jnp.float32)
    return jnp.where(fresh, logits, -jnp.inf)


def _label_in_chunk(labels, start, i, chunk):
    """labels' column inside the chunk, and whether the label is one of its fresh columns. [N] each."""
    local = labels - start
    return local, (labels >= i * chunk) & (local < chunk)


def _num_chunks(vocab, chunk):
    return -(-vocab // chunk)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_nll(hidden, unembed, labels, valid, chunk_size):
    return _chunked_nll_fwd(hidden, unembed, labels, valid, chunk_size)[0]


def _chunked_nll_fwd(hidden, unembed, labels, valid, chunk_size):
    vocab = unembed.shape[1]
    chunk = min(chunk_size, vocab)

    def step(carry, i):  # online logsumexp over chunks, plus the target logit from its chunk
        running_max, running_sum, target = carry
        start, w, fresh = _chunk(unembed, i, chunk)
        logits = _logits(hidden, w, fresh)
        new_max = jnp.maximum(running_max, logits.max(-1))
        running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.exp(logits - new_max[..., None]).sum(-1)
        local, inside = _label_in_chunk(labels, start, i, chunk)
        picked = jnp.take_along_axis(logits, jnp.clip(local, 0, chunk - 1)[..., None], axis=-1)[..., 0]
        return (new_max, running_sum, jnp.where(inside, picked, target)), None

    n = labels.shape[0]
    init = (jnp.full((n,), -jnp.inf), jnp.zeros((n,)), jnp.zeros((n,)))
    (running_max, running_sum, target), _ = jax.lax.scan(step, init, jnp.arange(_num_chunks(vocab, chunk)))
    lse = running_max + jnp.log(running_sum)
    nll = jnp.where(valid, lse - target, 0.0)
    return nll, (hidden, unembed, labels, valid, lse)


def _chunked_nll_bwd(chunk_size, residuals, g):
    """d nll / d logits = softmax - onehot(label), rebuilt one chunk at a time from the saved lse; each
    chunk's dW is added into its columns of one [D, V] buffer (in place in the loop)."""
    hidden, unembed, labels, valid, lse = residuals
    vocab = unembed.shape[1]
    chunk = min(chunk_size, vocab)
    g = jnp.where(valid, g, 0.0)

    def step(carry, i):
        d_hidden, d_unembed = carry
        start, w, fresh = _chunk(unembed, i, chunk)
        logits = _logits(hidden, w, fresh)
        local, inside = _label_in_chunk(labels, start, i, chunk)
        is_label = (jnp.arange(chunk) == local[..., None]) & inside[..., None]  # fused compare, no one-hot
        d_logits = g[..., None] * (jnp.exp(logits - lse[..., None]) - is_label)  # [N, chunk]
        # Both matmuls in the compute dtype (bf16 tensor cores), accumulated in float32.
        d_logits = d_logits.astype(hidden.dtype)
        d_hidden = d_hidden + jnp.einsum("nv,dv->nd", d_logits, w, preferred_element_type=jnp.float32)
        d_w = jnp.einsum("nd,nv->dv", hidden, d_logits, preferred_element_type=jnp.float32)
        old = jax.lax.dynamic_slice_in_dim(d_unembed, start, chunk, axis=1)  # overlap columns get + 0
        d_unembed = jax.lax.dynamic_update_slice_in_dim(d_unembed, old + d_w.astype(unembed.dtype), start, axis=1)
        return (d_hidden, d_unembed), None

    init = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros_like(unembed))
    (d_hidden, d_unembed), _ = jax.lax.scan(step, init, jnp.arange(_num_chunks(vocab, chunk)))
    return d_hidden.astype(hidden.dtype), d_unembed, None, None


_chunked_nll.defvjp(_chunked_nll_fwd, _chunked_nll_bwd)


def target_mask(loss_mask: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    """The tokens the loss scores: masked AND preceded by a token of the same sample. Bool [..., L]."""
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
