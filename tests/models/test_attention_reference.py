"""The xla reference attention's window, sinks, softcap and scale against a plain numpy softmax per query."""

import jax.numpy as jnp
import numpy as np
import pytest

from jsft.models.attention import attention


def _dense(q, k, v, seg, pos, window, sinks, softcap, scale):
    """One query at a time: the keys it may see, scaled and capped scores, a sink in the denominator."""
    b, t, n, h = q.shape
    g = n // k.shape[2]
    out = np.zeros_like(q)
    for r in range(b):
        for i in range(t):
            if seg[r, i] == 0:
                continue
            seen = [j for j in range(t) if seg[r, j] == seg[r, i] and pos[r, i] - window < pos[r, j] <= pos[r, i]]
            for head in range(n):
                s = np.array([q[r, i, head] @ k[r, j, head // g] for j in seen]) * scale
                s = softcap * np.tanh(s / softcap)
                m = max(s.max(), sinks[head])
                e = np.exp(s - m)
                p = e / (e.sum() + np.exp(sinks[head] - m))
                out[r, i, head] = p @ v[r, seen, head // g]
    return out


@pytest.mark.parametrize("traced_window", [False, True])
def test_window_sinks_softcap_scale_match_a_dense_reference(traced_window):
    rng = np.random.default_rng(0)
    b, t, n, kh, h = 2, 24, 4, 2, 8
    q, k, v = (rng.normal(size=(b, t, x, h)).astype(np.float32) * 2 for x in (n, kh, kh))
    seg = np.array([[1] * 10 + [2] * 11 + [0] * 3, [1] * 24], np.int32)
    pos = np.array([list(range(10)) + list(range(11)) + [0, 1, 2], list(range(24))], np.int32)
    sinks = rng.normal(size=(n,)).astype(np.float32)
    window, softcap, scale = 5, 3.0, 0.4
    ids = dict(q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg), q_positions=jnp.asarray(pos),
               kv_positions=jnp.asarray(pos))
    got = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), **ids, impl="xla",
                    window=jnp.int32(window) if traced_window else window, sinks=jnp.asarray(sinks),
                    softcap=softcap, scale=scale)
    expected = _dense(q, k, v, seg, pos, window, sinks, softcap, scale)
    live = seg != 0
    np.testing.assert_allclose(np.asarray(got)[live], expected[live], atol=1e-5, rtol=1e-5)
