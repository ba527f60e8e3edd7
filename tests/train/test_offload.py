"""optim.offload_state: the optimizer state lives in pinned host memory between updates, the updates are
bit-identical to device-resident state, checkpoints restore across the two, and the plan counts it."""

import jax
import numpy as np
import pytest

import jsft.models as jm
from jsft.config import OptimConfig, load_config
from jsft.data.batch import WeightedRows, shaped
from jsft.models.params import param_arrays
from jsft.plan import Plan
from jsft.sharding import make_mesh
from jsft.train.loop import train
from jsft.train.optim import make_optimizer
from jsft.train.step import HOST_MEMORY, TrainStep, check_memory_kind

from jsft_testing import losses, sft_overrides


def _micro_batch(seed, rows=8, length=32, vocab=100):
    rng = np.random.default_rng(seed)
    weights = np.zeros((rows, length), np.float32)
    weights[:, length // 2 :] = 1.0 / (rows * length / 2)
    return shaped(WeightedRows(
        input_ids=rng.integers(0, vocab, (rows, length)).astype(np.int32),
        segment_ids=np.ones((rows, length), np.int32),
        positions=np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
        loss_weight=weights,
    ), length, length // 2)


def _three_steps(path, offload):
    mesh = make_mesh({"fsdp": -1})
    model = jm.from_pretrained(path, dtype="float32", mesh=mesh)
    step = TrainStep(model, make_optimizer(OptimConfig(lr=1e-3), 10), mesh, chunk_size=64, offload_opt_state=offload)
    params = param_arrays(model)
    opt_state = step.init_opt_state(params)
    for seed in range(3):
        params, opt_state, loss, _ = step.train_step_stats(params, opt_state, [step.device_batch(_micro_batch(seed))])
    return params, opt_state, float(loss)


def test_offloaded_state_lives_on_host_and_updates_are_identical(tiny_hf):
    path, _ = tiny_hf("qwen2")
    params, opt_state, loss = _three_steps(path, offload=False)
    params_off, opt_off, loss_off = _three_steps(path, offload=True)
    assert {x.sharding.memory_kind for x in jax.tree.leaves(opt_off)} == {HOST_MEMORY}
    assert {x.sharding.memory_kind for x in jax.tree.leaves(params_off)} == {"device"}
    assert loss_off == loss
    for name in params:
        np.testing.assert_array_equal(np.asarray(params_off[name]), np.asarray(params[name]), err_msg=name)
    for a, b in zip(jax.tree.leaves(opt_off), jax.tree.leaves(opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_from_a_device_state_checkpoint_into_an_offloaded_run(sft_setup, tmp_path):
    common = {"trainer.total_training_steps": 4, "trainer.save_freq": 2}
    reference = tmp_path / "reference"
    train(load_config(None, sft_overrides(sft_setup, reference, **common)))
    offloaded = tmp_path / "offloaded"
    train(load_config(None, sft_overrides(sft_setup, offloaded, **common, **{
        "optim.offload_state": True, "trainer.resume_mode": "resume_path",
        "trainer.resume_from_path": str(reference / "checkpoints" / "2")})))
    assert losses(offloaded) == {s: v for s, v in losses(reference).items() if s > 2}


def test_unavailable_memory_kind_fails_early_naming_the_kinds():
    with pytest.raises(ValueError, match="offers .*device"):
        check_memory_kind(make_mesh({"fsdp": -1}), "no_such_memory")


def test_plan_peak_keeps_offloaded_state_off_the_device_during_micro_steps():
    sizes = dict(params=10, opt_state=20, grad_accumulator=10, batch=1, step_temp=50, update_temp=5)
    assert Plan(**sizes).peak == 10 + 10 + 20 + 51
    assert Plan(**sizes, opt_offloaded=True).peak == 10 + 10 + 51  # the update (20 + 5) fits under it
    assert Plan(**{**sizes, "step_temp": 1}, opt_offloaded=True).peak == 10 + 10 + 25
