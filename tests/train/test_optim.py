"""Schedules in closed form, the no-decay mask, non-finite skips, and accumulation == one big batch."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jsft.config import OptimConfig
from jsft.train.optim import (
    consecutive_skips,
    current_lr,
    decay_mask,
    make_optimizer,
    make_schedule,
    skipped_steps,
    warmup_steps,
)

LR = 1e-3


def cfg(**kw):
    return OptimConfig(lr=LR, **kw)



def test_warmup_steps_from_ratio_or_count():
    assert warmup_steps(cfg(lr_warmup_steps_ratio=0.1), 95) == 9  # int(), as veRL
    assert warmup_steps(cfg(lr_warmup_steps_ratio=0.1, lr_warmup_steps=3), 95) == 3


def test_cosine_schedule_closed_form():
    total, warm, min_ratio = 100, 10, 0.1
    s = make_schedule(cfg(lr_scheduler_type="cosine", lr_warmup_steps=warm, min_lr_ratio=min_ratio), total)
    for step in [0, 1, 5, 10, 30, 55, 99, 100]:
        if step < warm:
            expected = LR * step / warm
        else:
            progress = (step - warm) / (total - warm)
            expected = LR * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
        np.testing.assert_allclose(s(step), expected, rtol=1e-6, atol=1e-12, err_msg=f"step {step}")
    np.testing.assert_allclose(s(total), min_ratio * LR, rtol=1e-6)


def test_cosine_without_warmup_starts_at_peak():
    s = make_schedule(cfg(lr_scheduler_type="cosine"), 8)
    np.testing.assert_allclose(s(0), LR, rtol=1e-6)


def test_wsd_schedule_phases():
    total, warm = 100, 10  # decay over the last 20 steps: 80 -> 100
    s = make_schedule(cfg(lr_scheduler_type="wsd", lr_warmup_steps=warm, wsd_decay_ratio=0.2, min_lr_ratio=0.1), total)
    np.testing.assert_allclose([s(0), s(5)], [0.0, LR / 2], rtol=1e-6)
    np.testing.assert_allclose([s(10), s(50), s(80)], [LR] * 3, rtol=1e-6)
    np.testing.assert_allclose(s(90), LR - (LR - 0.1 * LR) * 10 / 20, rtol=1e-6)
    np.testing.assert_allclose([s(100), s(120)], [0.1 * LR] * 2, rtol=1e-6)


def test_constant_schedule_with_warmup():
    s = make_schedule(cfg(lr_scheduler_type="constant", lr_warmup_steps_ratio=0.25), 8)
    np.testing.assert_allclose([s(0), s(1), s(2), s(7)], [0.0, LR / 2, LR, LR], rtol=1e-6)


def test_unknown_scheduler_names_the_key():
    with pytest.raises(ValueError, match="optim.lr_scheduler_type"):
        make_schedule(cfg(lr_scheduler_type="linear"), 8)


def test_decay_mask_hits_exactly_norms_and_biases():
    params = {
        "embed": {"embedding": 1},
        "layers": {"attn": {"q_proj": 1, "q_bias": 1, "q_norm": {"scale": 1}}, "mlp_norm": {"scale": 1}},
        "final_norm": {"scale": 1},
        "lm_head": {"kernel": 1},
    }
    expected = {
        "embed": {"embedding": True},
        "layers": {"attn": {"q_proj": True, "q_bias": False, "q_norm": {"scale": False}}, "mlp_norm": {"scale": False}},
        "final_norm": {"scale": False},
        "lm_head": {"kernel": True},
    }
    assert decay_mask(params) == expected


def test_decay_mask_on_the_real_model_state():
    from flax import nnx

    from jsft.models.config import ModelConfig
    from jsft.models.decoder import Decoder

    model_cfg = ModelConfig("qwen3", 64, 16, 32, 2, 2, 1, 8, 1e-6, 1e4, qkv_bias=True, o_bias=True, qk_norm=True)
    state = nnx.state(nnx.eval_shape(lambda: Decoder(model_cfg, rngs=nnx.Rngs(0))), nnx.Param)  # shapes only
    exempt = {
        jax.tree_util.keystr(path) for path, decays in jax.tree_util.tree_leaves_with_path(decay_mask(state)) if not decays
    }
    expected = {"final_norm", "attn_norm", "mlp_norm", "q_norm", "k_norm", "q_bias", "k_bias", "v_bias", "o_bias"}
    assert {re.findall(r"'(\w+)'", p)[-1] for p in exempt} == expected
    tx = make_optimizer(cfg(), 10)
    updates, _ = jax.eval_shape(lambda p: tx.update(p, tx.init(p), p), state)  # takes the nnx state as is
    assert jax.tree.structure(updates) == jax.tree.structure(state)


@pytest.mark.parametrize("no_decay", [True, False])
def test_weight_decay_follows_the_mask(no_decay):
    params = {"kernel": jnp.ones(3), "o_bias": jnp.ones(3), "final_norm": {"scale": jnp.ones(3)}}
    o = cfg(lr_scheduler_type="constant", weight_decay=0.5, no_decay_norms_and_biases=no_decay)
    tx = make_optimizer(o, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)  # no gradient: only weight decay moves parameters
    updates, _ = tx.update(zeros, tx.init(params), params)
    expected = -LR * 0.5 * np.ones(3)  # decoupled decay: -lr * wd * p
    np.testing.assert_allclose(updates["kernel"], expected, rtol=1e-6)
    for exempt in (updates["o_bias"], updates["final_norm"]["scale"]):
        np.testing.assert_allclose(exempt, 0.0 if no_decay else expected, rtol=1e-6)


def quadratic_loss(params, batch):
    """A weighted least-squares 'loss' whose weights carry the global normalisation, like the trainer's."""
    x, y, w = batch
    return (w * (x @ params["w"] + params["b_bias"] - y) ** 2).sum()


def global_batch(n=16, d=5, seed=0):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=n).astype(np.float32)
    return x, y, np.full(n, 1.0 / n, np.float32)  # token-mean over the global batch


def train_step(tx, accum):
    """The step the trainer builds: sum micro-batch gradients, then one optimizer update."""

    @jax.jit
    def step(params, opt_state, batch):
        micro = jax.tree.map(lambda a: a.reshape(accum, -1, *a.shape[1:]), batch)
        per_micro = [jax.value_and_grad(quadratic_loss)(params, jax.tree.map(lambda a: a[i], micro)) for i in range(accum)]
        loss, grads = jax.tree.map(lambda *xs: sum(xs), *per_micro)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)

    return step


PARAMS = {"w": jnp.arange(5, dtype=jnp.float32) / 5, "b_bias": jnp.zeros(())}


def test_accumulated_step_equals_single_big_batch_step():
    tx = make_optimizer(cfg(lr_scheduler_type="cosine", lr_warmup_steps=1, clip_grad=0.5), 6)
    runs = {}
    for accum in (1, 4, 16):
        params, state, step = PARAMS, tx.init(PARAMS), train_step(tx, accum)
        history = []
        for i in range(3):
            params, state, loss, gnorm = step(params, state, global_batch(seed=i))
            history.append((loss, gnorm))
        runs[accum] = (params, history)
    for accum in (4, 16):
        np.testing.assert_allclose(np.array(runs[accum][1]), np.array(runs[1][1]), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(runs[accum][0]), jax.tree.leaves(runs[1][0])):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_schedule_counts_optimizer_steps_not_micro_steps():
    o = cfg(lr_scheduler_type="cosine", lr_warmup_steps=2)
    tx, schedule = make_optimizer(o, 10), make_schedule(o, 10)
    params, state, step = PARAMS, tx.init(PARAMS), train_step(tx, accum=4)
    for n in range(1, 5):
        params, state, _, _ = step(params, state, global_batch(seed=n))
        assert int(_schedule_count(state)) == n
        np.testing.assert_allclose(current_lr(state), schedule(n - 1), rtol=1e-6)  # the lr just applied


def test_non_finite_gradient_skips_and_counts():
    tx = make_optimizer(cfg(lr_scheduler_type="constant"), 10)
    step = train_step(tx, accum=4)
    params, state, _, _ = step(PARAMS, tx.init(PARAMS), global_batch(seed=0))
    x, y, w = global_batch(seed=1)
    x[5, 2] = np.nan  # one bad sample in the second of four micro-batches
    before = params
    for n in (1, 2):
        params, state, _, gnorm = step(params, state, (x, y, w))
        assert not np.isfinite(gnorm)
        assert (int(skipped_steps(state)), int(consecutive_skips(state))) == (n, n)
        assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), params, before)))
    adam_count = int(optax.tree_utils.tree_get(state, "ScaleByAdamState").count)
    params, state, _, _ = step(params, state, global_batch(seed=2))
    assert (int(skipped_steps(state)), int(consecutive_skips(state))) == (2, 0)
    assert int(optax.tree_utils.tree_get(state, "ScaleByAdamState").count) == adam_count + 1 == 2
    assert int(_schedule_count(state)) == 4  # the schedule advanced through the skips, as veRL's does
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(params)) and not np.allclose(params["w"], before["w"])


def _schedule_count(state):
    """Optimizer steps taken (skipped ones included): the schedule's position, read from optax's state."""
    return optax.tree_utils.tree_get(state, "InjectStatefulHyperparamsState").count
