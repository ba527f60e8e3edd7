"""Per-device memory of the export's gathers, against gathering whole stacked parameters.

    python scripts/export_memory.py --preset llama-3.1-8b [--devices 8] [--mesh fsdp=8]
    python scripts/export_memory.py --hf-config '{"model_type": "llama", ...}' --devices 64

On fake CPU devices and abstract shapes (nothing is allocated): for every parameter under jsft's own
sharding, XLA's memory analysis (outputs + temporaries per device) of the program the export runs to bring it
to the writing host across processes (one layer of a stacked parameter, or blocks of an unsharded
dimension), and of what jsft ran before (`process_allgather` of the whole parameter, replicated on every device).
"""

import argparse
import json
import os
import sys


def _allgather_bytes(x, mesh) -> int:
    """What jax.experimental.multihost_utils.process_allgather(x, tiled=True) compiles: x replicated."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    program = jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, PartitionSpec()))
    analysis = program.lower(x).compile().memory_analysis()
    return int(analysis.output_size_in_bytes + analysis.temp_size_in_bytes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--preset", help="a jsft.plan preset")
    parser.add_argument("--hf-config", help="HF config fields as JSON, with model_type")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--mesh", default=None, help="e.g. data=3,fsdp=8 (default: fsdp over all devices)")
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from jsft.models import hf_io
    from jsft.models.config import ModelConfig
    from jsft.models.params import abstract_model, flat_params, sharding_for
    from jsft.train.planner import PRESETS
    from jsft.sharding import make_mesh, mesh_sizes_of

    fields = PRESETS[args.preset] if args.preset else json.loads(args.hf_config)
    cfg = ModelConfig.from_init(fields)
    mesh_axes = dict(kv.split("=") for kv in args.mesh.split(",")) if args.mesh else {"fsdp": -1}
    mesh = make_mesh({k: int(v) for k, v in mesh_axes.items()})
    model = abstract_model(cfg, param_dtype="float32")
    params = {
        name: jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding_for(var, mesh))
        for name, var in flat_params(model).items()
    }
    limit = hf_io.gather_limit_bytes(cfg, params)
    per_layer = {k.jsft for k in hf_io.key_table(cfg) if k.per_layer}
    rows = []
    for name, x in sorted(params.items()):
        what = ("layer",) if name in per_layer else hf_io.block_plan(x, limit)
        rows.append({
            "param": name, "shape": list(x.shape), "spec": str(x.sharding.spec),
            "streamed_bytes": hf_io.gather_device_bytes(x, what),
            "whole_bytes": _allgather_bytes(x, mesh),
        })
    gib = 2**30
    print(f"{fields.get('model_type')} {cfg.num_layers} layers, hidden {cfg.hidden_size}, mlp {cfg.intermediate_size}, "
          f"vocab {cfg.vocab_size}; fp32 parameters; mesh {mesh_sizes_of(mesh)}; largest layer tensor {limit / gib:.2f} GiB")
    print(f"{'parameter':<20} {'shape':<22} {'streamed GiB/device':>20} {'allgather GiB/device':>21}")
    for r in rows:
        print(f"{r['param']:<20} {str(tuple(r['shape'])):<22} {r['streamed_bytes'] / gib:>20.2f} {r['whole_bytes'] / gib:>21.2f}")
    top = max(rows, key=lambda r: r["whole_bytes"])
    print(f"peak extra per device: streamed {max(r['streamed_bytes'] for r in rows) / gib:.2f} GiB, "
          f"process_allgather of whole parameters {top['whole_bytes'] / gib:.2f} GiB ({top['param']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
