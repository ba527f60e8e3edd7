"""Loss and gradients of one global batch on several meshes of the same devices, for test_hsdp.py.

    python tests/train/hsdp_worker.py N '{"data": 1, "fsdp": 24}' '{"data": 3, "fsdp": 8}'

fakes N CPU devices (the flag must precede the jax import) and prints one JSON line per mesh: the loss,
the largest gradient difference to the first mesh (relative to that gradient's largest entry) and the
fsdp size of the q projection's sharding. In the test process (8 fake devices) `mesh_gradients` is called
directly.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

# every dimension a multiple of 24, so plain FSDP over 24 devices shards everything
TINY = dict(model_type="qwen2", vocab_size=768, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def random_batch(rows: int, length: int = 32, seed: int = 0):
    """Two packed samples per row, targets on the second half of each (weights: a token mean)."""
    from jsft.data.batch import WeightedRows, shaped

    rng = np.random.default_rng(seed)
    ids = rng.integers(1, TINY["vocab_size"], (rows, length)).astype(np.int32)
    half = length // 2
    seg = np.concatenate([np.ones((rows, half)), np.full((rows, half), 2)], axis=1).astype(np.int32)
    pos = np.concatenate([np.arange(half), np.arange(half)])[None].repeat(rows, 0).astype(np.int32)
    weight = ((pos >= half // 2) & (pos > 0)).astype(np.float32)
    return shaped(WeightedRows(ids, seg, pos, weight / weight.sum()), length, length)


def mesh_gradients(meshes: list[dict]) -> list[dict]:
    import jax

    import jsft.models as jm
    from jsft.config import OptimConfig
    from jsft.models.config import ModelConfig
    from jsft.models.params import param_arrays
    from jsft.sharding import make_mesh, mesh_sizes_of
    from jsft.train.optim import make_optimizer
    from jsft.train.step import TrainStep

    cfg = ModelConfig.from_init(TINY)
    batch = random_batch(jax.device_count())
    params, reference, out = None, None, []
    for sizes in meshes:
        mesh = make_mesh(sizes)
        model = jm.init_model(cfg, seed=0, mesh=mesh, dtype="float32")
        step = TrainStep(model, make_optimizer(OptimConfig(), 10), mesh, chunk_size=256)
        # the same values on every mesh: the first mesh's parameters, resharded
        params = param_arrays(model) if params is None else jax.device_put(params, step.param_shardings)
        loss, grads = step.gradients(params, [step.device_batch(batch)])
        grads = {k: np.asarray(v) for k, v in grads.items()}
        reference = reference or (float(loss), grads)
        diff = max(float(np.abs(g - reference[1][k]).max() / np.abs(reference[1][k]).max()) for k, g in grads.items())
        q = step.param_shardings["layers/q_proj"]
        out.append({"mesh": mesh_sizes_of(mesh), "loss": float(loss), "loss_ref": reference[0], "grad_diff": diff,
                    "q_proj_shards": int(np.prod(q.mesh.shape["fsdp"])) if "fsdp" in q.spec else 1,
                    "q_proj_shard_shape": list(q.shard_shape(params["layers/q_proj"].shape))})
    return out


if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={int(sys.argv[1])}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    for row in mesh_gradients([json.loads(a) for a in sys.argv[2:]]):
        print(json.dumps(row))
