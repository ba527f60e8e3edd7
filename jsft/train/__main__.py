"""Supervised fine-tuning.

    python -m jsft.train [--config configs/X.yaml] [key=value ...]

Without --config and without model.path / model.init, the built-in demo job (configs/default.yaml) runs:
it trains a small model from scratch to call tools, on CPU in minutes.

Keys follow veRL's SFT trainer (model.path, data.train_files, data.train_batch_size, optim.lr, trainer.*);
see docs/training.md. The resolved config is printed and saved as <trainer.default_local_dir>/config.yaml.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jsft.train", description="jsft supervised fine-tuning")
    parser.add_argument("--config", default=None, help="YAML run config (default: the built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-5")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after --config

    from jsft.config import DEFAULT_CONFIG, load_config, to_yaml

    names_a_model = any(o.split("=", 1)[0].strip() in ("model.path", "model.init") or o.startswith("model.init.")
                        for o in args.overrides)
    config = args.config or (None if names_a_model else DEFAULT_CONFIG)
    try:
        cfg = load_config(config, args.overrides)
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from jsft import distributed
    from jsft.train.loop import log, train

    if cfg.demo.enabled:  # the demo job: its data generator and episode hook around the same trainer
        from jsft.demo.job import train

    distributed.initialize()  # before anything touches a jax backend
    log(to_yaml(cfg))
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
