"""model.remat_policy=auto: the cheapest policy whose compiled peak fits the device memory; veRL's switch."""

import json

import pytest
import transformers

from jsft.config import load_config
from jsft.train import remat
from jsft.train.loop import train
from jsft.train.setup import resolve

from jsft_testing import sft_overrides

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)


def cfg_with(**extra):
    return load_config(None, [f"{k}={v}" for k, v in extra.items()])


@pytest.mark.parametrize("checkpointing, policy, expected", [
    (None, "auto", None), (None, "dots_saveable", "dots_saveable"), (None, "none", "none"),
    (True, "auto", "full"), (True, "dots_saveable", "dots_saveable"), (False, "auto", "none"), (False, "full", "none"),
])
def test_an_explicit_setting_wins_over_auto(checkpointing, policy, expected):
    overrides = {"model.remat_policy": policy}
    if checkpointing is not None:
        overrides["model.enable_gradient_checkpointing"] = str(checkpointing).lower()
    assert remat.explicit_policy(cfg_with(**overrides).model) == expected


def test_defaults_are_auto_and_bad_settings_fail_at_load():
    cfg = cfg_with()
    assert cfg.model.remat_policy == "auto" and cfg.model.enable_gradient_checkpointing is None
    with pytest.raises(ValueError, match="contradicts model.remat_policy=none"):
        cfg_with(**{"model.enable_gradient_checkpointing": "true", "model.remat_policy": "none"})
    with pytest.raises(ValueError, match="trainer.device_memory: cannot read a memory size"):
        cfg_with(**{"trainer.device_memory": "lots"})


def test_choose_stops_at_the_first_policy_that_fits():
    peaks = {"none": 300, "dots_saveable": 200, "full": 100}
    tried = []
    pick = lambda budget: remat.choose(lambda p: tried.append(p) or peaks[p], budget, "test")  # noqa: E731
    assert pick(1000).policy == "none" and tried == ["none"]
    assert pick(250).policy == "dots_saveable"
    tried.clear()
    low = pick(50)
    assert (low.policy, low.fits, tried) == ("full", False, ["none", "dots_saveable", "full"])
    assert "NOT even full fits" in low.describe()


@pytest.fixture(scope="module")
def config_only(tmp_path_factory):
    path = tmp_path_factory.mktemp("remat_model")
    transformers.Qwen2Config(**TINY).save_pretrained(path)
    return str(path)


def test_the_budget_decides_between_the_compiled_peaks(config_only):
    """A budget below every peak compiles all three and keeps full; one between dots_saveable's and none's
    peak picks dots_saveable; a big one compiles only none."""
    def choose(memory):
        cfg = cfg_with(**{"model.path": config_only, "model.dtype": "float32", "data.max_length": 256,
                          "data.micro_batch_size_per_gpu": 1, "trainer.device_memory": memory})
        return resolve(cfg, tokenizer=False).remat_choice  # the set-up compiles the candidates (planner.choose_remat)

    tiny = choose("1KiB")
    assert tiny.policy == "full" and not tiny.fits and list(tiny.peaks) == list(remat.CANDIDATES)
    assert tiny.peaks["none"] > tiny.peaks["dots_saveable"] > tiny.peaks["full"], tiny.peaks
    between = (tiny.peaks["none"] + tiny.peaks["dots_saveable"]) / 2 / remat.HEADROOM
    assert choose(str(int(between))).policy == "dots_saveable"
    big = choose("100GB")
    assert big.policy == "none" and list(big.peaks) == ["none"] and big.peaks["none"] == tiny.peaks["none"]
    assert big.budget_bytes == int(remat.HEADROOM * 100e9)


def test_the_trainer_records_the_auto_choice(sft_setup, tmp_path, capsys):
    run = tmp_path / "run"
    overrides = sft_overrides(sft_setup, run, **{"model.remat_policy": "auto", "trainer.device_memory": "100GB",
                                                 "trainer.total_training_steps": 1})
    train(load_config(None, overrides))
    info = json.loads((run / "run_info.json").read_text())
    assert info["remat_policy"] == "none" and info["remat_auto"]["policy"] == "none"
    assert info["remat_auto"]["peaks"]["none"] <= info["remat_auto"]["budget_bytes"]
    assert "remat auto -> none" in capsys.readouterr().out
    # run_info reuses auto's compiled micro-step instead of compiling it again: the same figures as the
    # trainer's own compile of that program (an explicit policy compiles it)
    fixed = tmp_path / "fixed"
    train(load_config(None, sft_overrides(sft_setup, fixed, **{"model.remat_policy": "none",
                                                               "trainer.total_training_steps": 1})))
    own = json.loads((fixed / "run_info.json").read_text())["step_memory_per_device"]
    assert own and info["step_memory_per_device"] == own == info["remat_auto"]["step_memory"]


def test_jsft_plan_resolves_auto_against_its_budget(config_only):
    from jsft import plan

    cfg = cfg_with(**{"model.path": config_only, "model.dtype": "float32", "data.max_length": 256,
                      "data.micro_batch_size_per_gpu": 1})
    result, about = plan.make_plan(cfg, update=False, budget=10**11)
    assert about["remat"] == "auto -> none" and result.step_temp > 0


def test_device_memory_on_cpu_is_the_available_ram_over_the_local_devices():
    import jax

    assert remat.device_memory("24GiB", jax.devices()) == (24 * 2**30, "trainer.device_memory=24GiB")
    memory, source = remat.device_memory(None, jax.devices())  # 8 fake CPU devices: no bytes_limit
    assert source == "host available RAM / 8 local device(s)"
    assert memory == pytest.approx(remat._available_ram() / 8, rel=0.05)
