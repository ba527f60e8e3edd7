"""Every attention implementation equals the reference `xla_attention`: outputs and gradients, on packed
rows, padding, an all-padding row, GQA, a KV-cache-shaped call and a batch split over devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsft.models import attention as A
from jsft.models import blockwise as B
from jsft.sharding import make_mesh
from jsft_testing import dense_attention as dense

N, K, H = 4, 2, 16  # GQA: two query heads per kv head


def packed_ids(rows: list[list[int]], length: int):
    """segment_ids, positions [B, length] for rows of back-to-back samples; the rest is padding."""
    seg = np.zeros((len(rows), length), np.int32)
    pos = np.zeros((len(rows), length), np.int32)
    for r, lengths in enumerate(rows):
        start = 0
        for s, n in enumerate(lengths):
            seg[r, start : start + n] = s + 1
            pos[r, start : start + n] = np.arange(n)
            start += n
    return jnp.asarray(seg), jnp.asarray(pos)


def qkv(b: int, t: int, s: int, seed: int = 0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(keys[0], (b, t, N, H), dtype)
    k = jax.random.normal(keys[1], (b, s, K, H), dtype)
    v = jax.random.normal(keys[2], (b, s, K, H), dtype)
    return q, k, v


def reference(q, k, v, q_seg, kv_seg, q_pos, kv_pos):
    return A.xla_attention(q, k, v, A.attention_mask(q_seg, kv_seg, q_pos, kv_pos))


def loss_and_grads(fn, q, k, v, ids, weights):
    """sum(weights * out) and its gradients; weights are zero at padding queries, whose output is unspecified."""
    f = lambda q, k, v: jnp.sum(fn(q, k, v, *ids) * weights)  # noqa: E731
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)


def assert_matches(ids, q, k, v, block, rtol=2e-5, atol=2e-5):
    q_seg = ids[0]
    weights = jax.random.normal(jax.random.PRNGKey(9), q.shape) * (q_seg > 0)[..., None, None]
    blockwise = lambda *a: A.blockwise_attention(*a, block=block)  # noqa: E731
    out, ref = jax.jit(blockwise)(q, k, v, *ids), reference(q, k, v, *ids)
    valid = np.asarray(q_seg > 0)
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], rtol=rtol, atol=atol)
    (loss, grads), (ref_loss, ref_grads) = (loss_and_grads(f, q, k, v, ids, weights) for f in (blockwise, reference))
    np.testing.assert_allclose(loss, ref_loss, rtol=rtol, atol=atol)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=rtol, atol=atol)


@pytest.mark.parametrize("block", [8, 16, 128])
def test_blockwise_matches_reference_on_packed_rows(block):
    # row 0: three samples crossing tile edges, padding at the end; row 1: one sample filling the row;
    # row 2: all padding (an empty row of a micro-batch); T = 75 is not a multiple of the tile.
    seg, pos = packed_ids([[30, 17, 21], [75], []], 75)
    q, k, v = qkv(3, 75, 75)
    assert_matches((seg, seg, pos, pos), q, k, v, block)


def test_blockwise_matches_reference_on_a_kv_cache_chunk():
    # a 12-token chunk at slots 28..39 of a 48-slot cache whose last 8 slots are still empty (segment 0)
    kv_seg = jnp.asarray(np.r_[np.ones(40), np.zeros(8)][None].astype(np.int32))
    kv_pos = jnp.asarray(np.r_[np.arange(40), np.zeros(8)][None].astype(np.int32))
    q_seg, q_pos = kv_seg[:, 28:40], kv_pos[:, 28:40]
    q, k, v = qkv(1, 12, 48, seed=1)
    assert_matches((q_seg, kv_seg, q_pos, kv_pos), q, k, v, block=8)


def test_blockwise_in_bfloat16_stays_close_to_the_fp32_reference():
    seg, pos = packed_ids([[40, 24]], 64)
    q, k, v = qkv(1, 64, 64, seed=2)
    blockwise = jax.jit(lambda *a: A.blockwise_attention(*a, block=16))
    out = blockwise(*(x.astype(jnp.bfloat16) for x in (q, k, v)), seg, seg, pos, pos)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), reference(q, k, v, seg, seg, pos, pos), atol=3e-2)


@pytest.mark.parametrize("split", [1, 2])
def test_only_tiles_with_a_visible_key_are_visited(split):
    # rows with sample boundaries inside tiles, padding, and whole tiles inside one sample (row 1: 50 tokens)
    seg, pos = packed_ids([[30, 17, 21], [50]], 80)
    ids = (seg, seg, pos, pos)
    full, n_full, part, n_part = B._live_pairs((*ids, B.window_data(None)), 8, 8, split)
    visible = np.asarray(A.attention_mask(*ids))  # [B, 80, 80]
    tiles = visible.reshape(2, 10, 8, 10, 8)
    expected_full = tiles.all(axis=(0, 2, 4))  # every element visible in every row: no mask needed
    f = 8 // split
    sub_live = visible.reshape(2, 10 * split, f, 10 * split, f).any(axis=(0, 2, 4))
    expected_part = sub_live & ~np.kron(expected_full, np.ones((split, split), bool))
    assert 0 < int(n_full) == expected_full.sum() and int(n_part) == expected_part.sum() > 0
    assert sorted(map(tuple, np.asarray(full)[: int(n_full)].tolist())) == sorted(zip(*np.nonzero(expected_full)))
    assert sorted(map(tuple, np.asarray(part)[: int(n_part)].tolist())) == sorted(zip(*np.nonzero(expected_part)))
    # every visible element lies in exactly one visited tile, and the visited area is well under half
    covered = np.kron(expected_full, np.ones((8, 8), int)) + np.kron(expected_part, np.ones((f, f), int))
    assert covered.max() == 1 and np.all(covered[visible.any(axis=0)] == 1)
    assert covered.sum() < covered.size // 2
    if split == 2:  # sub-tiles skip the dead half of diagonal tiles
        whole = B._live_pairs((*ids, B.window_data(None)), 8, 8, 1)
        assert covered.sum() < 64 * (int(whole[1]) + int(whole[3]))


@pytest.mark.parametrize("block, split", [(16, 2), (32, 2), (32, 4)])
def test_blockwise_with_sub_tiles_matches_reference(block, split, monkeypatch):
    # partly masked tiles cut into sub-tiles of block/split (MIN_SUB_TILE lowered so small tiles split too);
    # row 0 puts a sample boundary inside a tile and padding at the end, row 1 is one sample filling the row,
    # so some tiles are fully visible in both rows (the unmasked loop) and the rest partly masked
    monkeypatch.setattr(B, "MIN_SUB_TILE", 4)
    monkeypatch.setattr(B, "PARTIAL_SPLIT", split)
    seg, pos = packed_ids([[70, 20], [96]], 96)
    ids = (seg, seg, pos, pos)
    assert B._split(block, block) == split
    _, n_full, _, n_part = B._live_pairs((*ids, B.window_data(None)), block, block, split)
    assert int(n_full) > 0 and int(n_part) > 0
    q, k, v = qkv(2, 96, 96, seed=5)
    assert_matches(ids, q, k, v, block)


def test_each_row_visits_only_its_own_tiles():
    # row 1's keys 32..63 are padding, which no query of row 1 sees, yet row 0 (one 64-token sample) makes
    # their tiles live: NaN there must not reach row 1's outputs or any gradient, as it would if the rows
    # shared one tile list (masked scores are replaced, but 0 * NaN in the tile matmuls is NaN)
    seg, pos = packed_ids([[64], [20]], 64)
    ids = (seg, seg, pos, pos)
    q, k, v = qkv(2, 64, 64, seed=6)
    poisoned = [x.at[1, 32:].set(jnp.nan) for x in (k, v)]
    weights = jax.random.normal(jax.random.PRNGKey(9), q.shape) * (seg > 0)[..., None, None]
    blockwise = lambda *a: A.blockwise_attention(*a, block=8)  # noqa: E731
    (loss, grads), (clean_loss, clean_grads) = (loss_and_grads(blockwise, q, kk, vv, ids, weights)
                                                for kk, vv in (poisoned, (k, v)))
    np.testing.assert_allclose(loss, clean_loss, rtol=1e-6)
    for g, c in zip(grads, clean_grads):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(np.asarray(g), np.asarray(c), rtol=1e-6, atol=1e-6)


def test_attention_dispatch_and_auto():
    seg, pos = packed_ids([[300, 200], [520]], 520)  # longer than one tile: the blockwise path runs
    q, k, v = qkv(2, 520, 520, seed=3)
    ids = dict(q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos)
    out = jax.jit(lambda q, k, v: A.attention(q, k, v, impl="blockwise", **ids))(q, k, v)
    ref = A.attention(q, k, v, impl="xla", **ids)
    valid = np.asarray(seg > 0)
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], rtol=2e-5, atol=2e-5)
    assert A.resolve_impl("auto") == "blockwise"  # tests run on CPU
    with pytest.raises(ValueError, match="needs a GPU"):
        A.resolve_impl("cudnn")
    with pytest.raises(ValueError, match="allowed: auto, xla, blockwise, cudnn, pallas_gpu, splash"):
        A.resolve_impl("flash")


def test_auto_picks_the_platform_kernel(monkeypatch):
    """GPU: the packed Pallas kernel (fp32 too: Triton runs fp32 dots in IEEE precision); TPU: splash. cuDNN
    with fp32 and kernels forced onto the wrong accelerator are refused at model construction instead of
    failing inside XLA."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert A.resolve_impl("auto", jnp.bfloat16) == A.resolve_impl("auto", jnp.float32) == "pallas_gpu"
    assert A.resolve_impl("cudnn", jnp.bfloat16) == "cudnn"
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        A.resolve_impl("cudnn", jnp.float32)
    with pytest.raises(ValueError, match="splash needs a TPU"):
        A.resolve_impl("splash")
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert A.resolve_impl("auto", jnp.bfloat16) == A.resolve_impl("auto", jnp.float32) == "splash"
    with pytest.raises(ValueError, match="pallas_gpu needs a GPU"):
        A.resolve_impl("pallas_gpu")


def test_blockwise_per_device_under_a_mesh():
    """With a mesh active, each device lists and visits the live tiles of its own rows (shard_map)."""
    mesh = make_mesh({"fsdp": -1})
    rows = [[300, 200], [520], [100, 100, 100], [], [400], [260, 260], [10], [519]]
    seg, pos = packed_ids(rows, 520)
    q, k, v = qkv(8, 520, 520, seed=4)
    ids = dict(q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda q, k, v: A.attention(q, k, v, impl="blockwise", **ids))(q, k, v)
    valid = np.asarray(seg > 0)
    ref = A.attention(q, k, v, impl="xla", **ids)
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], rtol=2e-5, atol=2e-5)


def test_run_config_accepts_every_implementation():
    from jsft.config import load_config

    for impl in ("auto", *A.IMPLEMENTATIONS):
        assert load_config(None, [f"model.attention_impl={impl}"]).model.attention_impl == impl


# ---- sliding window, sinks, softcap (Gemma 2/3, gpt-oss) ----------------------------------------------------------


def check_features(fn, ids, q, k, v, sinks, rtol=2e-5, atol=2e-5, **opts):
    """fn(q, k, v, sinks) against `dense`: outputs at real queries, and d(q, k, v, sinks) of a weighted sum."""
    q_seg = ids[0]
    weights = jax.random.normal(jax.random.PRNGKey(9), q.shape) * (q_seg > 0)[..., None, None]
    ref = lambda q, k, v, sinks: dense(q, k, v, *ids, sinks=sinks, **opts)  # noqa: E731
    valid = np.asarray(q_seg > 0)
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(q, k, v, sinks))[valid], np.asarray(ref(q, k, v, sinks))[valid],
                               rtol=rtol, atol=atol)
    grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * weights), argnums=(0, 1, 2, 3)))  # noqa: E731
    for name, g, r in zip(("q", "k", "v", "sinks"), grad(fn)(q, k, v, sinks), grad(ref)(q, k, v, sinks)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=rtol, atol=atol, err_msg=f"d{name}")


FEATURES = [dict(window=12), dict(window=5, softcap=2.0), dict(window=20, softcap=3.0, scale=0.1)]


@pytest.mark.parametrize("impl", ["blockwise", "xla"])
@pytest.mark.parametrize("opts", FEATURES)
def test_window_sinks_softcap_match_the_dense_definition(impl, opts):
    """Windows shorter than the samples and than a tile, crossing tile edges; sinks of both signs (one large
    enough to take most of the mass); T = 75 not a multiple of the 16-tiles."""
    seg, pos = packed_ids([[30, 17, 21], [75], []], 75)
    q, k, v = qkv(3, 75, 75)
    sinks = jnp.asarray([0.5, -1.0, 3.0, 0.0], jnp.float32)
    ids = (seg, seg, pos, pos)
    if impl == "blockwise":
        fn = lambda q, k, v, sinks: A.blockwise_attention(q, k, v, *ids, opts["window"], sinks, block=16,  # noqa: E731
                                                          softcap=opts.get("softcap"), scale=opts.get("scale"))
    else:
        fn = lambda q, k, v, sinks: A.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos,  # noqa: E731
                                                kv_positions=pos, impl="xla", sinks=sinks, **opts)
    check_features(fn, ids, q, k, v, sinks, **opts)


def test_blockwise_traced_window_and_sub_tiles_on_a_kv_cache(monkeypatch):
    """The window as traced data (a scanned stack's per-layer value), sub-tiles, a KV-cache-shaped call, and
    the full-layer value 2**30 equal to no window."""
    monkeypatch.setattr(B, "MIN_SUB_TILE", 4)
    kv_seg = jnp.asarray(np.r_[np.ones(40), np.zeros(8)][None].astype(np.int32))
    kv_pos = jnp.asarray(np.r_[np.arange(40), np.zeros(8)][None].astype(np.int32))
    ids = (kv_seg[:, 24:40], kv_seg, kv_pos[:, 24:40], kv_pos)
    q, k, v = qkv(1, 16, 48, seed=1)
    sinks = jnp.asarray([1.0, -2.0, 0.0, 0.5], jnp.float32)
    fn = jax.jit(lambda q, k, v, sinks, w: A.blockwise_attention(q, k, v, *ids, w, sinks, block=16, softcap=4.0))
    for window in (7, 2**30):  # one compile: the window is data
        check_features(lambda q, k, v, s: fn(q, k, v, s, jnp.int32(window)), ids, q, k, v, sinks,
                       window=None if window == 2**30 else window, softcap=4.0)


def test_window_skips_the_tiles_it_hides():
    """Live tiles with a window: exactly those holding a visible element (the dense mask's tiles), fewer than
    causal alone, and the same count from a traced window; NaN in keys/values that no query's window reaches
    changes no output or gradient (those tiles are never visited)."""
    seg, pos = packed_ids([[96], [60, 36]], 96)
    window = 10
    ids = (seg, seg, pos, pos, B.window_data(window))
    full, n_full, part, n_part = B._live_pairs(ids, 8, 8)
    d = np.asarray(pos)[:, :, None] - np.asarray(pos)[:, None, :]
    visible = np.asarray(A.attention_mask(seg, seg, pos, pos)) & (d < window)
    live = visible.reshape(2, 12, 8, 12, 8).any(axis=(0, 2, 4))
    got = set(map(tuple, np.asarray(full)[: int(n_full)].tolist())) | set(map(tuple, np.asarray(part)[: int(n_part)].tolist()))
    assert got == set(zip(*np.nonzero(live)))
    causal = B._live_pairs((*ids[:4], B.window_data(None)), 8, 8)
    assert int(n_full) + int(n_part) < (int(causal[1]) + int(causal[3])) // 2
    traced = jax.jit(lambda w: B._live_pairs((*ids[:4], w), 8, 8))(jnp.int32(window))
    assert (int(traced[1]), int(traced[3])) == (int(n_full), int(n_part))
    # keys 0..47 of both rows are outside the window of queries 64..95: poison them, weight only those queries
    q, k, v = qkv(2, 96, 96, seed=7)
    weights = jax.random.normal(jax.random.PRNGKey(9), q.shape) * (jnp.arange(96) >= 64)[None, :, None, None]
    sinks = jnp.asarray([0.5, -1.0, 3.0, 0.0], jnp.float32)

    def loss(q, k, v, sinks):
        # only queries 64.. attend (a row's slice: the poisoned keys' tiles have no live pair for them)
        out = A.blockwise_attention(q[:, 64:], k, v, seg[:, 64:], seg, pos[:, 64:], pos, window, sinks, block=8)
        return jnp.sum(out * weights[:, 64:])

    poisoned = [x.at[:, :48].set(jnp.nan) for x in (k, v)]
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(q, *poisoned, sinks)
    clean_value, clean = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, sinks)
    np.testing.assert_allclose(value, clean_value, rtol=1e-6)
    for g, c in zip(grads, clean):
        g = np.asarray(g)[:, 48:] if g.ndim == 4 and g.shape[1] == 96 else np.asarray(g)
        c = np.asarray(c)[:, 48:] if c.ndim == 4 and c.shape[1] == 96 else np.asarray(c)
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, c, rtol=1e-5, atol=1e-6)


def test_window_sinks_softcap_per_device_under_a_mesh():
    """attention(impl=blockwise) under an 8-device mesh: each device its rows, sinks and the traced window
    replicated, dsinks summed over the devices."""
    rows = [[300, 200], [520], [100, 100, 100], [], [400], [260, 260], [10], [519]]
    seg, pos = packed_ids(rows, 520)
    q, k, v = qkv(8, 520, 520, seed=4)
    sinks = jnp.asarray([0.5, -1.0, 3.0, 0.0], jnp.float32)
    ids = dict(q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos)

    def fn(q, k, v, sinks):
        w = jnp.int32(200)  # traced: a per-layer window inside jit
        return A.attention(q, k, v, impl="blockwise", window=w, sinks=sinks, softcap=5.0, **ids)

    with jax.set_mesh(make_mesh({"fsdp": -1})):
        check_features(fn, (seg, seg, pos, pos), q, k, v, sinks, rtol=1e-4, atol=1e-4, window=200, softcap=5.0)
