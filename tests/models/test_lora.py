"""LoRA adapters against peft: the forward, PEFT's init, adapter directories in and out, the merge, bad adapters."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

peft = pytest.importorskip("peft")

import jsft.models as jm  # noqa: E402
from jsft.models import lora  # noqa: E402
from jsft.models.params import param_arrays, replace_params  # noqa: E402
from jsft.sharding import make_mesh  # noqa: E402


def _ids(shape, vocab=512, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


def _peft_adapter(ref, out, *, seed=0, **lora_kwargs):
    """A PEFT adapter on `ref` with random A and B (init_lora_weights=False), saved to `out`."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(ref, peft.LoraConfig(init_lora_weights=False, **lora_kwargs))
    model.save_pretrained(out)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("kind,targets,rslora,extra", [
    ("qwen2", "all-linear", False, {}),
    ("llama3", ["q_proj", "v_proj", "o_proj", "down_proj"], True, {"tie_word_embeddings": True}),
], ids=["qwen2-all-linear", "llama3-tied-rslora-subset"])
def test_forward_matches_peft(tiny_hf, tmp_path, kind, targets, rslora, extra):
    path, ref = tiny_hf(kind, **extra)
    peft_model = _peft_adapter(ref, tmp_path / "adapter", r=4, lora_alpha=12, target_modules=targets, use_rslora=rslora)
    ids = _ids((2, 40))
    # reference in float64: torch's own fp32 forward is ~1e-5 away from it here, jsft's ~4e-6
    expected = _logits(peft_model.double(), ids)
    mesh = make_mesh({"fsdp": -1})
    spec = lora.read_adapter_config(tmp_path / "adapter")
    assert spec.scale == pytest.approx(12 / (2.0 if rslora else 4.0))
    assert set(spec.targets) == (set(lora.TARGET_MODULES) if targets == "all-linear" else set(targets))
    model = lora.attach(jm.from_pretrained(path, dtype="float32", mesh=mesh), spec, mesh=mesh,
                        adapter_path=tmp_path / "adapter")
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), expected, atol=1e-5, rtol=0)
    # the adapters change the output: the comparison above is not base against base
    with peft_model.disable_adapter():
        assert np.abs(_logits(peft_model, ids) - expected).max() > 1e-2


def test_fresh_adapters_init_as_peft_and_shard_like_the_base(tiny_hf):
    path, _ = tiny_hf("qwen2")
    mesh = make_mesh({"fsdp": -1})
    base = jm.from_pretrained(path, dtype="float32", mesh=mesh)
    spec = lora.LoraSpec(rank=16, alpha=32, targets=lora.TARGET_MODULES)
    model = lora.attach(base, spec, mesh=mesh, seed=3)
    params = param_arrays(model)
    for name in spec.targets:
        a, b = np.asarray(params[f"lora_a/{name}"]), np.asarray(params[f"lora_b/{name}"])
        fan_in = np.prod(a.shape[1:-1])
        assert np.all(b == 0), name  # B zeros: training starts at the base model
        bound = 1 / np.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5))
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound and abs(a.mean()) < 0.1 * bound, name
    ids = jnp.asarray(_ids((1, 16)))
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(base(ids)))
    P = jax.sharding.PartitionSpec
    assert params["lora_a/q_proj"].sharding.spec == P(None, "fsdp", None)  # `in` (embed) like the base, r replicated
    assert params["lora_b/gate_proj"].sharding.spec == P(None, None, "fsdp")  # `out` (mlp)
    assert params["lora_a/down_proj"].sharding.spec == P(None, "fsdp", None)  # mlp
    assert params["lora_b/down_proj"].sharding.spec == P(None, None, "fsdp")  # embed
    assert lora.trainable_names(model) == sorted(n for n in params if lora.is_adapter(n))
    assert sum(params[n].size for n in lora.trainable_names(model)) == sum(int(np.prod(k.hf_shape)) for k in lora.adapter_keys(model.config, spec)) * model.config.num_layers


def _random_adapters(model, seed=0):
    """`model` with non-zero random adapters (B too), so exports carry a real update."""
    rng = np.random.default_rng(seed)
    params = param_arrays(model)
    for n in lora.trainable_names(model):
        params[n] = jax.device_put(rng.normal(0, 0.05, params[n].shape).astype(np.float32), params[n].sharding)
    return replace_params(model, params)


def test_exports_load_in_peft_and_transformers_and_merge_like_peft(tiny_hf, tmp_path):
    path, _ = tiny_hf("qwen2")
    mesh = make_mesh({"data": 2, "fsdp": 4})
    spec = lora.LoraSpec(rank=8, alpha=16, targets=("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"))
    model = _random_adapters(lora.attach(jm.from_pretrained(path, dtype="float32", mesh=mesh), spec, mesh=mesh))
    ids = _ids((2, 33))
    ours = np.asarray(model(jnp.asarray(ids)))

    adapter = lora.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(path))
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["r"] == 8 and conf["lora_alpha"] == 16 and conf["peft_type"] == "LORA"
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, adapter)
    np.testing.assert_allclose(_logits(peft_model, ids), ours, atol=1e-4, rtol=0)

    merged_dir = jm.save_pretrained(lora.merge(model), tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    np.testing.assert_allclose(_logits(merged, ids), ours, atol=1e-4, rtol=0)
    # PEFT's own merge of the exported adapter is the merged export
    unloaded = peft_model.merge_and_unload().state_dict()
    for name, value in merged.state_dict().items():
        np.testing.assert_allclose(unloaded[name].numpy(), value.numpy(), atol=1e-6, rtol=1e-6, err_msg=name)

    # and the adapter reads back into jsft unchanged
    again = lora.attach(jm.from_pretrained(path, dtype="float32", mesh=mesh), lora.read_adapter_config(adapter),
                        mesh=mesh, adapter_path=adapter)
    for n in lora.trainable_names(model):
        np.testing.assert_array_equal(np.asarray(param_arrays(again)[n]), np.asarray(param_arrays(model)[n]), err_msg=n)


def test_bf16_frozen_base_merges_in_float32(tiny_hf):
    path, _ = tiny_hf("qwen3")
    spec = lora.LoraSpec(rank=4, alpha=8, targets=("q_proj", "up_proj"))
    model = _random_adapters(lora.attach(jm.from_pretrained(path, dtype="float32", param_dtype="bfloat16"), spec))
    params = param_arrays(model)
    assert params["layers/q_proj"].dtype == jnp.bfloat16 and params["lora_a/q_proj"].dtype == jnp.float32
    merged = lora.merge(model)
    assert merged.param_dtype == jnp.float32 and merged.lora is None
    ids = jnp.asarray(_ids((1, 20)))
    np.testing.assert_allclose(np.asarray(merged(ids)), np.asarray(model(ids)), atol=1e-4, rtol=0)


def test_adapters_that_do_not_fit_fail_with_a_message(tiny_hf, tmp_path):
    path, ref = tiny_hf("qwen2")
    _, other = tiny_hf("llama3", hidden_size=64)
    _peft_adapter(other, tmp_path / "other", r=4, lora_alpha=8, target_modules=["q_proj"])
    cfg = jm.ModelConfig.from_pretrained(str(path))
    with pytest.raises(ValueError, match="trained for another base model"):
        lora.check_adapter(tmp_path / "other", cfg, lora.read_adapter_config(tmp_path / "other"))
    _peft_adapter(ref, tmp_path / "dora", r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        lora.read_adapter_config(tmp_path / "dora")
    with pytest.raises(ValueError, match="unknown module.*'qproj'.*allowed: all-linear"):
        lora.resolve_targets(["qproj"])
    with pytest.raises(ValueError, match="names no module"):
        lora.resolve_targets([])
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        lora.read_adapter_config(tmp_path)


def test_generation_applies_the_adapters(tiny_hf):
    """The KV-cache sampler (validation episodes) runs the adapted model: greedy tokens equal the merged
    model's and differ from the base's."""
    from jsft.generate import Generator, generate

    path, _ = tiny_hf("qwen2")
    mesh = make_mesh({"fsdp": -1})
    base = jm.from_pretrained(path, dtype="float32", mesh=mesh)
    spec = lora.LoraSpec(rank=8, alpha=32, targets=lora.TARGET_MODULES)
    model = _random_adapters(lora.attach(base, spec, mesh=mesh), seed=1)
    prompts = [[5, 17, 99, 3], [42, 7]]
    kw = dict(max_new_tokens=12, eos_ids=[511])
    adapted = generate(model, prompts, **kw)
    assert adapted == generate(lora.merge(model), prompts, **kw)
    assert adapted != generate(base, prompts, **kw)
    # as the trainer calls it: the template's structure with the flat parameters of a step
    assert Generator(model, **kw)(param_arrays(model), prompts) == adapted
