"""Expert parallelism composed with the other mesh axes, on 8 fake CPU devices: a Qwen3-MoE's loss and every
gradient of a packed batch are those of plain FSDP (E=1, S=1) with experts split over `expert` and each row's
tokens over `sequence` (E=2, S=2) beside HSDP replicas (data=2), also for LoRA adapters on the attention
projections (the experts frozen), and generation runs on such a mesh."""

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from jsft.config import OptimConfig
from jsft.generate import generate
from jsft.models.config import ModelConfig
from jsft.models.lora import LoraSpec, attach
from jsft.models.params import init_model, param_arrays, replace_params
from jsft.sharding import make_mesh, param_spec
from jsft.train.planner import PRESETS
from jsft.train.setup import auto_expert_size
from jsft.train.optim import make_optimizer
from jsft.train.step import TrainStep

from test_sequence_parallel import T, _assert_same, _micro_batch, _rows

FSDP = {"data": 1, "fsdp": 8}


def _config():
    """4 experts, top-2, a dense layer among the MoE ones; 4 query / 2 KV heads (Ulysses at S=2)."""
    return ModelConfig.from_init(dict(
        model_type="qwen3_moe", vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
        num_experts_per_tok=2, mlp_only_layers=[1], max_position_embeddings=4 * T,
    ))


def _loss_and_grads(cfg, axes, lora=None):
    mesh = make_mesh(axes, devices=jax.devices()[:8])
    model = init_model(cfg, seed=0, mesh=mesh, remat_policy="full")
    if lora is not None:
        model = attach(model, lora, mesh=mesh, seed=1)
        # b starts at zero (PEFT's init): move it so the adapters change the loss and a's gradients are not 0
        model = _perturb_lora_b(model, mesh)
    step = TrainStep(model, make_optimizer(OptimConfig(), 10), mesh, chunk_size=32)
    mb = _micro_batch(_rows(np.random.default_rng(0)), mesh.shape["sequence"])
    loss, grads = step.gradients(param_arrays(model), [step.device_batch(mb)])
    return float(loss), {k: np.asarray(v, np.float32) for k, v in grads.items()}


def _perturb_lora_b(model, mesh):
    values = param_arrays(model)
    rs = np.random.RandomState(2)
    for name, v in values.items():
        if name.startswith("lora_b/"):
            values[name] = jax.device_put(rs.randn(*v.shape).astype(np.float32) * 0.05, v.sharding)
    return replace_params(model, values)


# every axis at once: HSDP replicas (data), each row's tokens over sequence, the experts over expert
COMPOSED = {"data": 2, "fsdp": 1, "sequence": 2, "expert": 2}


def test_expert_axis_composes_with_sequence_parallelism_and_hsdp():
    cfg = _config()
    _assert_same(_loss_and_grads(cfg, FSDP), _loss_and_grads(cfg, COMPOSED), 1e-5)


def test_lora_on_attention_of_a_mixture_of_experts_under_expert_parallelism():
    cfg = _config()
    spec = LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    ref = _loss_and_grads(cfg, FSDP, spec)
    assert sorted(ref[1]) == sorted(f"lora_{ab}/{p}" for ab in "ab" for p in spec.targets)  # experts frozen
    assert all(np.abs(g).max() > 0 for g in ref[1].values())
    _assert_same(ref, _loss_and_grads(cfg, COMPOSED, spec), 1e-5)


def test_generation_on_an_expert_and_sequence_mesh():
    """Validation by generation runs on the training mesh: prompts that do not split over the batch axes and
    single-token decode steps (T=1 on a sequence axis) fall back to the one-device MoE layer."""
    cfg = _config()
    prompts = [[5, 6, 7, 8, 9], list(range(20, 37)), [50, 3, 4]]
    ref = generate(init_model(cfg, seed=0), prompts, max_new_tokens=4, eos_ids={0})
    mesh = make_mesh({"fsdp": 2, "sequence": 2, "expert": 2}, devices=jax.devices()[:8])
    with jax.set_mesh(mesh):
        assert generate(init_model(cfg, seed=0, mesh=mesh), prompts, max_new_tokens=4, eos_ids={0}) == ref


def test_auto_expert_size_and_the_weights_each_axis_splits():
    """mesh=auto's E: the largest <= 8 dividing the experts and a process's devices (a host's expert group);
    1 for a dense model. Dense weights split over fsdp x expert, expert weights by expert then fsdp."""
    moe = ModelConfig.from_init(PRESETS["qwen3-30b-a3b"])
    assert auto_expert_size(moe, 16, 8)[0] == 8  # 2 hosts of 8 GPUs: one host per expert group
    assert auto_expert_size(moe, 16, 16)[0] == 8  # capped at MAX_AUTO_EXPERT
    assert auto_expert_size(moe, 8, 4)[0] == 4 and auto_expert_size(moe, 8, 1)[0] == 1
    assert auto_expert_size(_config(), 8, 8)[0] == 4  # 4 experts
    e, why = auto_expert_size(moe, 16, 8)
    assert "dividing the 128 experts and the 8 devices of a process" in why and "95% of the parameters" in why
    assert auto_expert_size(ModelConfig.from_init(PRESETS["qwen2.5-0.5b"]), 8, 8) == (1, "")
    sizes = {"data": 1, "fsdp": 2, "sequence": 1, "expert": 4}
    assert param_spec(("vocab", "embed"), (151936, 2048), sizes) == P(None, ("fsdp", "expert"))
    assert param_spec(("experts", "embed", None, "mlp"), (128, 2048, 2, 768), sizes) == P("expert", "fsdp", None, None)
