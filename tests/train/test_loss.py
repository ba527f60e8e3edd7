"""The loss path (causal_targets on the host + target_nll on device) against full-logits references (jax and
torch), packing, memory; loss_weights invariance."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jsft.data.batch import LOSS_AGG_MODES, batch_counts, causal_targets, loss_weights, target_mask
from jsft.train.loss import target_nll


def token_nll(hidden, unembed, input_ids, segment_ids, chunk_size):
    """Per-token NLL aligned with input_ids ([B, T], 0 where nothing is predicted), computed the way the
    trainer does: every token that continues its sample is a target (causal_targets), logits at the
    listed positions only (target_nll), scattered back to the targets' positions for comparison."""
    weights = target_mask(np.ones(segment_ids.shape), np.asarray(segment_ids)).astype(np.float32)
    pos, ids, weight = causal_targets(weights, np.asarray(input_ids), capacity=segment_ids.shape[1])
    nll = target_nll(hidden, unembed, pos, ids, weight, chunk_size)
    rows = np.arange(nll.shape[0])[:, None]
    nll = jnp.where(weight != 0, nll, 0.0)
    return jnp.zeros(input_ids.shape, jnp.float32).at[rows, pos + 1].add(nll)


@pytest.fixture(autouse=True)
def fp32_matmuls():
    """Full fp32 matmuls on every backend (GPUs default to TF32), so 1e-6 comparisons are meaningful."""
    with jax.default_matmul_precision("highest"):
        yield


def naive_nll(hidden, unembed, input_ids, segment_ids):
    """Full [B, T, V] logits, one-hot cross-entropy of the shifted labels, masked at segment starts."""
    logp = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", hidden, unembed), axis=-1)[:, :-1]
    onehot = jax.nn.one_hot(input_ids[:, 1:], unembed.shape[1])
    nll = -(logp * onehot).sum(-1)
    same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
    return jnp.pad(jnp.where(same, nll, 0.0), ((0, 0), (1, 0)))


def random_inputs(seed, B=2, T=13, D=8, V=37):
    k = jax.random.split(jax.random.key(seed), 3)
    hidden = jax.random.normal(k[0], (B, T, D), jnp.float32)
    unembed = jax.random.normal(k[1], (D, V), jnp.float32)
    ids = jax.random.randint(k[2], (B, T), 0, V)
    seg = jnp.array([[1] * 5 + [2] * 6 + [0] * (T - 11), [1] * T])[:B]  # packed row, full row
    return hidden, unembed, ids, seg


@pytest.mark.parametrize("chunk_size", [8, 37, 64])  # 8 does not divide V=37; 64 exceeds it
def test_token_nll_matches_full_logits_and_grads(chunk_size):
    hidden, unembed, ids, seg = random_inputs(0)
    w = jax.random.uniform(jax.random.key(1), ids.shape)

    def loss(fn, h, u):
        return (w * fn(h, u, ids, seg)).sum()

    chunked = lambda h, u, i, s: token_nll(h, u, i, s, chunk_size)  # noqa: E731
    np.testing.assert_allclose(chunked(hidden, unembed, ids, seg), naive_nll(hidden, unembed, ids, seg), atol=1e-6)
    g_chunk = jax.grad(lambda h, u: loss(chunked, h, u), argnums=(0, 1))(hidden, unembed)
    g_naive = jax.grad(lambda h, u: loss(naive_nll, h, u), argnums=(0, 1))(hidden, unembed)
    for a, b in zip(g_chunk, g_naive):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_token_nll_matches_torch_cross_entropy():
    hidden, unembed, ids, _ = random_inputs(2, B=1)
    seg = jnp.ones_like(ids)
    nll = token_nll(hidden, unembed, ids, seg, chunk_size=5)
    logits = torch.tensor(np.asarray(hidden[0] @ unembed, dtype=np.float64))
    labels = torch.tensor(np.asarray(ids[0, 1:]), dtype=torch.long)
    ref = torch.nn.functional.cross_entropy(logits[:-1], labels, reduction="none")
    np.testing.assert_allclose(nll[0, 1:], ref.numpy(), atol=1e-6)
    assert nll[0, 0] == 0.0


def test_bf16_inputs_give_fp32_nll_close_to_fp32_and_input_dtype_grads():
    hidden, unembed, ids, seg = random_inputs(6)
    h16, u16 = hidden.astype(jnp.bfloat16), unembed.astype(jnp.bfloat16)
    nll = token_nll(h16, u16, ids, seg, chunk_size=8)
    assert nll.dtype == jnp.float32
    np.testing.assert_allclose(nll, naive_nll(h16.astype(jnp.float32), u16.astype(jnp.float32), ids, seg), atol=1e-4)
    grads = jax.grad(lambda h, u: token_nll(h, u, ids, seg, 8).sum(), argnums=(0, 1))(h16, u16)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]


def test_packed_row_equals_samples_run_separately():
    hidden, unembed, ids, _ = random_inputs(3, B=1, T=12)
    seg = jnp.array([[1] * 4 + [2] * 5 + [3] * 3])
    packed = token_nll(hidden, unembed, ids, seg, chunk_size=5)[0]
    for s, (lo, hi) in enumerate([(0, 4), (4, 9), (9, 12)], start=1):
        alone = token_nll(hidden[:, lo:hi], unembed, ids[:, lo:hi], jnp.ones((1, hi - lo), jnp.int32), 5)[0]
        np.testing.assert_allclose(packed[lo:hi], alone, atol=1e-6, err_msg=f"sample {s}")


def test_segment_boundary_is_never_a_target():
    hidden, unembed, ids, seg = random_inputs(4)  # row 0: segment 1 = 0..4, segment 2 = 5..10, padding 11..12
    nll_fn = lambda h: token_nll(h, unembed, ids, seg, chunk_size=4)  # noqa: E731
    nll = nll_fn(hidden)
    np.testing.assert_array_equal(np.asarray(nll) != 0, target_mask(np.ones(seg.shape), np.asarray(seg)))
    assert nll[0, 0] == 0 and nll[0, 5] == 0 and (nll[0, 11:] == 0).all()
    # The last token of a sample predicts nothing: its hidden state gets no gradient.
    g = jax.grad(lambda h: nll_fn(h).sum())(hidden)
    assert (g[0, 4] == 0).all() and (g[0, 10:] == 0).all() and (g[0, 3] != 0).any()


def test_chunking_keeps_temp_memory_far_below_full_logits():
    B, T, D, V = 1, 1024, 64, 151_936
    args = (
        jax.ShapeDtypeStruct((B, T, D), jnp.bfloat16),
        jax.ShapeDtypeStruct((D, V), jnp.bfloat16),
        jax.ShapeDtypeStruct((B, T), jnp.int32),
        jax.ShapeDtypeStruct((B, T), jnp.int32),
    )

    def temp_bytes(nll_fn):
        grad = jax.grad(lambda h, u, i, s: nll_fn(h, u, i, s).sum(), argnums=(0, 1))
        return jax.jit(grad).lower(*args).compile().memory_analysis().temp_size_in_bytes

    full = temp_bytes(lambda h, u, i, s: naive_nll(h.astype(jnp.float32), u.astype(jnp.float32), i, s))
    every_position = jnp.arange(T)[None]  # the most a row can hold: every position a target
    chunked = temp_bytes(lambda h, u, i, s: target_nll(h, u, every_position, i, jnp.ones(i.shape), chunk_size=8192))
    print(f"\ntemp memory, fwd+bwd, T={T} V={V}: full logits {full / 2**20:.0f} MiB, chunked(8192) {chunked / 2**20:.0f} MiB")
    assert full > 5 * chunked


def test_fsdp_sharded_matches_unsharded_and_moves_only_chunks():
    """Batch over (data, fsdp), unembed's D over fsdp, as the trainer shards them on 8 devices."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
    hidden, unembed, ids, _ = random_inputs(5, B=8, T=12, D=16, V=100)
    pos = jnp.broadcast_to(jnp.arange(12), ids.shape)
    grad_fn = jax.grad(lambda h, u, i, p: target_nll(h, u, p, i, jnp.ones(i.shape), chunk_size=32).sum(), argnums=(0, 1))
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    args = [jax.device_put(x, batch) for x in (hidden, ids, pos)]
    args.insert(1, jax.device_put(unembed, NamedSharding(mesh, P("fsdp", None))))
    compiled = jax.jit(grad_fn).lower(*args).compile()
    for a, b in zip(compiled(*args), grad_fn(hidden, unembed, ids, pos)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # Every collective moves one [D, chunk] slice of the unembed or its gradient, never all [D, V].
    shapes = re.findall(r"= \w+\[([\d,]*)\][^=]*? (?:all-gather|all-reduce)\(", compiled.as_text())
    assert shapes and all(shape == "16,32" for shape in shapes), shapes


def random_samples(rng, n):
    """n samples: lengths, loss masks, and a per-token nll that travels with the token."""
    out = []
    for _ in range(n):
        length = int(rng.integers(2, 9))
        mask = (rng.random(length) < 0.6).astype(np.int32)
        out.append((mask, rng.random(length).astype(np.float32)))
    return out


def pack(samples, row_len, rows_per_batch):
    """First-fit into rows of row_len (segment ids 1, 2, ... per row), grouped into micro-batches."""
    rows = []
    for mask, nll in samples:
        if not rows or rows[-1][0].size + mask.size > row_len:
            rows.append((np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32)))
        m, s, x = rows[-1]
        seg_id = (s.max() if s.size else 0) + 1
        rows[-1] = (np.r_[m, mask], np.r_[s, np.full(mask.size, seg_id)], np.r_[x, nll])
    padded = [tuple(np.pad(a, (0, row_len - a.size)) for a in row) for row in rows]
    while len(padded) % rows_per_batch:
        padded.append(tuple(np.zeros(row_len, a.dtype) for a in padded[0]))
    arrays = [np.stack(a) for a in zip(*padded)]
    return [tuple(a[i : i + rows_per_batch] for a in arrays) for i in range(0, len(padded), rows_per_batch)]


def reference_loss(samples, mode, max_length):
    """Each mode's definition, on the unpacked samples; a sample's first token is never a target."""
    per_sample = [(mask[1:] * nll[1:]).sum() for mask, nll in samples]
    counts = [mask[1:].sum() for mask, _ in samples]
    n = sum(c > 0 for c in counts)
    return {
        "token-mean": sum(per_sample) / sum(counts),
        "seq-mean-token-sum": sum(per_sample) / n,
        "seq-mean-token-mean": sum(s / c for s, c in zip(per_sample, counts) if c) / n,
        "seq-mean-token-sum-norm": sum(per_sample) / (n * max_length),
    }[mode]


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_loss_weights_exact_under_any_split(mode):
    rng = np.random.default_rng(0)
    for trial in range(5):
        samples = random_samples(rng, 12)
        expected = reference_loss(samples, mode, max_length=16)
        for row_len, rows_per_batch in [(8, 1), (16, 2), (24, 3), (96, 1)]:
            micro = pack(samples, row_len, rows_per_batch)
            counts = np.sum([batch_counts(m, s) for m, s, _ in micro], axis=0)
            kw = dict(num_samples=counts[0], num_target_tokens=counts[1], max_length=16)
            total = sum((loss_weights(m, s, mode, **kw) * x).sum() for m, s, x in micro)
            np.testing.assert_allclose(total, expected, rtol=1e-6, err_msg=f"trial {trial}, rows of {row_len}")
            m, s, x = (np.stack(a) for a in zip(*micro))  # [accum, rows, L], as one step's input
            np.testing.assert_allclose((loss_weights(m, s, mode, **kw) * x).sum(), expected, rtol=1e-6)


def test_batch_counts_and_unknown_mode():
    mask = np.array([[1, 1, 1, 0, 1, 1], [1, 1, 0, 0, 0, 0]])
    seg = np.array([[1, 1, 2, 2, 3, 3], [1, 1, 0, 0, 0, 0]])  # segment 2 has no target after its start
    assert batch_counts(mask, seg) == (3, 3)
    with pytest.raises(ValueError, match="token-mean"):
        loss_weights(mask, seg, "mean", num_samples=3, num_target_tokens=3, max_length=6)


def test_causal_targets_list_each_target_with_its_predicting_position():
    # input_ids a0 a1 a2 b0 b1 pad, b0 masked in but starting its sample (loss_weights drops it)
    ids = np.array([[10, 11, 12, 20, 21, 0]])
    seg = np.array([[1, 1, 1, 2, 2, 0]])
    w = loss_weights(np.array([[0, 1, 1, 1, 1, 0]]), seg, "token-mean", num_samples=2, num_target_tokens=3,
                     max_length=6)
    target_pos, target_ids, target_weight = causal_targets(w, ids, capacity=4)
    np.testing.assert_array_equal(target_pos, [[0, 1, 3, 0]])
    np.testing.assert_array_equal(target_ids, [[11, 12, 21, 0]])
    np.testing.assert_allclose(target_weight, [[1 / 3, 1 / 3, 1 / 3, 0]])
    with pytest.raises(ValueError, match="capacity 2"):
        causal_targets(w, ids, capacity=2)
    with pytest.raises(ValueError, match="position 0"):
        causal_targets(np.array([[1.0, 0, 0]]), np.array([[1, 2, 3]]), capacity=3)


def test_padding_slots_change_neither_loss_nor_gradients():
    hidden, unembed, ids, seg = random_inputs(7)
    weights = target_mask(np.ones(seg.shape), np.asarray(seg)).astype(np.float32) * 0.1

    def loss(h, u, capacity):
        pos, labels, weight = causal_targets(weights, np.asarray(ids), capacity)
        nll = target_nll(h, u, pos, labels, weight, 8)
        return jnp.sum(nll * weight)

    tight = int((weights != 0).sum(axis=1).max())
    grad = jax.value_and_grad(loss, argnums=(0, 1))
    (a, ga), (b, gb) = grad(hidden, unembed, tight), grad(hidden, unembed, ids.shape[1])
    np.testing.assert_allclose(a, b, rtol=1e-6)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(x, y, atol=1e-7)


@pytest.mark.parametrize("chunk_size", [8, 64])
def test_final_logit_softcap_inside_the_chunks_matches_capped_full_logits(chunk_size):
    """Gemma's cap c * tanh(logits / c) in the chunked loss: values and gradients of the capped full logits."""
    hidden, unembed, ids, seg = random_inputs(2)
    hidden = hidden * 3  # logits well into tanh's bend
    cap = 2.5
    weights = target_mask(np.ones(seg.shape), np.asarray(seg)).astype(np.float32)
    pos, target_ids, target_weight = causal_targets(weights, np.asarray(ids), capacity=seg.shape[1])

    def chunked(h, u):
        nll = target_nll(h, u, pos, target_ids, target_weight, chunk_size, cap)
        return jnp.sum(nll * target_weight)

    def full(h, u):
        logits = cap * jnp.tanh(jnp.einsum("btd,dv->btv", h, u) / cap)
        picked = jnp.take_along_axis(logits, jnp.asarray(pos)[..., None], axis=1)
        logp = jax.nn.log_softmax(picked, axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.asarray(target_ids)[..., None], axis=-1)[..., 0]
        return jnp.sum(nll * target_weight)

    np.testing.assert_allclose(chunked(hidden, unembed), full(hidden, unembed), rtol=1e-6)
    for g, e in zip(jax.grad(chunked, (0, 1))(hidden, unembed), jax.grad(full, (0, 1))(hidden, unembed)):
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5)
    uncapped = target_nll(hidden, unembed, pos, target_ids, target_weight, chunk_size)
    assert abs(float(jnp.sum(uncapped * target_weight)) - float(full(hidden, unembed))) > 1e-2  # the cap acts
