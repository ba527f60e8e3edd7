"""gpt-oss in the decoder against transformers' GptOssForCausalLM: logits (sinks, q/k/v/o biases, alternating
sliding/full layers, yarn rope, the biased router and clamped SwiGLU experts), the bit-exact export, an MXFP4
checkpoint dequantized on import and exported unquantized, greedy generation, refusals and parameter counts."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

import jsft.models as jm
from jsft.models.config import FULL, SLIDING, ModelConfig
from jsft.sharding import make_mesh

from jsft_testing import GPT_OSS_TINY, assert_greedy_matches_transformers, make_tiny_gpt_oss

TOL = 2e-4
VOCAB = GPT_OSS_TINY["vocab_size"]


def _load_hf(path, **kwargs):
    # sinks: transformers runs them in its eager attention
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", **kwargs).eval()


def _logits(ref, ids):
    with torch.no_grad():
        return ref(input_ids=torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module")
def oss(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt_oss") / "hf"
    make_tiny_gpt_oss(path)
    return path, _load_hf(path)


def test_logits_match_transformers_and_export_round_trips(oss, tmp_path):
    path, ref = oss
    cfg = ModelConfig.from_pretrained(str(path))
    assert [s.window for s in cfg.layer_specs()] == [6, None, 6, None]
    assert {s.rope_scaling for s in cfg.layer_specs()} == {cfg.rope_scaling}  # one yarn rope for both kinds
    assert cfg.attention_sinks and cfg.qkv_bias and cfg.o_bias and not cfg.qk_norm
    ids = np.random.RandomState(0).randint(0, VOCAB, (2, 40)).astype(np.int32)  # rows much longer than the window
    model = jm.from_pretrained(path, dtype="float32", mesh=make_mesh({"fsdp": -1}))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), _logits(ref, ids), atol=TOL, rtol=0)

    out = jm.save_pretrained(model, tmp_path / "export")
    back = _load_hf(out)
    assert type(back).__name__ == "GptOssForCausalLM"
    sd_ref, sd_back = ref.state_dict(), back.state_dict()
    assert sd_ref.keys() == sd_back.keys()
    for name in sd_ref:
        assert sd_back[name].dtype == sd_ref[name].dtype and torch.equal(sd_ref[name], sd_back[name]), name
    for field in ("layer_types", "sliding_window", "rope_parameters", "swiglu_limit", "swiglu_alpha",
                  "num_local_experts", "num_experts_per_tok", "attention_bias", "head_dim"):
        assert getattr(back.config, field) == getattr(ref.config, field), field
    written = json.loads((out / "config.json").read_text())
    assert written["rope_scaling"]["rope_type"] == "yarn" and written["rope_theta"] == 150000.0  # 4.x readers


def _write_mxfp4(src, dst, seed=0) -> dict:
    """The tiny checkpoint as the released gpt-oss ones store it: experts as MXFP4 blocks/scales (random uint8),
    everything else bf16, quantization_config {quant_method: mxfp4}. Returns the torch state dict written."""
    ref = make_tiny_gpt_oss(src)
    sd = {k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()}
    rs = np.random.RandomState(seed)
    e, d, f = GPT_OSS_TINY["num_local_experts"], GPT_OSS_TINY["hidden_size"], GPT_OSS_TINY["intermediate_size"]
    for i in range(GPT_OSS_TINY["num_hidden_layers"]):
        for name, out, inner in (("gate_up_proj", 2 * f, d), ("down_proj", d, f)):
            x = f"model.layers.{i}.mlp.experts.{name}"
            del sd[x]
            sd[x + "_blocks"] = torch.tensor(rs.randint(0, 256, (e, out, inner // 32, 16)).astype(np.uint8))
            sd[x + "_scales"] = torch.tensor(rs.randint(119, 125, (e, out, inner // 32)).astype(np.uint8))
    dst.mkdir()
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    rope = config.pop("rope_parameters")  # the released config.json's 4.x form: rope_theta + rope_scaling
    config.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope)
    config.update(dtype="bfloat16", quantization_config={
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                   "lm_head"]})
    (dst / "config.json").write_text(json.dumps(config))
    return sd


def test_mxfp4_checkpoint_is_dequantized_on_import_and_exported_unquantized(tmp_path, capsys):
    sd = _write_mxfp4(tmp_path / "src", tmp_path / "mxfp4")
    cfg = ModelConfig.from_pretrained(str(tmp_path / "mxfp4"))
    assert cfg.quantization == "mxfp4" and cfg.rope_theta == 150000.0 and dict(cfg.rope_scaling)["factor"] == 32.0
    # fsdp splits the hidden dim: a device's slice of gate_up_proj's input axis is a part of one 32-value block
    model = jm.from_pretrained(tmp_path / "mxfp4", dtype="float32", mesh=make_mesh({"fsdp": -1}))
    assert "experts stored as mxfp4: dequantized to float32 on import" in capsys.readouterr().out
    params = {k: np.asarray(v[...]) for k, v in jm.flat_params(model).items()}
    for i in range(GPT_OSS_TINY["num_hidden_layers"]):
        x = f"model.layers.{i}.mlp.experts."
        gate_up, down = (convert_moe_packed_tensors(sd[x + n + "_blocks"], sd[x + n + "_scales"], dtype=torch.float32)
                         .numpy() for n in ("gate_up_proj", "down_proj"))
        np.testing.assert_array_equal(params["layers/moe_gate_up_proj"][i, :, :, 0], gate_up[..., ::2])
        np.testing.assert_array_equal(params["layers/moe_gate_up_proj"][i, :, :, 1], gate_up[..., 1::2])
        np.testing.assert_array_equal(params["layers/moe_down_proj"][i], down)
    # transformers dequantizes the same checkpoint on CPU: the same logits
    ref = _load_hf(tmp_path / "mxfp4", quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32)
    ids = np.random.RandomState(1).randint(0, VOCAB, (2, 24)).astype(np.int32)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), _logits(ref, ids), atol=TOL, rtol=0)

    out = jm.save_pretrained(model, tmp_path / "export")  # the checkpoint's dtype: bf16, unquantized
    assert "exporting them unquantized in bfloat16" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert not any(n.endswith(("_blocks", "_scales")) for n in names)
        assert f.get_tensor("model.layers.0.mlp.experts.gate_up_proj").dtype == torch.bfloat16
    back = _load_hf(out)
    assert back.config.quantization_config is None if hasattr(back.config, "quantization_config") else True
    sd_back = back.state_dict()
    for name, tensor in sd_back.items():
        if name.endswith(("gate_up_proj", "down_proj")):  # the dequantized experts, exactly (fp4 x 2^k fits bf16)
            expected = convert_moe_packed_tensors(sd[name + "_blocks"], sd[name + "_scales"], dtype=torch.bfloat16)
        else:
            expected = sd[name]
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, expected), name


def test_greedy_generation_matches_transformers(oss):
    """The KV-cache sampler past the sliding window, prompts of different lengths (left padding)."""
    path, ref = oss
    model = jm.from_pretrained(path, dtype="float32")
    assert_greedy_matches_transformers(model, ref, max_new_tokens=8)


def test_parameter_counts_match_transformers(oss):
    """Total parameters (biases and sinks included) equal the torch model's; active ones drop the experts a token
    does not run."""
    _, ref = oss
    cfg = ModelConfig.from_hf(ref.config)
    assert cfg.num_params() == sum(p.numel() for p in ref.parameters())
    experts = ref.model.layers[0].mlp.experts
    per_expert = sum(getattr(experts, n)[0].numel() for n in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"))
    unused = GPT_OSS_TINY["num_local_experts"] - GPT_OSS_TINY["num_experts_per_tok"]
    assert cfg.num_params(active=True) == cfg.num_params() - GPT_OSS_TINY["num_hidden_layers"] * unused * per_expert
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg.replace(torch_dtype=None)  # export writes the dtype


@pytest.mark.parametrize("overrides,message", [
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, r"gpt_oss: quantization_config.quant_method='gptq'"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported \(only silu for gpt_oss\)"),
    ({"attention_dropout": 0.1}, r"gpt_oss attention_dropout=0.1"),
    ({"swiglu_limit": 0.0}, r"gpt_oss swiglu_limit=0.0 is not supported"),
    ({"layer_types": [SLIDING, FULL, "chunked_attention", FULL]}, r"gpt_oss: layer_types must list"),
])
def test_configs_jsft_cannot_run_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(transformers.GptOssConfig(**{**GPT_OSS_TINY, **overrides}))


def test_quantized_checkpoints_of_other_families_are_refused():
    config = transformers.LlamaConfig(quantization_config={"quant_method": "mxfp4"})
    with pytest.raises(ValueError, match=r"llama: quantization_config.quant_method='mxfp4' is not supported"):
        ModelConfig.from_hf(config)


def test_a_training_checkpoint_exports_through_jsft_export(oss, tmp_path):
    """A run's checkpoint keeps the model config as JSON; `python -m jsft.export` rebuilds the model from it (MoE
    spec, layer kinds, rope) and writes the HF checkpoint transformers loads back exactly."""
    from jsft.export import main
    from jsft.models.params import flat_params
    from jsft.train import checkpoint as ckpt

    path, ref = oss
    model = jm.from_pretrained(path, dtype="float32")
    restored = ckpt.model_config_from_json(json.loads(json.dumps(ckpt.model_config_to_json(model.config))))
    assert restored == model.config and hash(restored) == hash(model.config)
    manager = ckpt.open_manager(tmp_path / "ckpts")
    meta = {"step": 2, "model_config": ckpt.model_config_to_json(model.config), "param_dtype": "float32"}
    ckpt.save(manager, 2, params={name: var[...] for name, var in flat_params(model).items()}, meta=meta)
    manager.wait_until_finished()
    manager.close()
    assert main(["--checkpoint", str(tmp_path / "ckpts" / "2"), "--out", str(tmp_path / "hf")]) == 0
    sd = _load_hf(tmp_path / "hf").state_dict()
    for name, value in ref.state_dict().items():
        assert torch.equal(value, sd[name]), name


def test_presets_have_the_released_parameter_counts():
    """openai/gpt-oss-20b and -120b: 20.91B and 116.83B parameters (model card); 3.61B and 5.13B active
    without the input embedding (jsft's active count includes it; flops_per_token's matmuls leave it out)."""
    from jsft.train.planner import PRESETS

    for name, total, active in (("gpt-oss-20b", 20.91, 3.61), ("gpt-oss-120b", 116.83, 5.13)):
        cfg = ModelConfig.from_init(PRESETS[name])
        embed = cfg.vocab_size * cfg.hidden_size
        assert round(cfg.num_params() / 1e9, 2) == total, name
        assert round((cfg.num_params(active=True) - embed) / 1e9, 2) == active, name
