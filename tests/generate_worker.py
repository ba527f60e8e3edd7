"""One process of the multi-process generation test (tests/test_generate.py): joins jax.distributed from
the JAX_* variables, shards a checkpoint over every process's devices and writes process 0's greedy
generations as JSON.

    python tests/generate_worker.py CHECKPOINT OUT.json PROMPTS_JSON MAX_NEW_TOKENS
"""

import json
import sys

from jsft import distributed

distributed.initialize()  # before anything touches a jax backend

import jax  # noqa: E402

import jsft.models as jm  # noqa: E402
from jsft.generate import Generator  # noqa: E402
from jsft.models.params import param_arrays  # noqa: E402
from jsft.sharding import make_mesh  # noqa: E402

path, out, prompts, max_new = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
model = jm.from_pretrained(path, dtype="float32", mesh=make_mesh({"fsdp": -1}))
tokens = Generator(model, max_new_tokens=max_new, eos_ids={0})(param_arrays(model), prompts)
if jax.process_index() == 0:
    json.dump({"devices": jax.device_count(), "tokens": [list(map(int, t)) for t in tokens]}, open(out, "w"))
