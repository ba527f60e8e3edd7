"""Expert parallelism on 8 fake CPU devices: the same outputs, router losses and gradients for every
expert-axis size, for micro-batches, with a data axis beside the expert axis, with rows split over a sequence
axis, and under a capacity bound."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jsft.models import moe as M
from jsft.models.moe_parallel import moe_expert_parallel

D, F, E, R, B, T = 16, 8, 8, 2, 8, 6
TOL = 1e-5


def _setup(spec):
    rs = np.random.RandomState(0)  # numpy, not eager jax.random: eager ops on 8 fake devices cost seconds
    scale = {"router": 1.0, "router_bias": 1.0, "gate_up_bias": 0.1, "down_bias": 0.1}  # wide router: no ties
    p = {name: jnp.asarray(rs.randn(*shape).astype(np.float32) * scale.get(name, 0.1))
         for name, (shape, _, _) in M.param_table(spec, D, F).items()}
    x = jnp.asarray(rs.randn(B, T, D).astype(np.float32))
    cot = jnp.asarray(rs.randn(B, T, D).astype(np.float32))
    mask = np.ones((B, T), bool)
    mask[3, 4:] = False
    return p, x, cot, jnp.asarray(mask)


def _objective(layer):
    """Output . cotangent plus both router losses, so gradients flow through the routing and the stats."""
    def f(p, x, cot, mask):
        y, stats = layer(p, x, mask)
        z_sum, z_count = M.z_loss(stats)
        return jnp.sum(y * cot) + 0.1 * M.load_balancing_loss(stats) + 0.01 * z_sum / z_count, (y, stats)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


def _assert_close(a, b):
    """1e-5 absolute; the stats (sums over ~50 tokens of values up to ~50) also get 1e-6 relative."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=TOL, rtol=1e-6)


def _mesh(n, names=("expert",), shape=None):
    return Mesh(np.array(jax.devices()[:n]).reshape(shape or (n,)), names)


def _check_sizes(spec, sizes):
    p, x, cot, mask = _setup(spec)
    (_, (y0, st0)), g0 = _objective(lambda p, x, m: M.moe(p, x, spec, m))(p, x, cot, mask)
    assert float(st0.expert_counts.max()) > float(st0.expert_counts.min())  # routing is not trivial
    for n in sizes:
        layer = lambda p, x, m, n=n: moe_expert_parallel(p, x, spec, m, mesh=_mesh(n))  # noqa: E731
        (_, (y, st)), g = _objective(layer)(p, x, cot, mask)
        _assert_close((y, st, g), (y0, st0, g0))
    return p, x, cot, mask, y0, st0


def test_gpt_oss_biases_under_expert_parallelism():
    spec = M.MoeSpec(E, R, "topk_softmax", activation="gpt_oss", swiglu_limit=0.5, router_bias=True,
                     expert_bias=True, kernel="tiles", tile_rows=8)
    _check_sizes(spec, (8,))  # each down bias is added once, on the device that owns the expert


def test_outputs_and_gradients_equal_across_expert_axis_sizes_and_micro_batches():
    spec = M.MoeSpec(E, R, kernel="ragged_dot")  # compiles faster than tiles; test_moe checks they agree
    p, x, cot, mask, y0, st0 = _check_sizes(spec, (1, 2, 4, 8))
    # two micro-batches on 4 devices: outputs concatenate, stats add up, and the gradients of the output
    # term add up (the router losses are nonlinear in the stats, so they are compared above, whole-batch)
    def linear(layer):
        def f(p, x, c, m):
            y, stats = layer(p, x, m)
            return jnp.sum(y * c), (y, stats)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

    _, g_whole = linear(lambda p, x, m: M.moe(p, x, spec, m))(p, x, cot, mask)
    step = linear(lambda p, x, m: moe_expert_parallel(p, x, spec, m, mesh=_mesh(4)))
    parts = [step(p, x[s], cot[s], mask[s]) for s in (slice(0, B // 2), slice(B // 2, B))]
    (_, (ya, sa)), ga = parts[0]
    (_, (yb, sb)), gb = parts[1]
    _assert_close(jnp.concatenate([ya, yb]), y0)
    _assert_close(jax.tree.map(lambda a, b: a + b, sa, sb), st0)
    _assert_close(jax.tree.map(lambda a, b: a + b, ga[0], gb[0]), g_whole[0])
    _assert_close(jnp.concatenate([ga[1], gb[1]]), g_whole[1])


def test_data_axis_beside_expert_axis_and_capacity():
    spec = M.MoeSpec(E, R, kernel="ragged_dot")
    p, x, cot, mask = _setup(spec)
    ref = _objective(lambda p, x, m: M.moe(p, x, spec, m))(p, x, cot, mask)
    mesh = _mesh(8, ("data", "expert"), (2, 4))
    for axes in (("data", "expert"), ("data",)):  # tokens split over the expert axis too, or replicated on it
        layer = lambda p, x, m, axes=axes: moe_expert_parallel(p, x, spec, m, mesh=mesh, batch_axes=axes)  # noqa
        _assert_close(_objective(layer)(p, x, cot, mask), ref)
    # sequence parallelism: each row's tokens split over `sequence` too; the router stats sum over both
    seq_mesh = _mesh(8, ("expert", "sequence"), (4, 2))
    layer = lambda p, x, m: moe_expert_parallel(p, x, spec, m, mesh=seq_mesh, length_axes=("sequence",))  # noqa
    _assert_close(_objective(layer)(p, x, cot, mask), ref)
    # capacity: with the batch split over the expert axis alone, the gathered order is the global order
    capped = M.MoeSpec(E, R, capacity_factor=0.5)
    (_, (y0, st0)), g0 = _objective(lambda p, x, m: M.moe(p, x, capped, m))(p, x, cot, mask)
    assert float(st0.dropped) > 0
    (_, (y, st)), g = _objective(lambda p, x, m: moe_expert_parallel(p, x, capped, m, mesh=_mesh(4)))(
        p, x, cot, mask)
    _assert_close((y, st, g), (y0, st0, g0))


def test_expert_axis_that_does_not_divide_the_experts_is_refused():
    with pytest.raises(ValueError, match=r"mesh.expert=3 does not divide num_experts=8; sizes that work"):
        moe_expert_parallel({}, jnp.zeros((3, 2, D)), M.MoeSpec(E, R), mesh=_mesh(3))
