"""What makes an HF export of a run serve right: its generation_config and its model card.

The generation config starts from the source checkpoint's (sampling defaults kept) and its `eos_token_id`
lists the stop tokens the run trained the model to end its turns with, so HF `generate` and vLLM stop where
training taught the model to stop (a base model's config says `<|endoftext|>`; a ChatML fine-tune ends its
turns with `<|im_end|>`). Both are computed at start-up and kept in every checkpoint's metadata, so
`python -m jsft.export` writes the same files as the end of training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

GENERATION_CONFIG = "generation_config.json"


def generation_config(source_dirs: Sequence[Optional[str]], stop_ids: Sequence[int], model_cfg) -> dict:
    """The source's generation_config.json (the first dir that has one) with eos_token_id = the stop tokens."""
    base: dict = {}
    for d in source_dirs:
        if d and (Path(d) / GENERATION_CONFIG).is_file():
            base = json.loads((Path(d) / GENERATION_CONFIG).read_text())
            break
    base.pop("transformers_version", None)
    for name in ("bos_token_id", "pad_token_id"):
        if base.get(name) is None and getattr(model_cfg, name, None) is not None:
            base[name] = getattr(model_cfg, name)
    stops = list(dict.fromkeys(int(i) for i in stop_ids))
    if stops:
        base["eos_token_id"] = stops if len(stops) > 1 else stops[0]
    elif model_cfg.eos_token_id is not None:
        base.setdefault("eos_token_id", model_cfg.eos_token_id)
    return base


def model_card(cfg, step: int, metrics: Mapping[str, Any], stop_tokens: Sequence[str] = ()) -> str:
    """README.md of an export: base model, data, steps, final losses (what a reader needs to trust it)."""
    m, d, t = cfg.model, cfg.data, cfg.trainer
    base = m.path or "random initialisation (model.init)"
    total = t.total_training_steps or f"{t.total_epochs} epoch(s)"
    rows = [
        ("base model", f"`{base}`"),
        ("training data", _files(d.train_files)),
        ("validation data", _files(d.val_files)),
        ("optimizer steps", f"{step} (of {total}), {d.train_batch_size} samples per step, max_length {d.max_length}"),
        ("optimizer", f"AdamW lr {cfg.optim.lr:g}, {cfg.optim.lr_scheduler_type} schedule, loss {t.loss_agg_mode}"),
        ("final train loss", _number(metrics.get("train/loss"))),
        ("final val loss", _number(metrics.get("val/loss"))),
        ("stop tokens", ", ".join(f"`{s}`" for s in stop_tokens) or "-"),
    ]
    front = f"---\nlibrary_name: transformers\ntags: [jsft, sft]\nbase_model: {json.dumps(str(base))}\n---\n"
    table = "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    return (f"{front}\n# {t.experiment_name}\n\nSupervised fine-tune written by jsft (`python -m jsft.train`).\n\n{table}\n"
            "The tokenizer and its chat template are in this directory; `generation_config.json` stops on the "
            "stop tokens above.\n")


def _files(files: Any) -> str:
    if not files:
        return "-"
    items = [files] if isinstance(files, str) else list(files)
    return ", ".join(f"`{f}`" for f in items)


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"
