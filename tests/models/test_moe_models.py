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
