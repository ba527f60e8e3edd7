"""Helpers shared by the test modules: tiny HF checkpoints, short chat data, trainer overrides.

Imported by name (`from jsft_testing import ...`); `conftest` is not importable reliably because several
test folders have one."""

import json
from pathlib import Path

TINY = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)
# mixtures of experts: 3 layers, hidden 64, 4 experts, top-2
TINY_MOE = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, num_experts=4, num_local_experts=4, num_experts_per_tok=2,
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
    elif kind == "qwen3_moe":  # 4 experts, top-2, expert hidden 32 (dense layers: TINY's intermediate_size)
        config = transformers.Qwen3MoeConfig(**{"head_dim": 16, **TINY_MOE, "moe_intermediate_size": 32, **kw})
    elif kind == "mixtral":
        config = transformers.MixtralConfig(**{**TINY_MOE, "intermediate_size": 32, "sliding_window": None, **kw})
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith((".mlp.gate.weight", "block_sparse_moe.gate.weight")):
                p.normal_(0.0, 0.5)  # routers far from uniform: top-k choices are not near-ties
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


def tokenized_samples(data_cfg, files=None):
    """jsft's tokenized samples of `files` (default data.train_files): [(input_ids, loss_mask)], loss_mask[t] = 1
    where token t is a target. The only thing the torch references take from jsft besides the weights."""
    from jsft.data.dataset import load_dataset
    from jsft.data.tokenizer import load_tokenizer

    dataset = load_dataset(data_cfg, load_tokenizer(data_cfg.tokenizer), files, progress=False)
    return [dataset.sample(i) for i in range(len(dataset))]


def step_sample_order(num_samples: int, batch_size: int, seed: int, shuffle: bool, steps: int) -> list[list[int]]:
    """Sample indices of each optimizer step in the order jsft/data/pipeline.py documents: epoch e visits the
    samples in the order of grain's index shuffle seeded with seed + e, cut into batches of batch_size, the
    last incomplete one dropped."""
    import grain

    order, epoch = [], 0
    while len(order) < steps:
        indices = grain.MapDataset.range(num_samples)
        if shuffle:
            indices = indices.shuffle(seed=seed + epoch)
        indices = [int(i) for i in indices]
        order += [indices[b:b + batch_size] for b in range(0, num_samples - batch_size + 1, batch_size)]
        epoch += 1
    return order[:steps]


def verl_lr_lambda(optim_cfg, total_steps: int):
    """veRL's schedule as a multiplier of optim.lr per 0-based step: linear warmup from 0 over
    optim.lr_warmup_steps (or int(lr_warmup_steps_ratio * total_steps)), then constant, or cosine down to
    min_lr_ratio at total_steps."""
    import math

    if optim_cfg.lr_warmup_steps >= 0:
        warmup = optim_cfg.lr_warmup_steps
    else:
        warmup = int(optim_cfg.lr_warmup_steps_ratio * total_steps)
    floor = optim_cfg.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        if optim_cfg.lr_scheduler_type == "constant":
            return 1.0
        assert optim_cfg.lr_scheduler_type == "cosine", optim_cfg.lr_scheduler_type
        progress = min(step - warmup, total_steps - warmup) / max(1, total_steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def masked_token_mean_nll(model, samples, router_aux: bool = False):
    """Token-mean cross-entropy over `samples`, each right-padded in one batch with an attention mask; the
    logits at t predict token t + 1, counted where loss_mask[t + 1] = 1. `router_aux` (a mixture of experts):
    transformers' own loss instead, from labels (-100 where not a target; it shifts them itself) with
    output_router_logits, i.e. (CE + router_aux_loss_coef x aux_loss, aux_loss)."""
    import torch

    width = max(len(ids) for ids, _ in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    attn = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros(len(samples), width)
    for i, (x, m) in enumerate(samples):
        ids[i, : len(x)], attn[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1, torch.tensor(m, dtype=torch.float32)
    if router_aux:
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        out = model(input_ids=ids, attention_mask=attn, labels=labels, output_router_logits=True)
        return out.loss, out.aux_loss
    logits = model(input_ids=ids, attention_mask=attn).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()


def torch_sft_losses(model, trainable, cfg, steps: int, router_aux: bool = False) -> list:
    """The veRL-style torch reference, built from jsft's tokenized samples only: per step, the global batch's
    samples in the order the pipeline documents (step_sample_order), the token-mean CE over all of them
    (masked_token_mean_nll), torch AdamW over `trainable` with clipping and veRL's lr schedule (LambdaLR).
    `router_aux`: the objective is transformers' CE + coef x load-balancing loss, and each step gives
    (that loss, the load-balancing loss)."""
    import torch

    trainable = list(trainable)
    opt = torch.optim.AdamW(trainable, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, verl_lr_lambda(cfg.optim, steps))
    samples = tokenized_samples(cfg.data)
    order = step_sample_order(len(samples), cfg.data.train_batch_size, cfg.data.seed, cfg.data.shuffle, steps)
    out = []
    for indices in order:
        loss = masked_token_mean_nll(model, [samples[i] for i in indices], router_aux)
        loss, aux = loss if router_aux else (loss, None)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.clip_grad)
        opt.step()
        schedule.step()
        out.append(loss.item() if aux is None else (loss.item(), aux.item()))
    return out


# Gemma 3 with every feature on: sliding and full layers, a window shorter than the test rows, per-type rope
# (linear scaling on the full layers), a query_pre_attn_scalar that is not head_dim, a final logit softcap
GEMMA3_TINY = dict(
    vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=6, query_pre_attn_scalar=24,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e5},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
    final_logit_softcapping=2.0,
)


def make_tiny_gemma3(path, seed: int = 0, multimodal: bool = False, **overrides):
    """A tiny random Gemma 3 checkpoint (fp32), norms moved away from their zero init. multimodal: a
    Gemma3ForConditionalGeneration with a tiny vision tower (its text stack is the same Gemma 3 decoder)."""
    import torch
    import transformers

    text = transformers.Gemma3TextConfig(**{**GEMMA3_TINY, **overrides})
    torch.manual_seed(seed)
    if multimodal:
        vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, image_size=16, patch_size=8)
        config = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision, mm_tokens_per_image=4,
                                           image_token_index=text.vocab_size - 1, boi_token_index=text.vocab_size - 3,
                                           eoi_token_index=text.vocab_size - 2)
        model = transformers.Gemma3ForConditionalGeneration(config).float().eval()
    else:
        model = transformers.Gemma3ForCausalLM(text).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(path)
    return model


# gpt-oss from the released config.json's fields (yarn rope given in its 4.x `rope_scaling` form, alternating
# sliding and full layers), shrunk: 4 layers, hidden 64, 4 experts top-2, expert hidden 32 (MXFP4 packs 32 values per
# block, so D and F are multiples of 32), a window of 6 on rows of ~40 tokens, a swiglu_limit low enough that
# the clamps bind at these small weights
GPT_OSS_TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=6,
    layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=131072, rope_theta=150000.0,
    rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                  "original_max_position_embeddings": 4096},
    swiglu_limit=0.25, attention_bias=True,
)


def make_tiny_gpt_oss(path, seed: int = 0, **overrides):
    """A tiny random GptOssForCausalLM (fp32 safetensors): sinks, every bias and the norms moved away from their
    (zero / one / small) init, routers far from uniform so top-k choices are not near-ties."""
    import torch
    import transformers

    config = transformers.GptOssConfig(**{**GPT_OSS_TINY, **overrides})
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("sinks", "router.bias")):
                p.normal_(0.0, 1.0)
            elif name.endswith("router.weight"):
                p.normal_(0.0, 0.5)
            elif "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model


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


GREEDY_PROMPTS = [[5, 6, 7, 8, 9], list(range(20, 37)), [100, 3, 4]]  # lengths 5, 17, 3: left padding


def assert_greedy_matches_transformers(model, ref, max_new_tokens: int, prompts=GREEDY_PROMPTS):
    """jsft's KV-cache sampler (greedy, no stop) gives transformers' `generate` tokens on each prompt."""
    import torch

    from jsft.generate import generate

    expected = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
        expected.append(out[0, len(p):].tolist())
    assert all(0 not in e for e in expected)  # 0 is the stop id given to jsft: it must not occur
    assert generate(model, prompts, max_new_tokens=max_new_tokens, eos_ids={0}) == expected
