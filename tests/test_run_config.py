"""Run-config loading: YAML + overrides, strict keys with suggestions, value checks, shipped configs."""

import pathlib

import pytest
import yaml

from jsft.config import load_config

CONFIGS = sorted((pathlib.Path(__file__).parents[1] / "configs").glob("*.yaml"))


def _leaves(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict) and value and prefix + key not in ("trainer.mesh", "model.init"):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_with_every_value_they_set(path):
    """Each value the YAML file writes (read here with a plain YAML parser) is the loaded config's value."""
    cfg = load_config(path)
    leaves = dict(_leaves(yaml.safe_load(path.read_text())))
    assert len(leaves) >= 10
    for key, value in leaves.items():
        got = cfg
        for part in key.split("."):
            got = getattr(got, part)
        assert (list(got) if isinstance(value, list) else got) == value, (key, got, value)


def test_yaml_then_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 0.5\ndata:\n  max_length: 64\n")
    cfg = load_config(tmp_path / "c.yaml", ["optim.lr=0.25", "trainer.mesh.fsdp=4", "trainer.logger=[console,tensorboard]"])
    assert (cfg.optim.lr, cfg.data.max_length, cfg.trainer.mesh["fsdp"]) == (0.25, 64, 4)
    assert cfg.trainer.logger == ["console", "tensorboard"]


def test_unknown_keys_suggest_the_closest(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'optim.learning_rate'"):
        load_config(None, ["optim.learning_rate=1"])
    (tmp_path / "c.yaml").write_text("trainer:\n  save_frequency: 3\n")
    with pytest.raises(ValueError, match="did you mean trainer.save_freq"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ValueError, match="not of the form key=value"):
        load_config(None, ["optim.lr"])


@pytest.mark.parametrize("override,message", [
    ("data.truncation=middle", "allowed: error, left, right"),
    ("trainer.loss_agg_mode=sum", "allowed: token-mean"),
    ("trainer.resume_mode=resume_path", "needs trainer.resume_from_path"),
    ("optim.lr=abc", "invalid config"),
    ("trainer.logger=[console,mlflow]", "allowed: console, tensorboard, wandb"),
])
def test_bad_values_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_command_line_takes_overrides_before_and_after_config(tmp_path, capsys):
    from jsft.train.__main__ import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  lr: 0.001\n")
    # a bad value after --config reaches the config check (argparse would have refused the layout)
    assert main(["data.max_length=128", "--config", str(cfg), "trainer.shape_buckets=0"]) == 2
    assert "trainer.shape_buckets" in capsys.readouterr().err
