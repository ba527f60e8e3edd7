"""Export a jsft training checkpoint to a Hugging Face safetensors directory (and a LoRA run's PEFT adapter).

    python -m jsft.export --checkpoint RUN_DIR_OR_CHECKPOINT --out HF_DIR [--step N] [--dtype bfloat16]
                         [--tokenizer DIR] [--max-shard-size 5GB] [--adapter-out DIR] [--adapter-only]

A LoRA run (model.lora_rank > 0) exports its adapters merged into the base weights to --out, and with
--adapter-out DIR also the adapter alone as a PEFT directory (peft.PeftModel.from_pretrained(base, DIR));
--adapter-only skips the merge (then --out is not needed).

`--checkpoint` may be a run directory (its checkpoints/ subfolder is used), a checkpoints directory, or
one step's directory; the latest complete step is taken unless --step is given. The tokenizer saved in
the checkpoint's metadata is copied unless --tokenizer overrides it; generation_config.json (stop tokens of
the trained chat template, the source's sampling defaults) and README.md come from the checkpoint too.


The export streams (`jsft.models.save_pretrained`): one layer of each parameter at a time reaches the
writing process, so device memory beyond the restored parameters stays near one layer's largest tensor.
Multi-host: start it on every host like training (same variables); process 0 writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import jax

import jsft.models as jm
from jsft import distributed
from jsft.config import config_from_yaml
from jsft.models import lora
from jsft.models.hf_export import model_card
from jsft.models.params import abstract_model, flat_params, param_arrays, replace_params, sharding_for
from jsft.train import checkpoint as ckpt
from jsft.train.setup import checkpoint_mesh


def load_checkpoint_model(path, step: Optional[int] = None, *, mesh=None, dtype="float32"):
    """(model, meta) from a training checkpoint: parameters restored straight into their shardings.
    `mesh="auto"` chooses the mesh from the checkpoint's parameter shapes, as the trainer does. A LoRA
    checkpoint of a model.path base holds the adapters only: the frozen base is read from that path."""
    manager, step = ckpt.locate(path, step)
    meta = ckpt.read_meta(manager, step)
    cfg = ckpt.model_config_from_json(meta["model_config"])
    if mesh == "auto":
        mesh = checkpoint_mesh(cfg)
    param_dtype = meta.get("param_dtype", "float32")
    abstract = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, lora=lora.spec_from_json(meta.get("lora")))
    base_elsewhere = not meta.get("frozen_base_saved", True)
    target = {
        name: jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding_for(var, mesh))
        for name, var in flat_params(abstract).items()
        if lora.is_adapter(name) or not base_elsewhere
    }
    values = ckpt.restore(manager, step, params=target)["params"]
    if base_elsewhere:
        base_dir = meta["base_model"]
        if not Path(base_dir).is_dir():
            raise FileNotFoundError(
                f"{path} holds LoRA adapters only; their base model {base_dir} (model.path of the run) is not there"
            )
        base = jm.from_pretrained(base_dir, dtype=dtype, param_dtype=param_dtype, mesh=mesh)
        values = {**param_arrays(base), **values}
    return replace_params(abstract, values), meta


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jsft.export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a run directory, its checkpoints/ directory, or one step's directory")
    parser.add_argument("--out", help="output directory of the Hugging Face checkpoint (LoRA: the merged model)")
    parser.add_argument("--step", type=int, default=None, help="optimizer step to export (default: the latest complete one)")
    parser.add_argument("--dtype", default=None, help="weight dtype of the export, e.g. bfloat16 (default: the source's)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory to write (default: the run's saved tokenizer)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    parser.add_argument("--adapter-out", help="LoRA runs: also write the PEFT adapter directory here")
    parser.add_argument("--adapter-only", action="store_true", help="LoRA runs: write only --adapter-out, no merge")
    args = parser.parse_args(argv)
    if args.adapter_only and not args.adapter_out:
        parser.error("--adapter-only needs --adapter-out DIR")
    if not (args.out or args.adapter_only):
        parser.error("--out DIR is required (or --adapter-only with --adapter-out)")
    distributed.initialize()  # multi-host: every host runs this command; all must join before jax starts
    try:
        if not Path(args.checkpoint).exists():
            raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such file or directory")
        model, meta = load_checkpoint_model(args.checkpoint, args.step, mesh="auto")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.adapter_out and model.lora is None:
        parser.error(f"{args.checkpoint} is a full fine-tuning checkpoint (no LoRA adapters): drop --adapter-out")
    written = []
    if args.adapter_out:
        written.append(lora.save_adapter(model, args.adapter_out, base_model_name_or_path=meta.get("base_model")))
    if not args.adapter_only:
        merged = lora.merge(model) if model.lora is not None else model
        readme = None
        if "config" in meta:
            readme = model_card(config_from_yaml(meta["config"]), meta["step"], meta.get("metrics", {}),
                                meta.get("stop_tokens", ()))
        written.append(jm.save_pretrained(
            merged, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
            tokenizer=args.tokenizer or meta.get("tokenizer"), generation_config=meta.get("generation_config"),
            readme=readme,
        ))
    if jax.process_index() == 0:
        where = " and ".join(str(Path(w).absolute()) for w in written)
        print(f"exported step {meta['step']} of {args.checkpoint} to {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
