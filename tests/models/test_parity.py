"""jsft decoders against transformers: logits, export round trip, sharded loading, packing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jsft.models as jm
from jsft.sharding import make_mesh

KINDS = [
    ("qwen2", {}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("qwen3", {}),
    ("llama3", {}),
    ("llama3", {"attention_bias": True, "num_key_value_heads": 1}),
    ("mistral", {}),
]


def _ids(shape, vocab=512, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


@pytest.mark.parametrize("kind,overrides", KINDS, ids=lambda x: str(x))
def test_logits_match_transformers_and_export_round_trips(tiny_hf, tmp_path, kind, overrides):
    path, ref = tiny_hf(kind, **overrides)
    ids = _ids((2, 48))  # longer than llama3's original_max_position_embeddings (32): scaling matters
    with torch.no_grad():
        expected = ref(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    model = jm.from_pretrained(path, dtype="float32", mesh=make_mesh({"fsdp": -1}))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), expected, atol=1e-4, rtol=0)

    out = jm.save_pretrained(model, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    sd_ref, sd_back = ref.state_dict(), back.state_dict()
    assert sd_ref.keys() == sd_back.keys()
    for name in sd_ref:
        assert sd_ref[name].dtype == sd_back[name].dtype, name
        assert torch.equal(sd_ref[name], sd_back[name]), name
    if overrides.get("tie_word_embeddings"):
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), "np") as f:
            assert "lm_head.weight" not in f.keys()


def test_sharded_loading_puts_an_eighth_on_each_device(tiny_hf):
    path, _ = tiny_hf("qwen2")
    model = jm.from_pretrained(path, dtype="float32", mesh=make_mesh({"fsdp": -1}))
    total, per_device = jm.model_bytes(model)
    assert len(per_device) == jax.device_count() == 8
    # everything but norms and biases is split 8 ways
    assert max(per_device.values()) < total / 8 * 1.1, (total, per_device)
    q = model.layers["q_proj"][...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, None)


def test_sharded_export_and_multi_file_index(tiny_hf, tmp_path):
    path, ref = tiny_hf("llama3")
    model = jm.from_pretrained(path, dtype="float32", mesh=make_mesh({"data": 2, "fsdp": 4}))
    out = jm.save_pretrained(model, tmp_path / "export", max_shard_size="200KB")
    assert len(list(out.glob("model-*.safetensors"))) > 2
    assert (out / "model.safetensors.index.json").exists()
    again = jm.from_pretrained(out, dtype="float32")  # sharded import
    ids = _ids((1, 20))
    with torch.no_grad():
        expected = ref(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(again(jnp.asarray(ids))), expected, atol=1e-4, rtol=0)
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ref.state_dict().items())


def test_bf16_checkpoint_exports_in_bf16(tiny_hf, tmp_path):
    path, ref = tiny_hf("qwen3")
    ref.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = jm.from_pretrained(tmp_path / "bf16", dtype="bfloat16", param_dtype="float32")
    out = jm.save_pretrained(model, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    for name, value in ref.state_dict().items():
        assert back.state_dict()[name].dtype == torch.bfloat16
        assert torch.equal(value, back.state_dict()[name]), name


def test_packed_rows_equal_separate_samples(tiny_hf):
    """Two samples packed in one row (segment ids, restarting positions) give each sample's own logits."""
    path, _ = tiny_hf("qwen3")
    model = jm.from_pretrained(path, dtype="float32")
    a, b = _ids((1, 13), seed=1), _ids((1, 9), seed=2)
    pad = 4
    row = np.concatenate([a, b, np.zeros((1, pad), np.int32)], axis=1)
    seg = np.array([[1] * 13 + [2] * 9 + [0] * pad], np.int32)
    pos = np.array([list(range(13)) + list(range(9)) + [0] * pad], np.int32)
    packed = np.asarray(model(jnp.asarray(row), jnp.asarray(pos), jnp.asarray(seg)))
    alone_a = np.asarray(model(jnp.asarray(a)))
    alone_b = np.asarray(model(jnp.asarray(b)))
    np.testing.assert_allclose(packed[:, :13], alone_a, atol=1e-5, rtol=0)
    np.testing.assert_allclose(packed[:, 13:22], alone_b, atol=1e-5, rtol=0)
    assert np.isfinite(packed).all()  # padding queries attend to nothing, yet stay finite


@pytest.mark.parametrize("policy", ["none", "full", "dots_saveable"])
def test_remat_policies_give_the_same_gradients(tiny_hf, policy):
    from flax import nnx

    path, _ = tiny_hf("qwen2")
    ids = jnp.asarray(_ids((2, 16)))

    def grads(remat):
        model = jm.from_pretrained(path, dtype="float32", remat_policy=remat)

        def loss(m):
            return jnp.mean(jax.nn.logsumexp(m(ids), axis=-1))

        return nnx.grad(loss)(model)

    base, other = grads("none"), grads(policy)
    for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(other)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=1e-5)


def test_bf16_compute_stays_close_to_fp32(tiny_hf):
    path, _ = tiny_hf("llama3")
    ids = jnp.asarray(_ids((2, 24)))
    f32 = np.asarray(jm.from_pretrained(path, dtype="float32")(ids))
    bf16 = np.asarray(jm.from_pretrained(path, dtype="bfloat16", param_dtype="float32")(ids))
    assert np.abs(bf16 - f32).max() < 0.1 * np.abs(f32).max()
