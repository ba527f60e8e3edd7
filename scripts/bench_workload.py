"""The bench's workloads: a random-init Qwen2-shape (or Qwen3-MoE-shape) checkpoint, multi-turn tool chats,
one set of hyperparameters, and the jsft settings it runs under (used by bench.py, bench_row.py, bench_lora.py).

Two length distributions, both from the demo's tool-use conversations merged into longer chats:
  chat       each chat merges 1 + geometric(1) conversations: mean ~590 tokens, a geometric tail;
  long_tail  the spread of real multi-turn tool data: most chats are one short exchange, a minority merge
             many (1 + geometric(3), at most 8), so a long tail reaches ~1700 tokens next to many short samples.
  moe        the chat distribution on a Qwen3-MoE shape (8 experts, top-2, every layer sparse).
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass(frozen=True)
class Workload:
    name: str = "chat"
    layers: int = 4
    hidden: int = 512
    mlp: int = 1408
    heads: int = 8
    kv_heads: int = 2
    vocab: int = 8192
    samples_per_step: int = 16  # data.train_batch_size
    warmup_steps: int = 2
    steps: int = 6  # measured steps (median)
    max_length: int = 2048  # jsft row length and the longest sample allowed
    torch_micro_batch: int = 4
    mean_conversations: float = 2.0  # demo conversations merged into one chat (chat: all; long_tail: the long ones)
    long_share: float = 0.0  # long_tail: share of chats that merge several conversations; the rest are one
    max_conversations: int = 0  # long_tail: at most this many per chat (> 0), so the tail ends near max_length
    lr: float = 1e-4
    seed: int = 0
    experts: int = 0  # > 0: a Qwen3-MoE shape, every layer sparse (`mlp` is then each expert's hidden size)
    top_k: int = 2

    @property
    def num_samples(self) -> int:
        return self.samples_per_step * (self.warmup_steps + self.steps)


WORKLOADS = {
    "chat": Workload(),
    "long_tail": Workload(name="long_tail", mean_conversations=4.0, long_share=0.5, max_conversations=8),
    # a tiny Qwen3-MoE shape: 8 experts, top-2 (2 x 512 active expert hidden = 1024, near the dense 1408)
    "moe": Workload(name="moe", layers=4, hidden=512, mlp=512, experts=8, top_k=2),
}
QUICK = {name: dataclasses.replace(w, layers=2, hidden=64, mlp=128, heads=4, kv_heads=2, vocab=1024,
                                   samples_per_step=8, warmup_steps=1, steps=2, max_length=1024,
                                   mean_conversations=min(w.mean_conversations, 3.0), max_conversations=min(w.max_conversations, 4))
         for name, w in WORKLOADS.items()}

# Hyperparameters, read by both sides from the same run config (plus Workload.lr).
HYPERPARAMETERS = {
    "optim.lr_scheduler_type": "cosine",
    "optim.lr_warmup_steps": 0,
    "optim.weight_decay": 0.01,
    "optim.clip_grad": 1.0,
    "trainer.loss_agg_mode": "token-mean",
}
# What every bench run fixes, defaults or not: fp32 compute like the torch side (bf16 is not faster on this
# CPU, see NOTES.md), both sides see the samples in file order (the file is already random), tokenization
# in process, and the rare chat past max_length is cut, identically for both sides.
BENCH_FIXED = {
    "model.dtype": "float32",
    "data.shuffle": False,
    "data.num_workers": 0,
    "data.truncation": "right",
}
# jsft's settings: `defaults` is what a user gets (model.remat_policy=auto, 2 rows per micro-batch,
# 4096-column CE chunks); `tuned` is the fastest found by hand: no remat, one packed row per micro-batch
# (the least padding), one CE chunk over the whole 8k vocabulary.
SETTINGS = {
    "defaults": {},
    "tuned": {
        "model.enable_gradient_checkpointing": False,
        "data.pad_mode": "no_padding",
        "data.micro_batch_size_per_gpu": 1,
        "trainer.loss_chunk_size": 8192,
    },
}


def chat_rows(n: int, w: Workload) -> list[dict]:
    """`n` multi-turn tool-use chats, each one system prompt then the turns of several demo conversations
    (how many: see the module docstring). Deterministic in `w.seed`."""
    from jsft.demo import rows

    rng = random.Random(w.seed)
    counts = [_conversations(rng, w) for _ in range(n)]
    pool = iter(rows(sum(counts), w.seed))
    out = []
    for count in counts:
        parts = [next(pool) for _ in range(count)]
        messages = parts[0]["messages"] + [m for p in parts[1:] for m in p["messages"] if m["role"] != "system"]
        out.append({"messages": messages, "tools": parts[0]["tools"]})
    return out


def _conversations(rng: random.Random, w: Workload) -> int:
    if w.long_share and rng.random() >= w.long_share:
        return 1  # the many short samples
    count = 1 + _geometric(rng, w.mean_conversations - 1)
    return min(count, w.max_conversations) if w.max_conversations else count


def _geometric(rng: random.Random, mean: float) -> int:
    """Draws >= 0 with the given mean and a geometric (long) tail."""
    if mean <= 0:
        return 0
    p = 1.0 / (1.0 + mean)
    k = 0
    while rng.random() > p:
        k += 1
    return k


def workdir_workload(workdir: Optional[str], prefix: str, w: "Workload") -> tuple[Path, dict]:
    """(directory, paths) of a bench workload: `workdir` if it holds one, else built there (or in a new
    temporary directory). For the profiling scripts that reuse one workload across invocations."""
    directory = Path(workdir or tempfile.mkdtemp(prefix=prefix))
    directory.mkdir(parents=True, exist_ok=True)
    paths = {k: str(directory / k) for k in ("model", "tokenizer")} | {"train": str(directory / "train.jsonl")}
    if not Path(paths["model"]).exists():
        paths = prepare(directory, w)
    return directory, paths


def prepare(workdir: Path, w: Workload) -> dict:
    """Dataset JSONL, demo tokenizer and a random-init fp32 HF checkpoint shared by both sides."""
    import torch
    import transformers

    from jsft.demo import build_tokenizer

    paths = {"train": workdir / "train.jsonl", "tokenizer": workdir / "tokenizer", "model": workdir / "model"}
    with open(paths["train"], "w") as f:
        for row in chat_rows(w.num_samples, w):
            f.write(json.dumps(row) + "\n")
    build_tokenizer(paths["tokenizer"])
    shape = dict(vocab_size=w.vocab, hidden_size=w.hidden, num_hidden_layers=w.layers, num_attention_heads=w.heads,
                 num_key_value_heads=w.kv_heads, max_position_embeddings=w.max_length, tie_word_embeddings=False)
    if w.experts:
        config = transformers.Qwen3MoeConfig(**shape, head_dim=w.hidden // w.heads, intermediate_size=w.mlp,
                                             moe_intermediate_size=w.mlp, num_experts=w.experts,
                                             num_experts_per_tok=w.top_k, norm_topk_prob=True)
    else:
        config = transformers.Qwen2Config(**shape, intermediate_size=w.mlp)
    torch.manual_seed(w.seed)
    transformers.AutoModelForCausalLM.from_config(config).float().save_pretrained(paths["model"])
    return {k: str(v) for k, v in paths.items()}


def jsft_config(paths: dict, w: Workload, workdir: Path, settings: str = "tuned"):
    from jsft.config import load_config

    overrides = {
        **HYPERPARAMETERS,
        **BENCH_FIXED,
        **SETTINGS[settings],
        "model.path": paths["model"], "data.tokenizer": paths["tokenizer"], "data.train_files": paths["train"],
        "data.max_length": w.max_length, "data.train_batch_size": w.samples_per_step,
        "data.cache_dir": str(workdir / "cache"), "optim.lr": w.lr,
        "trainer.total_training_steps": w.warmup_steps + w.steps, "trainer.default_local_dir": str(workdir / "run"),
    }
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def sample_flops(model_cfg, lengths) -> float:
    """Useful training FLOPs of samples of these lengths (causal attention over each sample only)."""
    return float(sum(model_cfg.flops_per_token(n) * n for n in lengths))
