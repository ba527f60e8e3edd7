"""Mixture-of-experts checkpoints (Qwen3-MoE, Mixtral) in the decoder against transformers: logits, export."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jsft.models as jm
from jsft.sharding import make_mesh

KINDS = [
    # a dense layer among MoE layers, top-k probabilities renormalised and not
    ("qwen3_moe", {"mlp_only_layers": [1], "norm_topk_prob": True}),
    ("qwen3_moe", {"norm_topk_prob": False, "decoder_sparse_step": 2}),
    ("mixtral", {}),
]


@pytest.mark.parametrize("kind,overrides", KINDS, ids=lambda x: str(x))
def test_moe_logits_match_transformers_and_export_round_trips(tiny_hf, tmp_path, kind, overrides):
    path, ref = tiny_hf(kind, **overrides)
    ids = np.random.RandomState(0).randint(0, 256, (2, 24)).astype(np.int32)
    with torch.no_grad():
        expected = ref(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    model = jm.from_pretrained(path, dtype="float32", mesh=make_mesh({"fsdp": -1}))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), expected, atol=2e-4, rtol=0)

    out = jm.save_pretrained(model, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    sd_ref, sd_back = ref.state_dict(), back.state_dict()
    assert sd_ref.keys() == sd_back.keys()
    for name in sd_ref:
        assert torch.equal(sd_ref[name], sd_back[name]), name
    assert back.config.to_dict().items() >= {k: v for k, v in overrides.items()}.items()


def test_moe_generation_matches_transformers_greedy(tiny_hf):
    """The KV-cache sampler runs a mixture of experts (prompts of different lengths: left padding is
    neither routed nor attended)."""
    from jsft_testing import assert_greedy_matches_transformers

    path, ref = tiny_hf("qwen3_moe", mlp_only_layers=[1])
    model = jm.from_pretrained(path, dtype="float32")
    assert_greedy_matches_transformers(model, ref, max_new_tokens=10)


def test_moe_gradients_do_not_depend_on_the_micro_batch_split(tiny_hf):
    """Dropless routing is per token: the summed loss and gradients of 4 rows equal those of 2 + 2 rows."""
    import jax

    path, _ = tiny_hf("mixtral")
    model = jm.from_pretrained(path, dtype="float32")
    params = jm.flat_params(model)
    values = {k: v[...] for k, v in params.items()}
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 256, (4, 16)), jnp.int32)

    def loss(values, rows):
        logits = jm.replace_params(model, values)(rows[:, :-1])
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), rows[:, 1:, None], -1))

    grad = jax.jit(jax.value_and_grad(loss))
    whole_loss, whole = grad(values, ids)
    (l1, g1), (l2, g2) = grad(values, ids[:2]), grad(values, ids[2:])
    np.testing.assert_allclose(l1 + l2, whole_loss, rtol=1e-5)
    for k in whole:  # fp32 sums in another order: 1e-5 of the gradient's scale
        scale = float(jnp.max(jnp.abs(whole[k])))
        np.testing.assert_allclose(g1[k] + g2[k], whole[k], rtol=0, atol=1e-5 * scale, err_msg=k)


def test_moe_loss_and_gradients_equal_across_expert_axis_sizes(tmp_path):
    """Experts split over E = 1, 2, 4, 8 devices (shard_map, jsft/models/moe_parallel.py): the same loss and
    gradients as fsdp alone."""
    import jax

    from jsft_testing import make_tiny_hf

    make_tiny_hf(tmp_path / "hf", "qwen3_moe", mlp_only_layers=[1], num_experts=8, num_local_experts=8)
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 256, (8, 16)), jnp.int32)
    results = {}
    for e in (1, 2, 4, 8):
        mesh = make_mesh({"expert": e} if e > 1 else "auto")
        model = jm.from_pretrained(tmp_path / "hf", dtype="float32", mesh=mesh)
        values = {k: v[...] for k, v in jm.flat_params(model).items()}
        assert values["layers/moe_down_proj"].sharding.spec[1] == ("expert" if e > 1 else None)

        def loss(values, model=model):
            logits = jm.replace_params(model, values)(ids[:, :-1])
            return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

        with jax.set_mesh(mesh):
            value, grads = jax.jit(jax.value_and_grad(loss))(values)
        results[e] = float(value), {k: np.asarray(g) for k, g in grads.items()}
    for e in (2, 4, 8):
        assert results[e][0] == pytest.approx(results[1][0], rel=1e-5)
        for k, g in results[1][1].items():
            np.testing.assert_allclose(results[e][1][k], g, rtol=0, atol=1e-5 * np.abs(g).max(), err_msg=f"E={e} {k}")
