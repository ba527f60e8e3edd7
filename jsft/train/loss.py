"""Causal-LM loss on the device: NLL of the target slots, chunked over the vocabulary.

The trainer's loss for one optimizer step is `sum(weight * nll)` over every target slot of every
micro-batch, device and host. All normalisation lives in the weights, and the causal shift in the target
slots (hidden state t-1 predicts token t); both are computed on the host, from GLOBAL counts, in
jsft/data/batch.py (`loss_weights`, `causal_targets`). This module only scores those slots:
`target_nll` gathers the hidden states at `target_pos` and computes logits there alone, chunk by chunk
over the vocabulary, never materialising [tokens, vocab] fp32 logits.

A mixture of experts adds its router losses (`MoeObjective`, `router_losses`) to that cross-entropy. They
are computed from the router statistics of one micro-batch (`MoeStats`: sums over its real tokens on all
devices) and scaled by the step's real-token count, so that over the micro-batches they add up to:
  z-loss    the mean over the step's real tokens and sparse layers of logsumexp(router logits)^2: a token
            mean, exact however the step is split;
  aux loss  transformers' load-balancing loss of each micro-batch, weighted by its share of the step's real
            tokens: a product of two token sums, so not additive over micro-batches; with one micro-batch it
            is exactly transformers' value on the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp

from jsft.data.batch import MicroBatch
from jsft.models.decoder import softcap as cap_logits
from jsft.models.moe import MoeStats, load_balancing_loss, z_loss
from jsft.sharding import constrain


def target_nll(hidden: jax.Array, unembed: jax.Array, target_pos, target_ids, target_weight, chunk_size: int,
               softcap=None) -> jax.Array:
    """Negative log-likelihood of each listed target, float32 [R, C] (0 in padding slots):

        nll[r, k] = -log softmax(cap(hidden[r, target_pos[r, k]] @ unembed))[target_ids[r, k]]

    where cap(x) = softcap * tanh(x / softcap) when the model caps its logits (Gemma), else x.

    hidden [R, T, D] (compute dtype), unembed [D, V]; the slots come from `causal_targets`. Logits are
    float32 for `chunk_size` vocabulary columns at a time ([R*C, chunk_size] live, forward and backward),
    never [R, T, V]. Rows stay whole, so a row-sharded batch gathers on its own device: under sequence
    parallelism the hidden states are all-gathered over the sequence axis first ([R, T, D], small next to
    attention's and the MLP's activations), and the target slots stay split over it (row_sharding), so each
    device of a sequence group scores its own C/S slots.
    """
    hidden = constrain(hidden, ("batch", None, None))
    picked = jnp.take_along_axis(hidden, target_pos[..., None], axis=1)  # [R, C, D]
    r, c, d = picked.shape
    # Flat [R*C, D]: XLA:CPU runs 2-D matmuls (and the dW contraction over tokens) faster than 3-D einsums.
    nll = _chunked_nll(picked.reshape(r * c, d), unembed, target_ids.reshape(-1), target_weight.reshape(-1) != 0,
                       chunk_size, softcap)
    return nll.reshape(r, c)


def weighted_nll(hidden, unembed, batch: MicroBatch, chunk_size: int, softcap=None) -> jax.Array:
    """sum(target_weight * nll) of one micro-batch; the weights carry the global normalisation."""
    nll = target_nll(hidden, unembed, batch.target_pos, batch.target_ids, batch.target_weight, chunk_size, softcap)
    return jnp.sum(nll * batch.target_weight)


@dataclass(frozen=True)
class MoeObjective:
    """How a mixture of experts trains: the objective is cross-entropy + aux_coef x load-balancing loss +
    z_coef x router z-loss; capacity_factor None is dropless dispatch (as transformers), cf > 0 caps each
    expert at ceil(cf x tokens x top_k / E) assignments per micro-batch in training (the rest dropped)."""

    aux_coef: float = 0.0
    z_coef: float = 0.0
    capacity_factor: Optional[float] = None

    def describe(self, aux_source: str = "") -> str:
        dispatch = ("dropless dispatch" if self.capacity_factor is None else
                    f"capacity-bounded dispatch in training (model.moe_capacity_factor={self.capacity_factor}; "
                    "dropped assignments logged as train/moe_dropped; validation and generation dropless)")
        return (f"mixture of experts: loss = cross-entropy + {self.aux_coef:g} x load-balancing loss{aux_source} + "
                f"{self.z_coef:g} x router z-loss (train/loss is the cross-entropy, train/aux_loss and "
                f"train/z_loss the router losses before their coefficients); {dispatch}")


def router_losses(stats: MoeStats, step_tokens) -> tuple[jax.Array, jax.Array]:
    """(load-balancing loss, z-loss) of one micro-batch as its parts of the step's: summed over the step's
    micro-batches they give the token-share-weighted load-balancing loss and the step's z-loss (see the
    module docstring). stats: the micro-batch's, stacked over the sparse layers [L_s, ...]; step_tokens:
    real tokens of the whole step (all micro-batches and devices)."""
    share = stats.tokens[0] / step_tokens  # every sparse layer routes the same real tokens
    z_sum, _ = z_loss(stats)
    return load_balancing_loss(stats) * share, z_sum / (step_tokens * stats.tokens.shape[0])


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


def _logits(hidden, w, fresh, softcap):
    """float32 logits [N, chunk], capped (Decoder.logits' cap); columns an earlier chunk covered are -inf, so
    they count once. Also d logits / d raw logits (1 - tanh^2 under a cap, else None)."""
    raw = jnp.einsum("nd,dv->nv", hidden, w, preferred_element_type=jnp.float32)
    logits = cap_logits(raw, softcap)
    slope = None if softcap is None else 1 - jnp.square(logits / softcap)
    return jnp.where(fresh, logits, -jnp.inf), slope


def _label_in_chunk(labels, start, i, chunk):
    """labels' column inside the chunk, and whether the label is one of its fresh columns. [N] each."""
    local = labels - start
    return local, (labels >= i * chunk) & (local < chunk)


def _num_chunks(vocab, chunk):
    return -(-vocab // chunk)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_nll(hidden, unembed, labels, valid, chunk_size, softcap):
    return _chunked_nll_fwd(hidden, unembed, labels, valid, chunk_size, softcap)[0]


def _chunked_nll_fwd(hidden, unembed, labels, valid, chunk_size, softcap):
    vocab = unembed.shape[1]
    chunk = min(chunk_size, vocab)

    def step(carry, i):  # online logsumexp over chunks, plus the target logit from its chunk
        running_max, running_sum, target = carry
        start, w, fresh = _chunk(unembed, i, chunk)
        logits, _ = _logits(hidden, w, fresh, softcap)
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


def _chunked_nll_bwd(chunk_size, softcap, residuals, g):
    """d nll / d logits = softmax - onehot(label), rebuilt one chunk at a time from the saved lse; each
    chunk's dW is added into its columns of one [D, V] buffer (in place in the loop)."""
    hidden, unembed, labels, valid, lse = residuals
    vocab = unembed.shape[1]
    chunk = min(chunk_size, vocab)
    g = jnp.where(valid, g, 0.0)

    def step(carry, i):
        d_hidden, d_unembed = carry
        start, w, fresh = _chunk(unembed, i, chunk)
        logits, slope = _logits(hidden, w, fresh, softcap)
        local, inside = _label_in_chunk(labels, start, i, chunk)
        is_label = (jnp.arange(chunk) == local[..., None]) & inside[..., None]  # fused compare, no one-hot
        d_logits = g[..., None] * (jnp.exp(logits - lse[..., None]) - is_label)  # [N, chunk]
        if slope is not None:  # through the cap: d raw = d capped * (1 - tanh^2)
            d_logits = d_logits * slope
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
