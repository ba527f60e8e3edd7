"""What a run directory trains, so a resume never continues a different run.

`identity(cfg)` names the model (its config.json, or model.init), the LoRA set-up, the data files and the
shapes a checkpoint holds (parameter dtypes, batch size, row length); it is written to
<run dir>/identity.json when a run starts. Resuming (trainer.resume_mode=auto) into a directory whose
identity differs stops before any work, naming what differs and the two fixes, instead of restoring
arrays of other shapes (an orbax traceback) or silently continuing another model's run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from jsft.data.sources import resolve_files

FILE = "identity.json"


def identity(cfg) -> dict:
    m, d = cfg.model, cfg.data
    if m.path:
        config = Path(m.path, "config.json").read_bytes()
        model = {"path": os.path.abspath(m.path), "config.json sha256": hashlib.sha256(config).hexdigest()[:16]}
    else:
        model = {"init": dict(m.init or {})}
    return {
        "model": model,
        "lora": {"rank": m.lora_rank, "alpha": m.lora_alpha, "target_modules": str(m.target_modules),
                 "adapter": m.lora_adapter_path},
        "dtypes": {"param": m.param_dtype, "frozen": m.frozen_param_dtype},
        "train files": [[os.path.abspath(p), os.path.getsize(p) if os.path.isfile(p) else None]
                        for p in resolve_files(d.train_files)],
        "shapes": {"train_batch_size": d.train_batch_size, "max_length": d.max_length,
                   "train_max_samples": d.train_max_samples},
    }


def check(run_dir: Path, cfg, has_checkpoint: bool) -> None:
    """Raise ValueError when resuming `run_dir` would continue a run of another model, data or shapes."""
    path = run_dir / FILE
    if cfg.trainer.resume_mode != "auto" or not has_checkpoint or not path.is_file():
        return
    saved, now = json.loads(path.read_text()), json.loads(json.dumps(identity(cfg)))
    differ = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if differ:
        lines = [f"  {k}: checkpoint {json.dumps(saved.get(k))}; now {json.dumps(now.get(k))}" for k in differ]
        raise ValueError(
            f"{run_dir} holds checkpoints of another run ({', '.join(differ)} differ):\n" + "\n".join(lines)
            + "\nnothing was trained or overwritten. Set a new trainer.experiment_name (or trainer.default_local_dir) "
            "for a new run, or trainer.resume_mode=disable to start over in this directory"
        )


def write(run_dir: Path, cfg) -> None:
    (run_dir / FILE).write_text(json.dumps(identity(cfg), indent=2))
