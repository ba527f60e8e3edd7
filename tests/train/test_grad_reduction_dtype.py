"""With bf16 compute and fp32 parameters, weight gradients are summed and reduced across devices in fp32
(veRL's FSDP mixed precision: reduce_dtype=float32), read from the programs XLA builds for 8 fake devices."""

import re

import pytest

import jsft.models as jm
from jsft.config import OptimConfig
from jsft.data.batch import largest_micro_batch
from jsft.models.config import ModelConfig
from jsft.models.params import param_arrays
from jsft.sharding import make_mesh
from jsft.train.optim import make_optimizer
from jsft.train.step import TrainStep

COLLECTIVE = re.compile(r"= (\(?[^=]*?\)?) (all-reduce|reduce-scatter)(-start)?\(")
DOT = re.compile(r"stablehlo\.dot_general .*-> tensor<[0-9x]*x?(\w+)>")
REDUCE_SUM = re.compile(r"stablehlo\.reduce\(.*applies stablehlo\.add across dimensions = \[[0-9, ]+\] : \(tensor<[0-9x]*x?(\w+)>")


@pytest.fixture(scope="module")
def grad_programs():
    """(lowered StableHLO, compiled HLO) of the grad micro-step of a tiny Qwen2 (biases, GQA), bf16 compute,
    over an 8-device FSDP mesh."""
    mesh = make_mesh({"fsdp": -1})
    cfg = ModelConfig.from_init(dict(
        model_type="qwen2", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    ))
    model = jm.init_model(cfg, dtype="bfloat16", param_dtype="float32", mesh=mesh, remat_policy="full",
                          attention_impl="xla")
    step = TrainStep(model, make_optimizer(OptimConfig(), 10), mesh, chunk_size=256)
    batch = step.device_batch(largest_micro_batch(8, 64))
    params = param_arrays(model)
    lowered = step.lower_grad(params, batch)
    return lowered.as_text(), lowered.compile().as_text()


def test_gradient_collectives_are_float32(grad_programs):
    _, compiled = grad_programs
    collectives = [(m.group(2), m.group(1)) for m in COLLECTIVE.finditer(compiled)]
    assert collectives, "an 8-device FSDP step must reduce gradients across devices"
    types = {t for _, shapes in collectives for t in re.findall(r"\b([a-z]+[0-9]+)\[", shapes)}
    assert types == {"f32"}, collectives


def test_gradient_partial_sums_are_float32(grad_programs):
    """The per-device partial sums feeding those collectives are matmuls (dense weights) and sums over
    tokens (norm scales, biases): every one accumulates into fp32 before the backend sees it, whatever the
    backend's own bf16 handling (XLA:CPU would upcast bf16 dots anyway; a GPU would not)."""
    lowered, _ = grad_programs
    dots = DOT.findall(lowered)
    assert dots and set(dots) == {"f32"}, sorted(set(dots))
    sums = REDUCE_SUM.findall(lowered)
    assert sums and "bf16" not in sums, sorted(set(sums))
