"""One process of the multi-process validation-by-generation test (tests/eval/test_generation.py): joins
jax.distributed from the JAX_* variables (none: a single process), shards the checkpoint over every
process's devices, runs one validation and writes this process's metrics to OUT/metrics_<process>.json
(process 0 also writes OUT/samples/step_1.jsonl).

    python tests/eval/generation_worker.py CHECKPOINT TOKENIZER VAL_JSONL OUT OVERRIDES_JSON
"""

import json
import sys
from pathlib import Path

from jsft import distributed

distributed.initialize()  # before anything touches a jax backend

import jax  # noqa: E402

import jsft.models as jm  # noqa: E402
from jsft.config import load_config  # noqa: E402
from jsft.data.tokenizer import load_tokenizer  # noqa: E402
from jsft.eval.generation import GenerationValidation  # noqa: E402
from jsft.models.params import param_arrays  # noqa: E402
from jsft.sharding import make_mesh  # noqa: E402

checkpoint, tokenizer, val, out = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
cfg = load_config(None, [f"data.val_files={val}", *json.loads(sys.argv[5])])
mesh = make_mesh({"fsdp": -1})
model = jm.from_pretrained(checkpoint, dtype="float32", mesh=mesh)
validation = GenerationValidation(cfg, load_tokenizer(tokenizer), model, mesh, out, log=lambda _: None)
metrics = validation(param_arrays(model), step=1)
out.mkdir(parents=True, exist_ok=True)  # process 0 makes it only when writing samples
(out / f"metrics_{jax.process_index()}.json").write_text(json.dumps({"devices": jax.device_count(), **metrics}))
