"""A mixture of experts' router losses and capacity-bounded dispatch in training (tiny Qwen3-MoE, 8 devices):
the load-balancing loss follows transformers' own training loss, the z-loss an independent computation and
is exact over micro-batch splits, capacity drops are counted and logged, and a dense model refuses the keys."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers

import jsft.models as jm
from jsft.config import load_config
from jsft.data.batch import BatchSpec, prepare_step
from jsft.data.pipeline import build_train_batches
from jsft.data.tokenizer import load_tokenizer
from jsft.models.config import ModelConfig
from jsft.models.params import param_arrays
from jsft.plot import panels, read_series
from jsft.sharding import make_mesh
from jsft.train.loop import train
from jsft.train.loss import MoeObjective
from jsft.train.optim import make_optimizer
from jsft.train.step import TrainStep

from jsft_testing import make_tiny_hf, sft_overrides, step_sample_order, tokenized_samples, torch_sft_losses

AUX_COEF = 0.1
STEPS = 3
# 8 samples a step on 8 devices, one row each at most: ONE micro-batch per step, so the load-balancing loss
# is defined on the same tokens as transformers' (the whole batch); one compiled shape
ONE_MICRO_BATCH = {"data.train_batch_size": 8, "optim.lr": 2e-3, "optim.lr_scheduler_type": "constant",
                   "optim.weight_decay": 0.0, "trainer.shape_buckets": 1}


@pytest.fixture(scope="module")
def moe_aux_setup(sft_setup, tmp_path_factory):
    """A tiny Qwen3-MoE (2 layers, the second dense) whose config asks transformers for the aux loss."""
    path = tmp_path_factory.mktemp("moe_aux") / "qwen3_moe"
    make_tiny_hf(path, "qwen3_moe", vocab_size=768, mlp_only_layers=[1], output_router_logits=True,
                 router_aux_loss_coef=AUX_COEF)
    return {**sft_setup, "model": str(path)}


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def test_load_balancing_loss_follows_transformers_training(moe_aux_setup, tmp_path, capsys):
    cfg = load_config(None, sft_overrides(moe_aux_setup, tmp_path / "run", **ONE_MICRO_BATCH,
                                          **{"trainer.total_training_steps": STEPS}))
    assert cfg.model.router_aux_loss_coef is None  # unset: applied as transformers applies the checkpoint's
    train(cfg)
    assert f"loss = cross-entropy + {AUX_COEF:g} x load-balancing loss" in capsys.readouterr().out
    metrics = _metrics(tmp_path / "run")
    assert [m["train/micro_batches"] for m in metrics] == [1] * STEPS
    model = transformers.AutoModelForCausalLM.from_pretrained(moe_aux_setup["model"], dtype=torch.float32)
    expected = torch_sft_losses(model, model.parameters(), cfg, STEPS, router_aux=True)
    total = [m["train/loss"] + AUX_COEF * m["train/aux_loss"] for m in metrics]  # train/loss: the CE alone
    np.testing.assert_allclose(total, [t for t, _ in expected], rtol=2e-3)
    # the first step's parameters are the checkpoint's: the aux loss is transformers' to float precision
    assert metrics[0]["train/aux_loss"] == pytest.approx(expected[0][1], rel=1e-5)
    # later steps follow only if the aux loss is trained (without its gradient, step 2's is 2.44 against 2.26)
    np.testing.assert_allclose([m["train/aux_loss"] for m in metrics], [a for _, a in expected], rtol=2e-3)
    assert all(m["train/z_loss"] > 0 for m in metrics) and "train/moe_dropped" not in metrics[0]  # dropless
    chosen = {p.stem: p.keys for p in panels(read_series(tmp_path / "run" / "metrics.jsonl"))}
    assert chosen["router_losses"] == ("train/aux_loss", "train/z_loss")
    assert chosen["expert_load"] == ("train/expert_load_max", "train/expert_load_mean")


_GRADIENTS = {}  # (model, objective, split) -> _step_gradients: each is a compile, shared between tests


def _step_gradients(setup, tmp_path, moe: MoeObjective, *, devices: int, **data):
    """(CE, grads, figures summed over the micro-steps, micro-steps) of the first global batch of 8 samples,
    split as `data` says."""
    key = (setup["model"], moe, devices, tuple(sorted(data.items())))
    if key not in _GRADIENTS:
        _GRADIENTS[key] = _compute_step_gradients(setup, tmp_path, moe, devices=devices, **data)
    return _GRADIENTS[key]


def _compute_step_gradients(setup, tmp_path, moe: MoeObjective, *, devices: int, **data):
    overrides = sft_overrides(setup, tmp_path, **{"data.train_batch_size": 8, "trainer.shape_buckets": 1,
                                                  **{f"data.{k}": v for k, v in data.items()}})
    cfg = load_config(None, overrides)
    batches = build_train_batches(cfg.data, load_tokenizer(cfg.data.tokenizer), seed=0, process_index=0,
                                  process_count=1, local_devices=devices)
    mesh = make_mesh({"fsdp": -1}, devices=jax.devices()[:devices])
    model = jm.from_pretrained(cfg.model.path, dtype="float32", mesh=mesh)
    step = TrainStep(model, make_optimizer(cfg.optim, 10), mesh, chunk_size=256, moe=moe)
    spec = BatchSpec(batches.layout, cfg.data.max_length, "token-mean", 1)
    micro = prepare_step(next(batches), spec).micro_batches
    loss, grads, figures = step.gradients(param_arrays(model), [step.device_batch(mb) for mb in micro],
                                          with_figures=True)
    return float(loss), {k: np.asarray(v) for k, v in grads.items()}, jax.tree.map(np.asarray, figures), len(micro)


def _transformers_z_loss(setup, tmp_path) -> float:
    """mean over real tokens and sparse layers of logsumexp(router logits)^2 (numpy), from transformers' router
    logits of the first step's 8 samples right-padded in one batch."""
    cfg = load_config(None, sft_overrides(setup, tmp_path, **{"data.train_batch_size": 8}))
    every = tokenized_samples(cfg.data)
    samples = [every[i] for i in step_sample_order(len(every), 8, cfg.data.seed, cfg.data.shuffle, 1)[0]]
    model = transformers.AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32)
    width = max(len(ids) for ids, _ in samples)
    ids = np.zeros((len(samples), width), np.int64)
    real = np.zeros((len(samples), width), bool)
    for i, (x, _) in enumerate(samples):
        ids[i, :len(x)], real[i, :len(x)] = x, True
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(real.astype(np.int64)),
                    output_router_logits=True)
    logits = np.stack([g.numpy().astype(np.float64) for g in out.router_logits])  # [L_sparse, B*T, E]
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    return float((lse[:, real.reshape(-1)] ** 2).mean())


def _assert_same_gradients(a, b, rel=1e-5):
    for name in a:
        scale = np.abs(a[name]).max()
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=rel * scale, err_msg=name)


def test_z_loss_is_exact_and_invariant_to_the_micro_batch_split(moe_aux_setup, tmp_path):
    z = MoeObjective(aux_coef=0.0, z_coef=0.1)
    one = _step_gradients(moe_aux_setup, tmp_path, z, devices=8, micro_batch_size_per_gpu=1)
    four = _step_gradients(moe_aux_setup, tmp_path, z, devices=2, micro_batch_size_per_gpu=1, pad_mode="right")
    assert (one[3], four[3]) == (1, 4)  # one micro-step against four accumulated
    expected = _transformers_z_loss(moe_aux_setup, tmp_path)
    assert float(one[2]["z_loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(four[2]["z_loss"]) == pytest.approx(expected, rel=1e-5)
    assert four[0] == pytest.approx(one[0], rel=1e-5)  # the cross-entropy, as ever
    _assert_same_gradients(one[1], four[1])
    ce_only = _step_gradients(moe_aux_setup, tmp_path, MoeObjective(), devices=8, micro_batch_size_per_gpu=1)
    assert float(ce_only[2]["z_loss"]) == pytest.approx(expected, rel=1e-5)  # logged at coefficient 0 too
    router = one[1]["layers/moe_router"] - ce_only[1]["layers/moe_router"]
    assert np.abs(router).max() > 1e-3 * np.abs(one[1]["layers/moe_router"]).max()  # the z-loss is trained


def test_capacity_factor_drops_or_equals_dropless(moe_aux_setup, tmp_path):
    dropless = _step_gradients(moe_aux_setup, tmp_path, MoeObjective(), devices=8, micro_batch_size_per_gpu=1)
    roomy = _step_gradients(moe_aux_setup, tmp_path, MoeObjective(capacity_factor=4.0), devices=8,
                            micro_batch_size_per_gpu=1)  # 4 experts, top-2: cf 2 already fits every assignment
    assert float(roomy[2]["dropped"]) == 0
    assert roomy[0] == pytest.approx(dropless[0], rel=1e-6)
    _assert_same_gradients(dropless[1], roomy[1], rel=1e-6)


def test_capacity_bounded_training_logs_its_drops(moe_aux_setup, tmp_path):
    overrides = {**ONE_MICRO_BATCH, "trainer.total_training_steps": 2, "model.moe_capacity_factor": 0.5,
                 "model.router_z_loss_coef": 1e-3, "model.router_aux_loss_coef": 0.0}
    cfg = load_config(None, sft_overrides(moe_aux_setup, tmp_path / "run", **overrides))
    train(cfg)
    sparse = sum(ModelConfig.from_pretrained(moe_aux_setup["model"]).sparse_layers)
    for m in _metrics(tmp_path / "run"):
        assigned = m["train/global_tokens"] * 2 * sparse  # real tokens x top-2 x sparse layers
        assert m["train/expert_load_mean"] * 4 * sparse == pytest.approx(assigned)
        assert 0 < m["train/moe_dropped"] < assigned
        assert m["train/moe_dropped_fraction"] == pytest.approx(m["train/moe_dropped"] / assigned)
        assert np.isfinite(m["train/loss"]) and m["train/z_loss"] > 0


@pytest.mark.parametrize("key", ["router_aux_loss_coef=0.01", "router_z_loss_coef=0.001", "moe_capacity_factor=1.5"])
def test_a_dense_model_refuses_the_moe_keys(sft_setup, tmp_path, key):
    cfg = load_config(None, sft_overrides(sft_setup, tmp_path / "run") + [f"model.{key}"])
    with pytest.raises(ValueError, match=rf"model.{key}: qwen2 is not a mixture of experts"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_bad_moe_values_are_refused_by_the_config():
    with pytest.raises(ValueError, match="model.moe_capacity_factor=0.0 must be > 0"):
        load_config(None, ["model.moe_capacity_factor=0.0"])
    with pytest.raises(ValueError, match="model.router_z_loss_coef=-1.0 must be >= 0"):
        load_config(None, ["model.router_z_loss_coef=-1.0"])
