"""Gemma 3 (text, and the text stack of multimodal checkpoints) against transformers: logits with sliding and
full layers, per-type rope, packed rows; bit-exact export; greedy generation past the window."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

import jsft.models as jm
from jsft.models.config import FULL, SLIDING, ModelConfig
from jsft.sharding import make_mesh

from jsft_testing import GEMMA3_TINY, assert_greedy_matches_transformers, make_tiny_gemma3

TOL = 2e-4


def _ids(shape, vocab=GEMMA3_TINY["vocab_size"], seed=0):
    return np.random.RandomState(seed).randint(0, vocab - 4, shape).astype(np.int32)  # no image tokens


def _torch_logits(ref, ids):
    with torch.no_grad():
        return ref(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()


def _assert_round_trip(out, expected: dict):
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(back).__name__ == "Gemma3ForCausalLM"
    sd = back.state_dict()
    assert set(sd) == set(expected), set(sd) ^ set(expected)
    for name, tensor in expected.items():
        assert sd[name].dtype == tensor.dtype and torch.equal(sd[name], tensor), name


@pytest.mark.parametrize("overrides", [
    {},
    # transformers 4.x form: rope_theta / rope_local_base_freq, rope_scaling (yarn) on the full layers only
    {"rope_parameters": None, "rope_theta": 2e5, "rope_local_base_freq": 5e3,
     "rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16}},
], ids=["v5_rope", "v4_rope_yarn"])
def test_logits_match_transformers_and_export_round_trips(tmp_path, overrides):
    ref = make_tiny_gemma3(tmp_path / "hf", **overrides)
    cfg = ModelConfig.from_pretrained(str(tmp_path / "hf"))
    if "rope_scaling" in overrides:
        assert dict(cfg.rope_scaling)["rope_type"] == "yarn" and cfg.rope_theta == 2e5
        assert cfg.sliding_rope_scaling is None and cfg.sliding_rope_theta == 5e3
    assert [s.kind for s in cfg.layer_specs()] == [SLIDING, FULL, SLIDING, FULL]
    assert [s.window for s in cfg.layer_specs()] == [6, None, 6, None]
    ids = _ids((2, 40))  # rows much longer than the window
    model = jm.from_pretrained(tmp_path / "hf", dtype="float32", mesh=make_mesh({"fsdp": -1}))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), _torch_logits(ref, ids), atol=TOL, rtol=0)
    out = jm.save_pretrained(model, tmp_path / "export")
    _assert_round_trip(out, ref.state_dict())
    with safe_open(str(out / "model.safetensors"), "np") as f:
        assert "lm_head.weight" not in f.keys()  # tied


def test_packed_rows_restart_positions_and_window(tmp_path):
    """Three samples packed in one row (positions restarting, window inside each) give each sample's own logits."""
    ref = make_tiny_gemma3(tmp_path / "hf")
    model = jm.from_pretrained(tmp_path / "hf", dtype="float32")
    samples = [_ids((1, n), seed=n)[0] for n in (13, 20, 9)]
    ids = np.concatenate(samples + [np.zeros(6, np.int32)])[None]  # 6 padding slots (segment 0)
    segments = np.concatenate([np.full(len(s), i + 1) for i, s in enumerate(samples)] + [np.zeros(6)])[None]
    positions = np.concatenate([np.arange(len(s)) for s in samples] + [np.arange(6)])[None]
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(positions, jnp.int32), jnp.asarray(segments, jnp.int32)))
    start = 0
    for s in samples:
        np.testing.assert_allclose(got[0, start:start + len(s)], _torch_logits(ref, s[None])[0], atol=TOL, rtol=0)
        start += len(s)


def test_multimodal_checkpoint_loads_its_text_stack_and_exports_a_text_model(tmp_path, capsys):
    ref = make_tiny_gemma3(tmp_path / "mm", multimodal=True)
    assert json.loads((tmp_path / "mm" / "config.json").read_text())["model_type"] == "gemma3"
    model = jm.from_pretrained(tmp_path / "mm", dtype="float32")
    assert "vision tower is not loaded" in capsys.readouterr().out
    assert model.config.model_type == "gemma3_text" and model.config.text_of == "gemma3"
    ids = _ids((2, 24))
    # Gemma3ForConditionalGeneration runs no final softcap: compare the uncapped logits
    hidden = model.hidden_states(jnp.asarray(ids))
    raw = np.asarray(jnp.einsum("BTD,DV->BTV", hidden, model.unembed()))
    np.testing.assert_allclose(raw, _torch_logits(ref, ids), atol=TOL, rtol=0)
    out = jm.save_pretrained(model, tmp_path / "export")
    assert "Gemma3ForCausalLM text model" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["architectures"] == ["Gemma3ForCausalLM"]
    text = {"model." + k: v for k, v in ref.model.language_model.state_dict().items()}
    _assert_round_trip(out, {**text, "lm_head.weight": ref.lm_head.weight})


def test_greedy_generation_past_the_window_matches_transformers(tmp_path):
    ref = make_tiny_gemma3(tmp_path / "hf", sliding_window=4, final_logit_softcapping=None)
    with torch.no_grad():  # peaked attention, so a wrongly masked cache slot changes the tokens
        for layer in ref.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
    ref.save_pretrained(tmp_path / "hf")
    model = jm.from_pretrained(tmp_path / "hf", dtype="float32")
    assert_greedy_matches_transformers(model, ref, max_new_tokens=12)


def test_lora_adapter_matches_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from jsft.models import lora

    ref = make_tiny_gemma3(tmp_path / "hf")
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(ref, peft.LoraConfig(init_lora_weights=False, r=4, lora_alpha=8,
                                                          target_modules="all-linear"))
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = _ids((2, 32))
    model = lora.attach(jm.from_pretrained(tmp_path / "hf", dtype="float32"),
                        lora.read_adapter_config(tmp_path / "adapter"), adapter_path=tmp_path / "adapter")
    expected = _torch_logits(peft_model, ids)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), expected, atol=TOL, rtol=0)
    with peft_model.disable_adapter():
        assert np.abs(_torch_logits(peft_model, ids) - expected).max() > 1e-2  # the adapters act


def test_attention_sinks_are_a_per_layer_parameter_that_reaches_the_softmax(tmp_path):
    """A model with `attention_sinks` carries layers/sinks [L, N] (HF self_attn.sinks): sinks far below every
    score give the sink-free model's logits; a finite sink in one layer takes probability mass away."""
    from jsft.models.hf_io import key_table
    from jsft.models.params import param_arrays, replace_params

    make_tiny_gemma3(tmp_path / "hf")
    base = jm.from_pretrained(tmp_path / "hf", dtype="float32")
    cfg = base.config.replace(attention_sinks=True)
    assert "model.layers.{i}.self_attn.sinks" in {k.hf for k in key_table(cfg)}
    template = jm.init_model(cfg)
    params = {**param_arrays(base), "layers/sinks": jnp.full((cfg.num_layers, cfg.num_heads), -1e4)}
    ids = jnp.asarray(_ids((1, 20)))
    expected = np.asarray(base(ids))
    np.testing.assert_allclose(np.asarray(replace_params(template, params)(ids)), expected, atol=1e-5, rtol=0)
    params["layers/sinks"] = params["layers/sinks"].at[1].set(0.5)
    assert np.abs(np.asarray(replace_params(template, params)(ids)) - expected).max() > 1e-3
