"""The micro-step keeps activations split over the batch devices (FSDP shards parameters, not rows)."""

import jax

import jsft.models as jm
from jsft.data.batch import largest_micro_batch
from jsft.models.params import param_arrays
from jsft.sharding import make_mesh
from jsft.config import OptimConfig
from jsft.train.optim import make_optimizer
from jsft.train.step import TrainStep


def _temp_bytes(path, devices):
    mesh = make_mesh({"fsdp": -1}, devices=jax.devices()[:devices])
    model = jm.from_pretrained(path, dtype="float32", mesh=mesh)
    step = TrainStep(model, make_optimizer(OptimConfig(), 10), mesh, chunk_size=512)
    batch = step.device_batch(largest_micro_batch(8, 256))
    params = param_arrays(model)
    return step.memory_analysis(params, step.init_opt_state(params), batch)["temp_bytes"]


def test_activations_are_split_over_devices(tiny_hf):
    path, _ = tiny_hf("qwen2")
    one, eight = _temp_bytes(path, 1), _temp_bytes(path, 8)
    assert eight < one / 4, (one, eight)  # replicated activations would keep it near `one`
