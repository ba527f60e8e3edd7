"""Side-by-side SFT benchmark: jsft against a transformers + torch loop with dynamic padding.

    python scripts/bench.py [--quick] [--steps N] [--workdir D] [--json F] [--label L] [--no-append]

One invocation builds one workload (a random-init Qwen2-shape checkpoint, a variable-length multi-turn
chat dataset, one set of hyperparameters) and trains it twice, each side in its own process (own threads,
own peak RSS), their optimizer steps interleaved so that load from other work hits both alike:

  jsft   the real pipeline (tokenized dataset -> first-fit packed rows) and `TrainStep`, one CPU device;
  torch  transformers' Qwen2ForCausalLM (sdpa attention), micro-batches of `torch_micro_batch` samples in
         dataset order padded to their longest sample (what veRL / TRL do without varlen flash attention).

Reported: real (non-pad) tokens/s of both and their ratio (also over "quiet" steps only), MFU of both
against a fp32 matmul peak probed around each step, padding efficiency (real / computed tokens), compile
time, XLA's compiled memory analysis of the micro-step, the cross-entropy's temporaries at a 152k
vocabulary against full fp32 logits, and each process's peak RSS. Medians over the steps after warm-up.
Writes JSON and appends a row to BENCHMARKS.md (not with --quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import multiprocessing
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Workload:
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
    mean_conversations: float = 2.0  # demo conversations merged into one chat: sets the length distribution
    lr: float = 1e-4
    seed: int = 0

    @property
    def num_samples(self) -> int:
        return self.samples_per_step * (self.warmup_steps + self.steps)


QUICK = Workload(layers=2, hidden=64, mlp=128, heads=4, kv_heads=2, vocab=1024, samples_per_step=8,
                 warmup_steps=1, steps=2, max_length=1024, mean_conversations=1.5)

# Hyperparameters, read by both sides from the same run config (plus Workload.lr).
HYPERPARAMETERS = {
    "optim.lr_scheduler_type": "cosine",
    "optim.lr_warmup_steps": 0,
    "optim.weight_decay": 0.01,
    "optim.clip_grad": 1.0,
    "trainer.loss_agg_mode": "token-mean",
}
# How jsft runs it: fp32 compute (bf16 is not faster on this CPU, see NOTES.md), no remat (memory is
# plentiful; recomputing costs time), one packed row per micro-batch (the least padding), one CE chunk
# over the whole 8k vocabulary.
JSFT_SETTINGS = {
    "model.dtype": "float32",
    "model.enable_gradient_checkpointing": False,
    "data.pad_mode": "no_padding",
    "data.micro_batch_size_per_gpu": 1,
    "data.shuffle": False,  # both sides see the samples in file order (the file is already random)
    "data.num_workers": 0,
    "data.truncation": "right",  # the rare chat past max_length is cut, identically for both sides
    "trainer.loss_chunk_size": 8192,
}


# ---- the workload -----------------------------------------------------------------------------------------------


def chat_rows(n: int, mean_conversations: float, seed: int) -> list[dict]:
    """`n` multi-turn tool-use chats: each merges 1 + geometric(mean - 1) demo conversations after one
    system prompt, so lengths have a long right tail. Deterministic in `seed`."""
    from jsft.demo import rows

    rng = random.Random(seed)
    counts = [1 + _geometric(rng, mean_conversations - 1) for _ in range(n)]
    pool = iter(rows(sum(counts), seed))
    out = []
    for count in counts:
        parts = [next(pool) for _ in range(count)]
        messages = parts[0]["messages"] + [m for p in parts[1:] for m in p["messages"] if m["role"] != "system"]
        out.append({"messages": messages, "tools": parts[0]["tools"]})
    return out


def _geometric(rng: random.Random, mean: float) -> int:
    """Draws >= 0 with the given mean and a geometric (long) tail."""
    if mean <= 0:
        return 0
    p = 1.0 / (1.0 + mean)
    k = 0
    while rng.random() > p:
        k += 1
    return k


def prepare(workdir: Path, w: Workload) -> dict:
    """Dataset JSONL, demo tokenizer and a random-init fp32 HF checkpoint shared by both sides."""
    import torch
    import transformers

    from jsft.demo import build_tokenizer

    paths = {"train": workdir / "train.jsonl", "tokenizer": workdir / "tokenizer", "model": workdir / "model"}
    with open(paths["train"], "w") as f:
        for row in chat_rows(w.num_samples, w.mean_conversations, w.seed):
            f.write(json.dumps(row) + "\n")
    build_tokenizer(paths["tokenizer"])
    config = transformers.Qwen2Config(
        vocab_size=w.vocab, hidden_size=w.hidden, intermediate_size=w.mlp, num_hidden_layers=w.layers,
        num_attention_heads=w.heads, num_key_value_heads=w.kv_heads, max_position_embeddings=w.max_length,
        tie_word_embeddings=False,
    )
    torch.manual_seed(w.seed)
    transformers.AutoModelForCausalLM.from_config(config).float().save_pretrained(paths["model"])
    return {k: str(v) for k, v in paths.items()}


def jsft_config(paths: dict, w: Workload, workdir: Path):
    from jsft.config import load_config

    overrides = {
        **HYPERPARAMETERS,
        **JSFT_SETTINGS,
        "model.path": paths["model"], "data.tokenizer": paths["tokenizer"], "data.train_files": paths["train"],
        "data.max_length": w.max_length, "data.train_batch_size": w.samples_per_step,
        "data.cache_dir": str(workdir / "cache"), "optim.lr": w.lr,
        "trainer.total_training_steps": w.warmup_steps + w.steps, "trainer.default_local_dir": str(workdir / "run"),
    }
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def sample_flops(model_cfg, lengths) -> float:
    """Useful training FLOPs of samples of these lengths (causal attention over each sample only)."""
    return float(sum(model_cfg.flops_per_token(n) * n for n in lengths))


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- the two sides ---------------------------------------------------------------------------------------------
#
# Each side lives in its own process and runs one optimizer step per request, so the parent can interleave
# them (jsft step s, torch step s, jsft step s+1, ...): load from other work on the machine then hits both
# alike, and the ratio stays meaningful on a shared box.


class JsftSide:
    """jsft's real data pipeline and TrainStep on one CPU device."""

    def __init__(self, paths: dict, w: Workload, workdir: Path):
        import jsft.models as jm
        from jsft.data.pipeline import build_train_batches
        from jsft.data.tokenizer import load_tokenizer
        from jsft.models.params import param_arrays
        from jsft.sharding import make_mesh
        from jsft.train.batch import largest_micro_batch
        from jsft.train.optim import make_optimizer
        from jsft.train.step import TrainStep

        self.cfg = cfg = jsft_config(paths, w, workdir)
        mesh = make_mesh({"fsdp": -1})
        self.data = build_train_batches(cfg.data, load_tokenizer(paths["tokenizer"]), seed=0, process_index=0,
                                        process_count=1, local_devices=1)
        self.model = jm.from_pretrained(paths["model"], dtype=cfg.model.dtype, mesh=mesh, remat_policy="none",
                                        attention_impl=cfg.model.attention_impl)
        self.step_fn = TrainStep(self.model, make_optimizer(cfg.optim, w.warmup_steps + w.steps), mesh,
                                 chunk_size=cfg.trainer.loss_chunk_size)
        self.params = param_arrays(self.model)
        self.opt_state = self.step_fn.init_opt_state(self.params)
        self.example = self.step_fn.device_batch(largest_micro_batch(self.data.empty_micro_batch()))
        self.memory = self.step_fn.memory_analysis(self.params, self.opt_state, self.example)
        rerun = build_train_batches(cfg.data, load_tokenizer(paths["tokenizer"]), seed=0, process_index=0,
                                    process_count=1, local_devices=1)
        self.compile_s, self.shapes = self._compile_shapes([next(rerun) for _ in range(w.warmup_steps + w.steps)])

    def _prepare(self, batch):
        from jsft.train.batch import prepare_step

        c = self.cfg
        return prepare_step(batch, self.data.empty_micro_batch(), mode=c.trainer.loss_agg_mode,
                            max_length=c.data.max_length, buckets=c.trainer.shape_buckets)

    def _compile_shapes(self, batches) -> tuple[float, int]:
        """Compile (and run once) every micro-batch shape the run's steps will use, so that the measured
        steps time steady-state training; the compile cost is reported on its own."""
        shapes = {}
        for batch in batches:
            for mb in self._prepare(batch).micro_batches:
                shapes.setdefault(tuple(mb[k].shape for k in ("input_ids", "target_pos")), mb)
        t = time.perf_counter()
        loss, _ = self.step_fn.gradients(self.params, [self.step_fn.device_batch(mb) for mb in shapes.values()])
        float(loss)
        return time.perf_counter() - t, len(shapes)

    def peak(self) -> float:
        """fp32 matmul FLOP/s right now: the machine's current capacity, for MFU and to spot busy steps."""
        from jsft.train.perf import measured_matmul_flops

        return measured_matmul_flops("float32")

    def step(self) -> dict:
        t = time.perf_counter()
        g = self._prepare(next(self.data))
        batches = [self.step_fn.device_batch(mb) for mb in g.micro_batches]
        compiled = self.step_fn.compiled_programs()
        self.params, self.opt_state, loss, _ = self.step_fn.train_step(self.params, self.opt_state, batches)
        loss = float(loss)  # waits for the step
        new_shapes = self.step_fn.compiled_programs() - compiled
        lengths = [n for mb in g.micro_batches for n in _segment_lengths(mb["segment_ids"])]
        flops = sample_flops(self.model.config, lengths)
        c = self.model.config  # the unembedding is needed at target tokens only (6 FLOPs per weight)
        needed = flops - 6 * c.vocab_size * c.hidden_size * (g.tokens - g.target_tokens)
        return {"time": time.perf_counter() - t, "real": g.tokens, "computed": g.computed_tokens,
                "flops": flops, "needed_flops": needed, "loss": loss, "compiled": new_shapes}

    def summary(self) -> dict:
        import jax

        from jsft.train.run_info import tree_bytes

        return {
            "compile_s": self.compile_s,
            "compiled_shapes_ahead": self.shapes,
            "param_bytes": tree_bytes(self.params)[1],
            "opt_state_bytes": tree_bytes(self.opt_state)[1],
            "step_memory": self.memory,
            "micro_batch_shape": list(self.example["input_ids"].shape),
            "attention_impl": self.model.attention_impl,
            "devices": jax.device_count(),
            "peak_rss": peak_rss(),
        }


def _segment_lengths(segment_ids):
    import numpy as np

    return [int(n) for row in np.asarray(segment_ids) for n in np.bincount(row)[1:] if n]


class TorchSide:
    """transformers' Qwen2 + torch AdamW; micro-batches of `torch_micro_batch` samples in dataset order,
    each padded to its longest sample; token-mean loss over the step, like jsft's default."""

    def __init__(self, paths: dict, w: Workload, workdir: Path):
        import torch
        import transformers

        from jsft.data.dataset import load_dataset
        from jsft.data.tokenizer import load_tokenizer
        from jsft.models.config import ModelConfig
        from jsft.train.optim import make_schedule

        self.w, self.cfg = w, jsft_config(paths, w, workdir)
        self.dataset = load_dataset(self.cfg.data, load_tokenizer(paths["tokenizer"]), self.cfg.data.train_files)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            paths["model"], dtype=torch.float32, attn_implementation="sdpa")
        self.model.train()
        self.model_cfg = ModelConfig.from_pretrained(paths["model"])
        optim = self.cfg.optim
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=0.0, betas=tuple(optim.betas), eps=optim.eps,
                                     weight_decay=optim.weight_decay)
        self.schedule = make_schedule(optim, w.warmup_steps + w.steps)
        self.count = 0

    def step(self) -> dict:
        import torch

        w, n = self.w, self.count
        samples = [self.dataset.sample(i) for i in range(n * w.samples_per_step, (n + 1) * w.samples_per_step)]
        t = time.perf_counter()
        targets = sum(int(m[1:].sum()) for _, m in samples)
        self.opt.zero_grad(set_to_none=True)
        total, computed = 0.0, 0
        for i in range(0, len(samples), w.torch_micro_batch):
            ids, attn, mask = _padded_batch(samples[i : i + w.torch_micro_batch])
            logits = self.model(input_ids=ids, attention_mask=attn).logits
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            loss = (nll * mask[:, 1:]).sum() / targets  # shifted: logits at t predict token t+1
            loss.backward()
            total += loss.item()
            computed += ids.numel()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        for group in self.opt.param_groups:
            group["lr"] = float(self.schedule(n))
        self.opt.step()
        self.count += 1
        lengths = [len(ids) for ids, _ in samples]
        return {"time": time.perf_counter() - t, "real": sum(lengths), "computed": computed,
                "flops": sample_flops(self.model_cfg, lengths), "loss": total}

    def summary(self) -> dict:
        import torch

        return {"threads": torch.get_num_threads(), "peak_rss": peak_rss()}


def _padded_batch(samples):
    import torch

    width = max(len(ids) for ids, _ in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    attn = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros(len(samples), width)
    for r, (x, m) in enumerate(samples):
        ids[r, : len(x)], attn[r, : len(x)], mask[r, : len(x)] = torch.from_numpy(x.copy()), 1, torch.from_numpy(m.copy())
    return ids, attn, mask


SIDES = {"jsft": JsftSide, "torch": TorchSide}


def serve(kind: str, conn, paths: dict, w: Workload, workdir: str) -> None:
    """Child process: build one side, then answer "step" requests until "summary". An exception is sent
    to the parent as ("error", traceback) instead of dying silently."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # One real CPU device, whatever fake-device flag the caller runs under (a test session sets 8).
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags)
    try:
        side = SIDES[kind](paths, w, Path(workdir))
        conn.send("ready")
        while (request := conn.recv()) != "summary":
            conn.send(getattr(side, request)())  # "step" or "peak"
        conn.send(side.summary())
    except Exception:
        conn.send(("error", traceback.format_exc()))
        raise


class Remote:
    """A side running in its own (spawned) process."""

    def __init__(self, kind: str, paths: dict, w: Workload, workdir: Path):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(kind, child_conn, paths, w, str(workdir)), daemon=True)
        self.proc.start()
        self._expect("ready")

    def _recv(self):
        deadline = time.monotonic() + 3600
        while not self.conn.poll(1.0):
            if not self.proc.is_alive():
                raise RuntimeError(f"benchmark child exited with code {self.proc.exitcode} without answering")
            if time.monotonic() > deadline:
                raise TimeoutError("benchmark child did not answer in an hour")
        got = self.conn.recv()
        if isinstance(got, tuple) and got and got[0] == "error":
            raise RuntimeError(f"benchmark child failed:\n{got[1]}")
        return got

    def _expect(self, what):
        got = self._recv()
        if got != what:
            raise RuntimeError(f"benchmark child said {got!r}, expected {what!r}")

    def call(self, request: str):
        self.conn.send(request)
        return self._recv()

    def finish(self) -> dict:
        self.conn.send("summary")
        out = self._recv()
        self.proc.join()
        return out


def run_interleaved(paths: dict, w: Workload, workdir: Path) -> tuple[dict, dict]:
    """Both sides, their steps alternating, each bracketed by matmul-peak probes; setup runs alone."""
    jsft = Remote("jsft", paths, w, workdir)
    torch_side = Remote("torch", paths, w, workdir)
    steps = {"jsft": [], "torch": []}
    probe = jsft.call("peak")
    for _ in range(w.warmup_steps + w.steps):
        for name, side in (("jsft", jsft), ("torch", torch_side)):
            step = side.call("step")
            after = jsft.call("peak")
            steps[name].append({**step, "peaks": (probe, after)})
            probe = after
    j = {**_figures(steps["jsft"], w.warmup_steps), **jsft.finish()}
    t = {**_figures(steps["torch"], w.warmup_steps), **torch_side.finish()}
    return j, t


# ---- figures ----------------------------------------------------------------------------------------------------


# A step counts as quiet when the matmul probes on both sides of it reach this share of the run's best:
# other work on the machine then did not steal cores during it (torch's OpenMP threads in particular
# slow down far more than XLA's when a core is taken).
QUIET = 0.85


def _figures(steps: list[dict], warmup: int) -> dict:
    """Medians over the measured steps; MFU of each step against the matmul peak probed around it. A step
    that compiled a new micro-batch shape (trainer.shape_buckets) is left out: its time is compile time."""
    measured = [s for s in steps[warmup:] if not s.get("compiled")]
    if not measured:
        raise RuntimeError("every measured step compiled a new shape: run more steps (--steps)")
    best = max(max(s["peaks"]) for s in steps)
    quiet = [s for s in measured if min(s["peaks"]) >= QUIET * best]
    peak = lambda s: sum(s["peaks"]) / 2  # noqa: E731
    return {
        "tokens_per_s": statistics.median(s["real"] / s["time"] for s in measured),
        "quiet_tokens_per_s": statistics.median(s["real"] / s["time"] for s in quiet) if quiet else None,
        "quiet_steps": len(quiet),
        "step_s": statistics.median(s["time"] for s in measured),
        "mfu": statistics.median(s["flops"] / s["time"] / peak(s) for s in measured),
        "needed_flops_utilisation": statistics.median(s.get("needed_flops", s["flops"]) / s["time"] / peak(s)
                                                      for s in measured),
        "matmul_peak_flops": statistics.median(peak(s) for s in measured),
        "padding_efficiency": sum(s["real"] for s in steps) / sum(s["computed"] for s in steps),
        "first_step_s": steps[0]["time"],
        "compiled_shapes": sum(s.get("compiled", 0) for s in steps),
        "measured_steps": len(measured),
        "steps": steps,
    }


def loss_memory_figures() -> dict:
    """Temp bytes of the chunked CE vs full fp32 logits at Qwen2.5-0.5B's vocabulary and width (jsft.plan)."""
    from jsft.plan import loss_memory

    return loss_memory(vocab=151936, hidden=896, tokens=4096)


# ---- driver -----------------------------------------------------------------------------------------------------


def load_average() -> float:
    return os.getloadavg()[0]


def summarize(w: Workload, j: dict, t: dict, ce: dict, load: tuple, label: str) -> dict:
    return {
        "date": datetime.date.today().isoformat(),
        "code": label or _git_commit(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "cpu": _cpu_name(),
        "load_average": load,
        "workload": dataclasses.asdict(w),
        "ratio_tokens_per_s": j["tokens_per_s"] / t["tokens_per_s"],
        "quiet_ratio_tokens_per_s": _quiet_ratio(j, t),
        "jsft": j,
        "torch": t,
        "cross_entropy_memory": ce,
    }


def _quiet_ratio(j: dict, t: dict):
    if j["quiet_steps"] < 2 or t["quiet_steps"] < 2:
        return None
    return j["quiet_tokens_per_s"] / t["quiet_tokens_per_s"]


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def print_report(r: dict) -> None:
    j, t, ce, mib = r["jsft"], r["torch"], r["cross_entropy_memory"], 2**20
    mem = j["step_memory"]
    print(f"machine      {r['cpu']} ({r['machine']}), load {r['load_average'][0]:.1f} -> {r['load_average'][1]:.1f}")
    print(f"jsft         {j['tokens_per_s']:.0f} real tokens/s, step {j['step_s']:.2f}s, "
          f"padding efficiency {j['padding_efficiency']:.0%}, attention={j['attention_impl']}")
    print(f"torch        {t['tokens_per_s']:.0f} real tokens/s, step {t['step_s']:.2f}s, "
          f"padding efficiency {t['padding_efficiency']:.0%}")
    quiet = r["quiet_ratio_tokens_per_s"]
    print(f"ratio        jsft / torch real tokens/s = {r['ratio_tokens_per_s']:.2f}x; over quiet steps only "
          f"({j['quiet_steps']} jsft, {t['quiet_steps']} torch): {_fmt_ratio(quiet)}")
    print(f"MFU          jsft {j['mfu']:.1%}, torch {t['mfu']:.1%} of the measured fp32 matmul peak "
          f"{j['matmul_peak_flops'] / 1e9:.0f} GFLOP/s (model FLOPs of the real tokens: 6N + causal attention "
          f"per sample, logits at every token)")
    print(f"             jsft {j['needed_flops_utilisation']:.1%} counting the logits it needs (at target tokens only)")
    print(f"compile      {j['compile_s']:.1f}s: {j['compiled_shapes_ahead']} micro-batch shapes compiled and run once "
          f"before the steps (trainer.shape_buckets); first step {j['first_step_s']:.1f}s; medians over "
          f"{j['measured_steps']} measured steps ({j['compiled_shapes']} compiled a shape and are left out)")
    print(f"loss         jsft {_losses(j)}, torch {_losses(t)} (same weights, data and hyperparameters)")
    print(f"memory       params {j['param_bytes'] / mib:.0f} MiB, opt state {j['opt_state_bytes'] / mib:.0f} MiB, "
          f"micro-step temporaries {mem.get('temp_bytes', 0) / mib:.0f} MiB "
          f"(arguments {mem.get('argument_bytes', 0) / mib:.0f} MiB) for micro-batch {j['micro_batch_shape']}")
    print(f"CE memory    vocab {ce['vocab']}, {ce['tokens']} tokens: chunked loss temporaries "
          f"{ce['chunked_temp_bytes'] / mib:.0f} MiB vs full fp32 logits {ce['full_temp_bytes'] / mib:.0f} MiB")
    print(f"peak RSS     jsft {j['peak_rss'] / 2**30:.2f} GiB, torch {t['peak_rss'] / 2**30:.2f} GiB")


def _losses(side: dict) -> str:
    losses = [s["loss"] for s in side["steps"]]
    return f"{losses[0]:.3f} -> {losses[-1]:.3f}"


def _fmt_ratio(ratio) -> str:
    return f"{ratio:.2f}x" if ratio else "n/a"


def append_row(r: dict, path: Path) -> None:
    j, t = r["jsft"], r["torch"]
    w = r["workload"]
    header = (
        "| date | code | machine | model | jsft tok/s | torch tok/s | ratio (quiet steps) | jsft MFU | torch MFU "
        "| pad eff jsft / torch | compile s | step temp MiB | peak RSS jsft GiB | load |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    model = f"{w['layers']}L h{w['hidden']} v{w['vocab']}, {w['samples_per_step']} samples/step"
    row = (
        f"| {r['date']} | {r['code']} | {r['cpu']} | {model} | {j['tokens_per_s']:.0f} | {t['tokens_per_s']:.0f} "
        f"| {r['ratio_tokens_per_s']:.2f}x ({_fmt_ratio(r['quiet_ratio_tokens_per_s'])}) | {j['mfu']:.1%} | {t['mfu']:.1%} "
        f"| {j['padding_efficiency']:.0%} / {t['padding_efficiency']:.0%} | {j['compile_s']:.0f} "
        f"| {j['step_memory'].get('temp_bytes', 0) / 2**20:.0f} | {j['peak_rss'] / 2**30:.2f} "
        f"| {r['load_average'][0]:.1f}-{r['load_average'][1]:.1f} |\n"
    )
    text = path.read_text() if path.exists() else ""
    if "| date | code | machine |" not in text:
        text += ("\n" if text else "") + header
    path.write_text(text + row)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model and data: a smoke test (< 1 min)")
    p.add_argument("--steps", type=int, help="measured steps (after warm-up)")
    p.add_argument("--workdir", help="where to build the workload (default: a new temporary directory)")
    p.add_argument("--json", help="where to write the JSON (default: bench.json in the workdir)")
    p.add_argument("--no-append", action="store_true", help="do not append a row to BENCHMARKS.md")
    p.add_argument("--label", default="", help="the row's `code` column (default: the git commit)")
    args = p.parse_args(argv)
    w = QUICK if args.quick else Workload()
    if args.steps:
        w = dataclasses.replace(w, steps=args.steps)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="jsft-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    paths = prepare(workdir, w)
    j, t = run_interleaved(paths, w, workdir)
    ce = loss_memory_figures()
    report = summarize(w, j, t, ce, (load_before, load_average()), args.label)
    print_report(report)
    out = Path(args.json) if args.json else workdir / "bench.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"json         {out}")
    if not args.no_append and not args.quick:
        append_row(report, ROOT / "BENCHMARKS.md")


if __name__ == "__main__":
    main()
