"""The packed-row kernels (Pallas GPU, splash, cuDNN's packed layout) equal the reference `xla_attention`.

Pallas kernels run in interpret mode on CPU: the same kernel code as on the accelerator, executed by XLA.
Tiny shapes (T of 128-256, tiles of 32-128) keep each case to seconds. cuDNN cannot run here: its test checks
the packed-layout arguments jsft passes, by running an emulation of cuDNN's documented semantics on them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsft.models import attention as A
from jsft.models import attention_gpu as G
from jsft.models import attention_tpu as S

from jsft_testing import dense_attention as dense
from test_attention import check_features, packed_ids

N, K = 4, 2  # GQA: two query heads per kv head
ROWS = [[40, 50, 20], [128], [], [7, 1, 90]]  # several samples, padding, a full row, an all-padding row


def qkv(b, t, h, dtype, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    shapes = ((b, t, N, h), (b, t, K, h), (b, t, K, h))
    return tuple(jax.random.normal(key, s, jnp.float32).astype(dtype) for key, s in zip(keys, shapes))


def reference(q, k, v, seg, pos):
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    return A.xla_attention(f32(q), f32(k), f32(v), A.attention_mask(seg, seg, pos, pos))


def check(fn, rows, t, h, dtype):
    """Outputs at real tokens and the gradients of a weighted sum (zero weight at padding) match."""
    seg, pos = packed_ids(rows, t)
    q, k, v = qkv(len(rows), t, h, dtype)
    weights = jax.random.normal(jax.random.PRNGKey(9), q.shape) * (seg > 0)[..., None, None]
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * weights)  # noqa: E731
    kernel = lambda q, k, v: fn(q, k, v, seg)  # noqa: E731
    ref = lambda q, k, v: reference(q, k, v, seg, pos)  # noqa: E731
    out = jax.jit(kernel)(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    grads = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2)))(q, k, v)
    ref_grads = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    tol = 2e-5 if dtype == jnp.float32 else 3e-2  # bf16: the kernel rounds probabilities to bf16 for P @ V
    valid = np.asarray(seg > 0)
    as32 = lambda x: np.asarray(x.astype(jnp.float32))  # noqa: E731
    np.testing.assert_allclose(as32(out)[valid], as32(ref(q, k, v))[valid], rtol=tol, atol=tol)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.dtype == dtype, name
        scale = np.abs(as32(r)).max()
        np.testing.assert_allclose(as32(g) / scale, as32(r) / scale, atol=tol, err_msg=f"d{name}")


SMALL = G.Blocks(fwd_q=32, fwd_k=32, bwd=32, bwd_inner=32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_gpu_matches_reference(dtype):
    check(lambda q, k, v, seg: G.pallas_attention(q, k, v, seg, blocks=SMALL, interpret=True), ROWS, 128, 16, dtype)


def test_pallas_gpu_pads_lengths_and_head_dims_it_cannot_take():
    """T=100 (not a tile multiple, unequal forward tiles) and head dim 24 (not a power of two)."""
    blocks = G.Blocks(fwd_q=64, fwd_k=32, bwd=32, bwd_inner=32)
    rows = [[30, 50], [100], [1, 2, 3, 60]]
    check(lambda q, k, v, seg: G.pallas_attention(q, k, v, seg, blocks=blocks, interpret=True), rows, 100, 24,
          jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_splash_matches_reference(dtype):
    """T=200 is padded to 256 inside the call (two 128-tiles)."""
    rows = [[40, 100, 20], [200], [], [7, 1, 150]]
    check(lambda q, k, v, seg: S.splash_attention(q, k, v, seg, block=128, interpret=True), rows, 200, 128, dtype)


def test_pallas_gpu_skips_tiles_the_masks_zero_out():
    """NaN in a tile that a query never sees propagates if the tile is visited (0 * NaN = NaN), so finite
    results prove the kernel skips it: the second sample's queries skip the first sample's key tiles in the
    forward and dQ passes, and its key tiles skip the first sample's queries in the dK/dV pass."""
    seg, pos = packed_ids([[64, 64]], 128)
    q, k, v = qkv(1, 128, 16, jnp.float32)
    first, second = np.asarray(seg[0] == 1), np.asarray(seg[0] == 2)
    kernel = lambda q, k, v: G.pallas_attention(q, k, v, seg, blocks=SMALL, interpret=True)  # noqa: E731
    poisoned_v = v.at[:, :64].set(jnp.nan)
    out = jax.jit(kernel)(q, k, poisoned_v)
    assert np.isnan(np.asarray(out)[0, first]).all()
    np.testing.assert_allclose(np.asarray(out)[0, second], np.asarray(reference(q, k, v, seg, pos))[0, second],
                               rtol=2e-5, atol=2e-5)
    # cotangent NaN on the second sample's queries: the first sample's dK, dV must stay finite
    weights = jnp.where((seg == 2)[..., None, None], jnp.nan, 1.0)
    dk, dv = jax.jit(jax.grad(lambda k, v: jnp.sum(kernel(q, k, v) * weights), argnums=(0, 1)))(k, v)
    assert np.isfinite(np.asarray(dk)[0, first]).all() and np.isfinite(np.asarray(dv)[0, first]).all()
    assert np.isnan(np.asarray(dk)[0, second]).any()


def test_run_bounds():
    seg = jnp.asarray([[1, 1, 2, 2, 2, 0, 0], [3, 3, 3, 3, 3, 3, 3]], jnp.int32)
    lo, hi = G.run_bounds(seg)
    np.testing.assert_array_equal(lo, [[0, 0, 2, 2, 2, 5, 6], [0] * 7])  # padding: one-token segments
    np.testing.assert_array_equal(hi, [[1, 1, 4, 4, 4, 5, 6], [6] * 7])
    lo, hi = G.run_bounds(seg, jnp.int32(2))  # a window of 2: itself and the key before
    np.testing.assert_array_equal(lo, [[0, 0, 2, 2, 3, 5, 6], [0, 0, 1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(hi, [[1, 1, 3, 4, 4, 5, 6], [1, 2, 3, 4, 5, 6, 6]])


# ---- cuDNN packed layout ----------------------------------------------------------------------------------------


def test_cudnn_packed_args():
    seg, _ = packed_ids([[3, 2], [6], []], 6)
    seqlens, offsets = G.cudnn_packed_args(seg, max_segments=3)
    np.testing.assert_array_equal(seqlens, [[3, 2, -1], [6, -1, -1], [-1, -1, -1]])
    np.testing.assert_array_equal(offsets, [[0, 3, -1, -1], [0, -1, -1, -1], [-1, -1, -1, -1]])


def _emulated_cudnn(query, key, value, *, q_seqlen, kv_seqlen, q_offsets, kv_offsets, scale, mask_type, qkv_layout,
                    sliding_window_length=None):
    """cuDNN's packed-layout semantics in XLA: segment m of row b is tokens [offset, offset + seqlen), a
    causal sequence of its own; tokens outside every segment get 0. Checks what jsft passes on the way."""
    from jax._src.cudnn.fused_attention_stablehlo import MaskType

    b, t, n, h = query.shape
    assert qkv_layout == "BTNH" and mask_type == MaskType.PADDING_CAUSAL and scale == pytest.approx(h**-0.5)
    assert key.shape == value.shape == query.shape  # kv heads repeated (jax scales kv offsets by N)
    assert q_seqlen.shape == (b, t) and q_offsets.shape == (b, t + 1)  # [B, M], [B, M + 1] with M = T
    for a in (q_seqlen, kv_seqlen, q_offsets, kv_offsets):
        assert a.dtype == jnp.int32
    idx = jnp.arange(t)
    inside = (idx >= q_offsets[:, :-1, None]) & (idx < (q_offsets[:, :-1] + q_seqlen)[:, :, None])
    inside = inside & (q_seqlen >= 0)[:, :, None]  # [B, M, T]
    segment = jnp.where(inside.any(1), jnp.argmax(inside, axis=1) + 1, 0)  # [B, T]: 1 + segment index
    mask = (segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] > 0) & (idx[None, None] <= idx[:, None])
    if sliding_window_length:  # cuDNN's window: the last `length` keys, the query's own included
        mask = mask & (idx[:, None] - idx[None, None] < sliding_window_length)
    s = jnp.einsum("BTNH,BSNH->BNTS", query, key, preferred_element_type=jnp.float32) * scale
    p = jax.nn.softmax(jnp.where(mask[:, None], s, -1e30), axis=-1)
    out = jnp.einsum("BNTS,BSNH->BTNH", p, value.astype(jnp.float32)) * (segment > 0)[..., None, None]
    return out.astype(query.dtype)


def test_cudnn_packed_arguments_give_the_reference_attention(monkeypatch):
    """No [T, S] mask or bias reaches cuDNN, and the segment lengths and offsets jsft passes mean packed
    causal attention: an emulation of cuDNN's packed semantics on them equals the reference."""
    from jax._src.cudnn import fused_attention_stablehlo

    calls = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        assert not any(getattr(a, "ndim", 0) >= 3 for a in args[3:]) and "mask" not in kwargs and "bias" not in kwargs
        return _emulated_cudnn(*args, **kwargs)

    monkeypatch.setattr(fused_attention_stablehlo, "dot_product_attention", fake)
    rows = [[40, 50, 20], [128], [], [7, 1, 90]]
    check(lambda q, k, v, seg: G.cudnn_packed_attention(q, k, v, seg), rows, 128, 16, jnp.bfloat16)
    assert calls


def test_dispatch_runs_the_kernels_on_packed_rows_and_blockwise_for_a_cache():
    """attention(impl=...) routes packed self-attention to the kernel (interpreted on CPU); a KV-cache call
    (T != S) goes to blockwise/xla instead of failing."""
    seg, pos = packed_ids([[60, 40]], 100)
    q, k, v = qkv(1, 100, 16, jnp.float32)
    ids = dict(q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos)
    ref = reference(q, k, v, seg, pos)
    out = jax.jit(lambda q, k, v: A.attention(q, k, v, impl="pallas_gpu", **ids))(q, k, v)
    np.testing.assert_allclose(np.asarray(out)[0, :100], np.asarray(ref)[0], rtol=2e-5, atol=2e-5)
    cache_ids = dict(q_segment_ids=seg[:, :1], kv_segment_ids=seg, q_positions=pos[:, :1], kv_positions=pos)
    out = A.attention(q[:, :1], k, v, impl="pallas_gpu", **cache_ids)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref)[:, :1], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("impl", ["pallas_gpu", "splash"])
def test_kernels_per_device_under_a_mesh(impl):
    """Under an 8-device mesh each device runs the kernel on its own rows (shard_map), forward and backward."""
    from jsft.sharding import make_mesh

    rows = [[30, 70], [128], [], [5, 5, 5], [100], [64, 64], [1], [127]]
    seg, pos = packed_ids(rows, 128)
    q, k, v = qkv(8, 128, 128 if impl == "splash" else 16, jnp.float32, seed=3)
    ids = dict(q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos)
    weights = (seg > 0)[..., None, None].astype(jnp.float32)
    loss = lambda impl: lambda q: jnp.sum(A.attention(q, k, v, impl=impl, **ids) * weights)  # noqa: E731
    with jax.set_mesh(make_mesh({"fsdp": -1})):
        out = jax.jit(lambda q: A.attention(q, k, v, impl=impl, **ids))(q)
        dq = jax.jit(jax.grad(loss(impl)))(q)
    valid = np.asarray(seg > 0)
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(reference(q, k, v, seg, pos))[valid],
                               rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(dq), np.asarray(jax.grad(loss("xla"))(q)), rtol=2e-5, atol=2e-5)


# ---- sliding window, sinks, softcap -------------------------------------------------------------------------------

SINKS = jnp.asarray([0.5, -1.0, 3.0, 0.0], jnp.float32)


@pytest.mark.parametrize("window", [20, 2**30])
def test_pallas_gpu_window_sinks_softcap_match_the_dense_definition(window):
    """Window (traced: passed into jit as data; 2**30 = a full layer of a mixed stack) shorter than the
    samples and crossing the 32-tiles, sinks, softcap and a custom scale: outputs and d(q, k, v, sinks)."""
    seg, pos = packed_ids(ROWS, 128)
    q, k, v = qkv(len(ROWS), 128, 16, jnp.float32)
    fn = jax.jit(lambda q, k, v, sinks, w: G.pallas_attention(q, k, v, seg, window=w, sinks=sinks, softcap=3.0,
                                                              scale=0.2, blocks=SMALL, interpret=True))
    check_features(lambda q, k, v, s: fn(q, k, v, s, jnp.int32(window)), (seg, seg, pos, pos), q, k, v, SINKS,
                   window=window, softcap=3.0, scale=0.2)


def test_pallas_gpu_skips_the_tiles_outside_the_window():
    """One 128-token sample, window 16, 32-tiles: key tile 0 (keys 0..31) is outside the window of every query
    from 47 on. NaN there must not reach queries 64.. (forward), and a NaN cotangent on queries 64.. must not
    reach dK/dV of keys 0..31 (the dK/dV pass stops at the window's last query) nor dQ of queries 0..63."""
    seg, pos = packed_ids([[128]], 128)
    q, k, v = qkv(1, 128, 16, jnp.float32, seed=4)
    kernel = lambda q, k, v: G.pallas_attention(q, k, v, seg, window=16, sinks=SINKS, softcap=3.0,  # noqa: E731
                                                blocks=SMALL, interpret=True)
    out = jax.jit(kernel)(q, k.at[:, :32].set(jnp.nan), v.at[:, :32].set(jnp.nan))
    ref = dense(q, k, v, seg, seg, pos, pos, window=16, sinks=SINKS, softcap=3.0)
    assert np.isnan(np.asarray(out)[0, :32]).all()
    np.testing.assert_allclose(np.asarray(out)[0, 64:], np.asarray(ref)[0, 64:], rtol=2e-5, atol=2e-5)
    weights = jnp.where((jnp.arange(128) >= 64)[None, :, None, None], jnp.nan, 1.0)
    dq, dk, dv = jax.jit(jax.grad(lambda q, k, v: jnp.sum(kernel(q, k, v) * weights), argnums=(0, 1, 2)))(q, k, v)
    assert np.isfinite(np.asarray(dk)[0, :32]).all() and np.isfinite(np.asarray(dv)[0, :32]).all()
    assert np.isfinite(np.asarray(dq)[0, :64]).all()
    assert np.isnan(np.asarray(dk)[0, 64:]).any()


def test_splash_window_sinks_softcap_match_the_dense_definition():
    """splash's LocalMask for the (constant) window, its sinks and attn_logits_soft_cap."""
    rows = [[40, 68, 20], [128]]
    seg, pos = packed_ids(rows, 128)
    q, k, v = qkv(len(rows), 128, 128, jnp.float32)
    fn = lambda q, k, v, sinks: S.splash_attention(q, k, v, seg, window=24, sinks=sinks, softcap=3.0, block=128,  # noqa: E731
                                                   interpret=True)
    check_features(fn, (seg, seg, pos, pos), q, k, v, SINKS, window=24, softcap=3.0)


def test_cudnn_takes_a_constant_window(monkeypatch):
    """A constant window reaches cuDNN as sliding_window_length (emulated as cuDNN documents it)."""
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(fused_attention_stablehlo, "dot_product_attention", _emulated_cudnn)
    seg, pos = packed_ids([[40, 50, 20], [128]], 128)
    q, k, v = qkv(2, 128, 16, jnp.float32)
    out = G.cudnn_packed_attention(q, k, v, seg, window=9)
    valid = np.asarray(seg > 0)
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(dense(q, k, v, seg, seg, pos, pos, window=9))[valid],
                               rtol=2e-5, atol=2e-5)


def test_unsupported_features_fall_back_with_one_note(caplog):
    """cuDNN: sinks, softcap or a traced window -> pallas_gpu; splash: a traced window -> blockwise; each
    note logged once however many layers ask."""
    A._note.cache_clear()
    with caplog.at_level("WARNING", logger=A.__name__):
        assert A._fallback("cudnn", 128, None, None) == "cudnn" and A._fallback("splash", 128, SINKS, 30.0) == "splash"
        assert A._fallback("cudnn", None, SINKS, None) == A._fallback("cudnn", None, SINKS, None) == "pallas_gpu"
        assert A._fallback("cudnn", None, None, 50.0) == "pallas_gpu"
        traced = jax.jit(lambda w: jnp.int32(A._fallback("splash", w, None, None) == "blockwise"))(jnp.int32(8))
        assert int(traced) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "attention_impl=cudnn does not take sinks: those layers run pallas_gpu",
        "attention_impl=cudnn does not take softcap: those layers run pallas_gpu",
        "attention_impl=splash needs a constant window: layers with a per-layer (traced) window run blockwise",
    ]


def test_dispatch_passes_window_sinks_softcap_to_the_kernel_per_device():
    """attention(impl=pallas_gpu, window=, sinks=, softcap=) under an 8-device mesh (each device its rows,
    the window data and the sinks replicated, d sinks summed over devices) equals the dense definition."""
    from jsft.sharding import make_mesh

    rows = [[30, 70], [100], [], [5, 5, 5], [60, 40], [64, 36], [1], [99]]
    seg, pos = packed_ids(rows, 100)
    q, k, v = qkv(8, 100, 16, jnp.float32, seed=3)
    ids = dict(q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos)
    fn = lambda q, k, v, sinks: A.attention(q, k, v, impl="pallas_gpu", window=17, sinks=sinks, softcap=4.0,  # noqa: E731
                                            **ids)
    with jax.set_mesh(make_mesh({"fsdp": -1})):
        check_features(fn, (seg, seg, pos, pos), q, k, v, SINKS, window=17, softcap=4.0)
