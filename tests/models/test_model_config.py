"""Unsupported checkpoints fail early and clearly; configs round-trip through transformers."""

import pytest
import transformers

import jsft.models as jm
from jsft.models.config import ModelConfig

from jsft_testing import TINY


def test_unknown_model_type_is_refused():
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        ModelConfig.from_hf(transformers.GPT2Config())


def test_active_sliding_window_is_refused():
    cfg = transformers.Qwen2Config(**TINY, use_sliding_window=True, sliding_window=64, max_window_layers=0)
    with pytest.raises(ValueError, match="sliding-window"):
        ModelConfig.from_hf(cfg)
    with pytest.raises(ValueError, match="sliding-window"):
        ModelConfig.from_hf(transformers.MistralConfig(**TINY, sliding_window=64))


def test_an_inactive_sliding_window_loads_as_full_attention(tiny_hf):
    """use_sliding_window=False with a window shorter than the input: transformers attends to every earlier
    token, and so must jsft (logits over 40 tokens with a window of 8)."""
    import jax.numpy as jnp
    import numpy as np
    import torch

    path, ref = tiny_hf("qwen2", use_sliding_window=False, sliding_window=8)
    ids = np.random.RandomState(0).randint(0, TINY["vocab_size"], (1, 40))
    with torch.no_grad():
        expected = ref(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    model = jm.from_pretrained(path, dtype="float32")
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("rope", [{"rope_type": "longrope", "factor": 4.0, "rope_theta": 1e4, "short_factor": [1.0],
                                   "long_factor": [1.0]}, {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}])
def test_unknown_rope_type_is_refused(rope):
    with pytest.raises(ValueError, match="rope type"):
        ModelConfig.from_hf(transformers.LlamaConfig(**TINY, rope_parameters=rope))


def test_mlp_bias_and_activation_are_checked():
    with pytest.raises(ValueError, match="mlp_bias"):
        ModelConfig.from_hf(transformers.LlamaConfig(**TINY, mlp_bias=True))
    with pytest.raises(ValueError, match="hidden_act"):
        ModelConfig.from_hf(transformers.LlamaConfig(**TINY, hidden_act="gelu"))


def test_pickle_checkpoints_are_refused(tmp_path):
    transformers.Qwen2Config(**TINY).save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="safetensors only"):
        jm.from_pretrained(tmp_path)


def test_mismatched_tensors_are_named(tiny_hf, tmp_path):
    path, _ = tiny_hf("qwen2")
    # the qwen2 weights under a llama config: the q/k/v biases are unexpected
    cfg = transformers.AutoConfig.from_pretrained(path).to_dict()
    cfg["model_type"] = "llama"
    import json

    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unexpected.*bias"):
        jm.from_pretrained(path)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama3", "mistral"])
def test_config_round_trips(tiny_hf, kind):
    path, _ = tiny_hf(kind)
    cfg = ModelConfig.from_pretrained(str(path))
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg.replace(torch_dtype=None)
