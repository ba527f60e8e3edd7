"""Measure the HF loader's peak host memory against the checkpoint size.

    python scripts/loader_memory.py [--hidden 1024 --layers 8 --vocab 32000] [--devices 8]

Builds a random Qwen2-shape fp32 checkpoint with transformers, then loads it with jsft.models.from_pretrained
under an FSDP mesh in a fresh process and reports: checkpoint bytes, largest tensor, the loaded parameters'
bytes, and peak RSS growth during the load. On a CPU backend the loaded parameters themselves live in host
memory, so the loader's own overhead is (peak growth - loaded parameter bytes); it should stay near the
largest tensor, far below the checkpoint size.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import os, sys, json, resource
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=%d"
import jax, jsft.models as jm
from jsft.sharding import make_mesh
def rss_peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def rss_now(): return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
mesh = make_mesh({"fsdp": -1})
jax.block_until_ready(jax.numpy.ones(8))  # backend up before the baseline
base = rss_now()
model = jm.from_pretrained(sys.argv[1], dtype="float32", mesh=mesh)
total, per_device = jm.model_bytes(model)
print(json.dumps({"baseline": base, "peak": rss_peak(), "after": rss_now(), "param_bytes": total,
                  "per_device_max": max(per_device.values()), "devices": len(per_device)}))
"""


def build_checkpoint(path: Path, hidden: int, layers: int, vocab: int) -> None:
    import torch
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).float().save_pretrained(path, max_shard_size="200MB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--devices", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "hf"
        build_checkpoint(ckpt, args.hidden, args.layers, args.vocab)
        files = list(ckpt.glob("*.safetensors"))
        ckpt_bytes = sum(f.stat().st_size for f in files)
        from jsft.models.hf_io import SafetensorsDir

        st = SafetensorsDir(ckpt)
        largest = max(st.get(n).nbytes for n in st.names())
        out = subprocess.run(
            [sys.executable, "-c", CHILD % args.devices, str(ckpt)], capture_output=True, text=True, check=True
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 1 << 20
    growth = r["peak"] - r["baseline"]
    overhead = growth - r["param_bytes"]
    print(f"checkpoint: {ckpt_bytes / mib:.1f} MiB in {len(files)} files; largest tensor {largest / mib:.1f} MiB")
    print(f"loaded parameters: {r['param_bytes'] / mib:.1f} MiB over {r['devices']} devices "
          f"({r['per_device_max'] / mib:.1f} MiB on the fullest device)")
    print(f"peak RSS growth during load: {growth / mib:.1f} MiB "
          f"= parameters + {overhead / mib:.1f} MiB loader overhead "
          f"({overhead / largest:.2f}x the largest tensor, {overhead / ckpt_bytes:.2f}x the checkpoint)")


if __name__ == "__main__":
    main()
