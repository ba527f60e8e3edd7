"""Helpers shared by the test modules: tiny HF checkpoints, short chat data, trainer overrides.

Imported by name (`from jsft_testing import ...`); `conftest` is not importable reliably because several
test folders have one."""

import json
from pathlib import Path

TINY = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)
LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
}


def make_tiny_hf(path, kind: str, seed: int = 0, **overrides):
    """A tiny random HF checkpoint (fp32 safetensors) with norms and biases moved away from their init."""
    import torch
    import transformers

    kw = {**TINY, **overrides}
    if kind == "qwen2":
        config = transformers.Qwen2Config(**kw)
    elif kind == "qwen3":
        config = transformers.Qwen3Config(**{"head_dim": 48, **kw})
    elif kind == "llama3":
        config = transformers.LlamaConfig(**{"rope_parameters": LLAMA3_ROPE, **kw})
    elif kind == "mistral":
        config = transformers.MistralConfig(**{"sliding_window": None, **kw})
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model


def short_conversations(n: int, seed: int = 0) -> list[dict]:
    """Short multi-turn chats (some with a tool call) so trainer tests run at small max_length."""
    import random

    rng = random.Random(seed)
    words = "alpha beta gamma delta sun moon river stone red blue seven three".split()
    rows = []
    for i in range(n):
        msgs = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
        for _ in range(1 + i % 2):
            q = " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))
            a = " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
            msgs += [{"role": "user", "content": q + "?"}, {"role": "assistant", "content": a + "."}]
        if i % 4 == 1:
            x, y = rng.randint(1, 99), rng.randint(1, 99)
            msgs += [
                {"role": "user", "content": f"add {x} {y}"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "calculator", "arguments": {"op": "add", "a": x, "b": y}}}]},
                {"role": "tool", "content": str(x + y)},
                {"role": "assistant", "content": f"{x + y}."},
            ]
        rows.append({"messages": msgs})
    return rows


def sft_overrides(setup: dict, run_dir, **extra) -> list[str]:
    """The trainer's key=value overrides for sft_setup, fp32 and small shapes."""
    base = {
        "model.path": setup["model"], "data.tokenizer": setup["tokenizer"],
        "data.train_files": setup["train"], "data.max_length": 256, "data.train_batch_size": 8,
        "data.micro_batch_size_per_gpu": 1, "data.num_workers": 0, "data.cache_dir": str(setup["root"] / "cache"),
        "model.dtype": "float32", "model.remat_policy": "full",  # fixed: no remat=auto compile per test
        "optim.lr": 1e-3, "trainer.default_local_dir": str(run_dir),
        "trainer.logger": "[]",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def losses(run_dir) -> dict:
    """{step: train/loss} from a run's metrics.jsonl."""
    return {m["step"]: m["train/loss"] for m in map(json.loads, open(Path(run_dir) / "metrics.jsonl"))}


def step_samples(step_batches):
    """(input_ids, loss_mask) of every sample in packed/padded rows of StepBatches, recovered by segment id."""
    import numpy as np

    for batch in step_batches:
        for mb in batch.micro_batches:
            for r in range(len(mb["input_ids"])):
                for s in np.unique(mb["segment_ids"][r]):
                    if s > 0:
                        sel = mb["segment_ids"][r] == s
                        yield mb["input_ids"][r][sel], mb["loss_mask"][r][sel]


def torch_sft_losses(model, trainable, cfg, steps: int) -> list[float]:
    """The veRL-style torch reference: per step, token-mean CE over the global batch's samples (each padded
    in one batch with an attention mask; logits at t predict token t+1), torch AdamW over `trainable`,
    clipping and the same lr schedule as jsft's."""
    import torch

    from jsft.data.pipeline import build_train_batches
    from jsft.data.tokenizer import load_tokenizer
    from jsft.train.optim import make_schedule

    trainable = list(trainable)
    opt = torch.optim.AdamW(trainable, lr=0.0, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay)
    schedule = make_schedule(cfg.optim, steps)
    batches = build_train_batches(cfg.data, load_tokenizer(cfg.data.tokenizer), seed=cfg.data.seed,
                                  process_index=0, process_count=1, local_devices=8)
    out = []
    for step in range(steps):
        samples = list(step_samples([next(batches)]))
        width = max(len(ids) for ids, _ in samples)
        ids = torch.zeros(len(samples), width, dtype=torch.long)
        attn = torch.zeros(len(samples), width, dtype=torch.long)
        mask = torch.zeros(len(samples), width)
        for i, (x, m) in enumerate(samples):
            ids[i, : len(x)], attn[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1, torch.tensor(m, dtype=torch.float32)
        logits = model(input_ids=ids, attention_mask=attn).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        loss = (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.clip_grad)
        for group in opt.param_groups:
            group["lr"] = float(schedule(step))
        opt.step()
        out.append(loss.item())
    return out


def dense_attention(q, k, v, q_seg, kv_seg, q_pos, kv_pos, window=None, sinks=None, softcap=None, scale=None):
    """The plain dense definition, written here independently of jsft: the [B, T, S] mask materialised, one
    extra softmax column per head for the sink, q.k scaled, then capped, then masked."""
    import jax.numpy as jnp  # here, not at the top: conftest imports this module before jax is configured

    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    kr, vr = (jnp.repeat(x, n // kv_heads, axis=2) for x in (k, v))  # query head n reads kv head n // G
    s = jnp.einsum("btnh,bsnh->bnts", q, kr) * (h**-0.5 if scale is None else scale)
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    d = q_pos[:, :, None] - kv_pos[:, None, :]
    mask = (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] > 0) & (d >= 0)
    if window is not None:
        mask = mask & (d < window)
    s = jnp.where(mask[:, None], s, -jnp.inf)
    if sinks is not None:
        s = jnp.concatenate([s, jnp.broadcast_to(sinks[None, :, None, None], (b, n, t, 1))], axis=-1)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    p = e / jnp.maximum(e.sum(-1, keepdims=True), 1e-30)
    return jnp.einsum("bnts,bsnh->btnh", p[..., :kv_seg.shape[1]], vr)
