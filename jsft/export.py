"""Export a jsft training checkpoint to a Hugging Face safetensors directory.

    python -m jsft.export --checkpoint RUN_DIR_OR_CHECKPOINT --out HF_DIR [--step N] [--dtype bfloat16]
                         [--tokenizer DIR] [--max-shard-size 5GB]

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
from jsft.models.params import abstract_model, flat_params, param_layout, replace_params, sharding_for
from jsft.sharding import make_mesh
from jsft.train import checkpoint as ckpt
from jsft.train.hf_export import model_card


def load_checkpoint_model(path, step: Optional[int] = None, *, mesh=None, dtype="float32"):
    """(model, meta) from a training checkpoint: parameters restored straight into their shardings.
    `mesh="auto"` chooses the mesh from the checkpoint's parameter shapes, as the trainer does."""
    manager, step = ckpt.locate(path, step)
    meta = ckpt.read_meta(manager, step)
    cfg = ckpt.model_config_from_json(meta["model_config"])
    if isinstance(mesh, str):
        mesh = make_mesh(mesh, params=param_layout(cfg))
    abstract = abstract_model(cfg, dtype=dtype, param_dtype=meta.get("param_dtype", "float32"))
    target = {
        name: jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding_for(var, mesh))
        for name, var in flat_params(abstract).items()
    }
    restored = ckpt.restore(manager, step, params=target)
    return replace_params(abstract, restored["params"]), meta


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jsft.export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a run directory, its checkpoints/ directory, or one step's directory")
    parser.add_argument("--out", required=True, help="output directory of the Hugging Face checkpoint")
    parser.add_argument("--step", type=int, default=None, help="optimizer step to export (default: the latest complete one)")
    parser.add_argument("--dtype", default=None, help="weight dtype of the export, e.g. bfloat16 (default: the source's)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory to write (default: the run's saved tokenizer)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    args = parser.parse_args(argv)
    distributed.initialize()  # multi-host: every host runs this command; all must join before jax starts
    try:
        if not Path(args.checkpoint).exists():
            raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such file or directory")
        model, meta = load_checkpoint_model(args.checkpoint, args.step, mesh="auto")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokenizer = args.tokenizer or meta.get("tokenizer")
    readme = None
    if "config" in meta:
        readme = model_card(config_from_yaml(meta["config"]), meta["step"], meta.get("metrics", {}),
                            meta.get("stop_tokens", ()))
    out = jm.save_pretrained(model, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size, tokenizer=tokenizer,
                             generation_config=meta.get("generation_config"), readme=readme)
    if jax.process_index() == 0:
        print(f"exported step {meta['step']} of {args.checkpoint} to {Path(out).absolute()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
