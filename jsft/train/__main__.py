"""Supervised fine-tuning.

    python -m jsft.train [--config configs/X.yaml] [--print-config] [key=value ...]

Without --config and without model.path / model.init, the built-in demo job (configs/default.yaml) runs:
it trains a small model from scratch to call tools, on CPU in minutes.

Keys follow veRL's SFT trainer (model.path, data.train_files, data.train_batch_size, optim.lr, trainer.*);
see docs/training.md. A short summary is printed; the resolved config is saved as
<trainer.default_local_dir>/config.yaml (--print-config prints it whole).

With several processes (jax.distributed), a process that fails prints its error and exits at once, without
the shutdown barrier of jax.distributed: the others then fail at their next collective instead of waiting
for its deadline, so every process stops promptly and the error is in the failing process's output.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Optional, Sequence

import jax

from jsft import distributed
from jsft.config import DEFAULT_CONFIG, RunConfig, load_config, names_a_model, to_yaml
from jsft.demo.job import build_trainer as build_demo_trainer
from jsft.train.console import config_summary
from jsft.train.loop import Trainer, log

# errors a user can fix from the message alone: printed as one line, exit status 2, no traceback
_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jsft.train", description="jsft supervised fine-tuning (veRL SFT trainer keys)",
        epilog="With no --config and no model.path/model.init, the built-in demo job runs (configs/default.yaml). "
               "Set JSFT_TRACEBACK=1 for the full traceback of a start-up error.",
    )
    parser.add_argument("--config", default=None, help="YAML run config (default: the built-in demo job)")
    parser.add_argument("--print-config", action="store_true", help="print the whole resolved config, not just the summary")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides of config keys, e.g. optim.lr=1e-5 data.train_files=train.jsonl")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after --config

    notes: list[str] = []
    try:
        config = args.config or (None if names_a_model(args.overrides) else DEFAULT_CONFIG)
        cfg = load_config(config, args.overrides, notes)
    except (ValueError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return _exit(2)
    try:
        return _exit(_train(cfg, args.print_config, notes))
    except BaseException:
        if not distributed.several_processes():
            raise
        traceback.print_exc()
        print(f"process {jax.process_index()} of {jax.process_count()} stopped; where another process failed first, "
              "its output says why", file=sys.stderr)
        return _exit(1)


def _train(cfg: RunConfig, print_config: bool, notes: list[str]) -> int:
    # the demo job: its data generator and episode hook around the same trainer
    build = build_demo_trainer if cfg.demo.enabled else Trainer
    try:
        distributed.initialize()  # before anything touches a jax backend
        for note in notes:  # veRL keys read with another meaning, or ignored (jsft/verl.py)
            log(f"veRL key: {note}")
        log(to_yaml(cfg) if print_config else "config (whole: config.yaml in the run dir, or --print-config):\n"
            + config_summary(cfg))
        trainer = build(cfg)
    except _USER_ERRORS as e:
        if os.environ.get("JSFT_TRACEBACK"):
            raise
        print(f"error: {e}" + _which_process(), file=sys.stderr)
        return 2
    trainer.run()
    return 0


def _which_process() -> str:
    return f" (process {jax.process_index()} of {jax.process_count()})" if distributed.several_processes() else ""


def _exit(code: int) -> int:
    """`code`, or with several processes and a failure: exit now, skipping jax.distributed's shutdown barrier
    (it would wait for processes that wait in a collective for this one, until its deadline)."""
    if code and distributed.several_processes():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
