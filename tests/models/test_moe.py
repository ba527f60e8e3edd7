"""The MoE layer against transformers' own blocks (Qwen3-MoE, Mixtral, gpt-oss): outputs, input and weight
gradients, the load-balancing loss; the dispatch kernels against each other; capacity drops; padding."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.gpt_oss import modeling_gpt_oss
from transformers.models.mixtral import modeling_mixtral
from transformers.models.qwen3_moe import modeling_qwen3_moe

from jsft.models import moe as M

D, F, E, R = 32, 16, 8, 2
TOL = 2e-5


def _torch_block(family: str, **overrides):
    """A tiny transformers MoE block with random weights, and the MoeSpec that describes it."""
    torch.manual_seed(0)
    if family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(
            hidden_size=D, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=R, **overrides)
        block = modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(cfg)
        spec = M.MoeSpec(E, R, "softmax_topk", norm_topk_prob=cfg.norm_topk_prob)
    elif family == "mixtral":
        cfg = transformers.MixtralConfig(
            hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=R, **overrides)
        block = modeling_mixtral.MixtralSparseMoeBlock(cfg)
        spec = M.MoeSpec(E, R, "softmax_topk", norm_topk_prob=True)
    else:
        cfg = transformers.GptOssConfig(
            hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=R, **overrides)
        block = modeling_gpt_oss.GptOssMLP(cfg)
        spec = M.MoeSpec(E, R, "topk_softmax", activation="gpt_oss", swiglu_alpha=cfg.swiglu_alpha,
                         swiglu_limit=cfg.swiglu_limit, router_bias=True, expert_bias=True)
    with torch.no_grad():
        for name, p in block.named_parameters():
            # a wide router so no two top-k scores tie; small expert weights keep fp32 gradients near 1
            p.normal_(0, 1.0 if ("gate.weight" in name or "router" in name) else 0.1)
    return block.float(), spec


def _params(block, family: str) -> dict:
    """transformers' weights in jsft's layout (see moe.param_table)."""
    sd = {k: v.detach().numpy() for k, v in block.state_dict().items()}
    if family == "gpt_oss":
        gu = sd["experts.gate_up_proj"]  # [E, D, 2F], gate/up interleaved
        return {
            "router": sd["router.weight"].T, "router_bias": sd["router.bias"],
            "gate_up_proj": gu.reshape(E, D, F, 2).transpose(0, 1, 3, 2),
            "gate_up_bias": sd["experts.gate_up_proj_bias"].reshape(E, F, 2).transpose(0, 2, 1),
            "down_proj": sd["experts.down_proj"], "down_bias": sd["experts.down_proj_bias"],
        }
    gu = sd["experts.gate_up_proj"]  # [E, 2F, D]: gate rows then up rows
    return {
        "router": sd["gate.weight"].T,
        "gate_up_proj": gu.reshape(E, 2, F, D).transpose(0, 3, 1, 2),
        "down_proj": sd["experts.down_proj"].transpose(0, 2, 1),
    }


def _to_torch_layout(grads: dict, family: str) -> dict:
    """jsft's weight gradients mapped back to the torch parameter names and layouts."""
    if family == "gpt_oss":
        return {
            "router.weight": grads["router"].T, "router.bias": grads["router_bias"],
            "experts.gate_up_proj": grads["gate_up_proj"].transpose(0, 1, 3, 2).reshape(E, D, 2 * F),
            "experts.gate_up_proj_bias": grads["gate_up_bias"].transpose(0, 2, 1).reshape(E, 2 * F),
            "experts.down_proj": grads["down_proj"], "experts.down_proj_bias": grads["down_bias"],
        }
    return {
        "gate.weight": grads["router"].T,
        "experts.gate_up_proj": grads["gate_up_proj"].transpose(0, 2, 3, 1).reshape(E, 2 * F, D),
        "experts.down_proj": grads["down_proj"].transpose(0, 2, 1),
    }


def _inputs(b=2, t=24, seed=0):
    rs = np.random.RandomState(seed)
    return rs.randn(b, t, D).astype(np.float32), rs.randn(b, t, D).astype(np.float32)


def _jsft_grads(p, x, cot, spec, mask=None):
    def f(p, x):
        y, stats = M.moe(p, x, spec, mask)
        return jnp.sum(y * cot), (y, stats)

    (_, (y, stats)), (gp, gx) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(p, x)
    return np.asarray(y), stats, np.asarray(gx), jax.tree.map(np.asarray, gp)


FAMILIES = [
    ("qwen3_moe", {"norm_topk_prob": True}),
    ("qwen3_moe", {"norm_topk_prob": False}),
    ("mixtral", {}),
    ("gpt_oss", {"swiglu_limit": 0.5}),  # a low limit, so the clamps bind at these small weights
]


@pytest.mark.parametrize("family,overrides", FAMILIES, ids=lambda v: str(v))
def test_layer_matches_transformers_forward_and_gradients(family, overrides):
    block, spec = _torch_block(family, **overrides)
    x, cot = _inputs()
    xt = torch.tensor(x, requires_grad=True)
    out = block(xt)
    yt = out[0] if isinstance(out, tuple) else out
    (yt * torch.tensor(cot)).sum().backward()
    p = {k: jnp.asarray(v) for k, v in _params(block, family).items()}
    y, _, gx, gp = _jsft_grads(p, jnp.asarray(x), jnp.asarray(cot), spec)
    np.testing.assert_allclose(y, yt.detach().numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(gx, xt.grad.numpy(), atol=TOL, rtol=0)
    torch_grads = {n: q.grad.numpy() for n, q in block.named_parameters()}
    for name, g in _to_torch_layout(gp, family).items():
        np.testing.assert_allclose(g, torch_grads[name], atol=TOL, rtol=0, err_msg=name)
    if family == "gpt_oss":  # the clamps bind on a fair share of the gate/up values, not just exist
        h = np.einsum("std,edn->sten", x, block.experts.gate_up_proj.detach().numpy())
        assert (np.abs(h) > spec.swiglu_limit).mean() > 0.1


def test_load_balancing_and_z_loss_match_transformers_with_padding():
    block, spec = _torch_block("qwen3_moe")
    p = {k: jnp.asarray(v) for k, v in _params(block, "qwen3_moe").items()}
    mask = np.ones((2, 24), bool)
    mask[0, 17:] = False
    mask[1, :5] = False
    layers = [_inputs(seed=s)[0] for s in range(3)]  # three "layers" of router logits
    router = jax.jit(lambda x, m: M.moe(p, x, spec, m)[1])
    stats = [router(jnp.asarray(x), jnp.asarray(mask)) for x in layers]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *stats)
    with torch.no_grad():
        logits = tuple(block.gate(torch.tensor(x).reshape(-1, D))[0] for x in layers)
    expected = modeling_qwen3_moe.load_balancing_loss_func(logits, E, R, torch.tensor(mask))
    np.testing.assert_allclose(float(M.load_balancing_loss(stacked)), float(expected), rtol=1e-6)
    # summing the stats of two halves of the batch gives the same loss as the whole batch: exact aggregation
    halves = [router(jnp.asarray(x[i:i + 1]), jnp.asarray(mask[i:i + 1])) for x in layers for i in (0, 1)]
    summed = jax.tree.map(lambda *a: sum(a), *halves)
    np.testing.assert_allclose(float(M.load_balancing_loss(summed)), float(expected), rtol=1e-6)
    z_sum, z_count = M.z_loss(stacked)
    lse = torch.stack([torch.logsumexp(g, -1) for g in logits]).numpy()  # [L, S]
    m = mask.reshape(-1)
    np.testing.assert_allclose(float(z_sum / z_count), (lse[:, m] ** 2).mean(), rtol=1e-6)
    assert int(z_count) == 3 * m.sum()
    counts = np.asarray(stacked.expert_counts)
    assert counts.sum() == 3 * m.sum() * R
    load_max, load_mean = M.expert_load(stacked)
    np.testing.assert_allclose(np.asarray(load_mean), m.sum() * R / E)
    np.testing.assert_array_equal(np.asarray(load_max), counts.max(-1))


def test_kernels_agree_and_padding_is_not_routed():
    block, spec = _torch_block("gpt_oss", swiglu_limit=0.5)  # biases: padding slots must not leak them
    p = {k: jnp.asarray(v) for k, v in _params(block, "gpt_oss").items()}
    x, cot = _inputs()
    mask = np.ones((2, 24), bool)
    mask[1, 20:] = False
    runs = {}
    for kernel, tile in (("ragged_dot", 128), ("tiles", 4)):
        s = M.MoeSpec(**{**spec.__dict__, "kernel": kernel, "tile_rows": tile})
        runs[kernel, tile] = _jsft_grads(p, jnp.asarray(x), jnp.asarray(cot), s, jnp.asarray(mask))
    y0, st0, gx0, gp0 = runs["ragged_dot", 128]
    assert np.all(y0[~mask] == 0) and np.all(gx0[~mask] == 0)  # padding: no output, no gradient
    assert float(st0.tokens) == mask.sum() and float(st0.expert_counts.sum()) == mask.sum() * R
    for key, (y, st, gx, gp) in runs.items():
        np.testing.assert_allclose(y, y0, atol=1e-5, rtol=0, err_msg=str(key))
        np.testing.assert_allclose(gx, gx0, atol=1e-5, rtol=0, err_msg=str(key))
        for name in gp0:
            np.testing.assert_allclose(gp[name], gp0[name], atol=1e-5, rtol=0, err_msg=f"{key} {name}")
    # the padded tokens' rows equal the unmasked run's rows elsewhere: padding does not disturb real tokens
    y_all = jax.jit(lambda x: M.moe(p, x, spec)[0])(jnp.asarray(x))
    np.testing.assert_allclose(y0[mask], y_all[mask], atol=1e-6, rtol=0)


def _primitives(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _primitives(sub)


@pytest.mark.parametrize("kernel", ["ragged_dot", "tiles"])
def test_backward_moves_tokens_by_gathers_only(kernel):
    """No scatter-add over hidden-sized rows in the backward (those left are [E]-wide: counts, top-k's
    transpose into the router probabilities)."""
    spec = M.MoeSpec(E, R, kernel=kernel)
    p = {n: jnp.zeros(s, jnp.float32) for n, (s, _, _) in M.param_table(spec, D, F).items()}
    x = jnp.zeros((2, 24, D), jnp.float32)
    jaxpr = jax.make_jaxpr(jax.grad(lambda p, x: jnp.sum(M.moe(p, x, spec)[0]), argnums=(0, 1)))(p, x).jaxpr
    eqns = list(_primitives(jaxpr))
    assert any(e.primitive.name == "gather" and e.outvars[0].aval.shape[-1] == D for e in eqns)
    scatters = [e.invars[0].aval.shape for e in eqns if e.primitive.name.startswith("scatter")]
    assert scatters and all(shape[-1] != D for shape in scatters), scatters


def test_capacity_drops_late_assignments_by_position():
    """A capacity-bounded run equals a reference loop that keeps, per expert, its first C assignments in
    (token, k) order and gives the others zero output; the dropped count is reported."""
    block, spec = _torch_block("qwen3_moe")
    p = {k: jnp.asarray(v) for k, v in _params(block, "qwen3_moe").items()}
    x, _ = _inputs(b=1, t=40)
    cf = 0.5
    y, stats = jax.jit(lambda x: M.moe(p, x, M.MoeSpec(E, R, capacity_factor=cf)))(jnp.asarray(x))
    cap = int(np.ceil(cf * 40 * R / E))
    xf = x.reshape(40, D)
    logits = xf @ np.asarray(p["router"])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ids = np.argsort(-probs, -1, kind="stable")[:, :R]
    w = np.take_along_axis(probs, ids, -1)
    w /= w.sum(-1, keepdims=True)
    gu, down = np.asarray(p["gate_up_proj"]), np.asarray(p["down_proj"])
    expected, used, dropped = np.zeros_like(xf), np.zeros(E, int), 0
    for s in range(40):
        for k in range(R):
            e = ids[s, k]
            if used[e] == cap:
                dropped += 1
                continue
            used[e] += 1
            g, u = xf[s] @ gu[e, :, 0], xf[s] @ gu[e, :, 1]
            expected[s] += w[s, k] * ((g / (1 + np.exp(-g)) * u) @ down[e])
    assert dropped > 0 and int(stats.dropped) == dropped
    np.testing.assert_allclose(np.asarray(y).reshape(40, D), expected, atol=1e-5, rtol=0)


def test_spec_from_hf_configs_and_sparse_layers():
    qwen = transformers.Qwen3MoeConfig(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                                       num_hidden_layers=6, mlp_only_layers=[0], decoder_sparse_step=2)
    assert M.MoeSpec.from_hf(qwen, capacity_factor=1.5) == M.MoeSpec(8, 2, norm_topk_prob=False, capacity_factor=1.5)
    # transformers' own choice of MoE vs dense layer for the same config
    expected = tuple(isinstance(modeling_qwen3_moe.Qwen3MoeDecoderLayer(qwen, i).mlp,
                                modeling_qwen3_moe.Qwen3MoeSparseMoeBlock) for i in range(6))
    assert M.sparse_layers(qwen) == expected == (False, True, False, True, False, True)
    assert M.expert_hidden_size(qwen) == qwen.moe_intermediate_size
    mixtral = transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2)
    assert M.MoeSpec.from_hf(mixtral) == M.MoeSpec(4, 2, norm_topk_prob=True)
    oss = transformers.GptOssConfig(num_local_experts=4, num_experts_per_tok=2, swiglu_limit=5.0)
    spec = M.MoeSpec.from_hf(oss)
    assert (spec.routing, spec.activation, spec.swiglu_limit, spec.router_bias, spec.expert_bias) == (
        "topk_softmax", "gpt_oss", 5.0, True, True)


def test_spec_rejects_what_it_cannot_run():
    with pytest.raises(ValueError, match="qwen2_moe"):
        M.MoeSpec.from_hf(transformers.Qwen2MoeConfig())
    with pytest.raises(ValueError, match="mixtral router_jitter_noise=0.1"):
        M.MoeSpec.from_hf(transformers.MixtralConfig(router_jitter_noise=0.1))
    with pytest.raises(ValueError, match="qwen3_moe hidden_act='gelu'"):
        M.MoeSpec.from_hf(transformers.Qwen3MoeConfig(hidden_act="gelu"))
    with pytest.raises(ValueError, match="routing='sigmoid'"):
        M.MoeSpec(8, 2, routing="sigmoid")
    with pytest.raises(ValueError, match="top_k=9"):
        M.MoeSpec(8, 9)
