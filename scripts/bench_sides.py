"""The two sides of the bench, each in its own (spawned) process, one optimizer step per request.

  jsft   the real pipeline (tokenized dataset -> first-fit packed rows) and `TrainStep`, one CPU device,
         under one of bench_workload.SETTINGS (defaults: remat chosen by memory as the trainer does);
  torch  transformers' Qwen2ForCausalLM (sdpa attention), micro-batches of `torch_micro_batch` samples in
         dataset order padded to their longest sample (what veRL / TRL do without varlen flash attention).

The parent interleaves the sides' steps (jsft step s, torch step s, jsft step s+1, ...), so that load from
other work on the machine hits all alike and the ratios stay meaningful on a shared box.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

from bench_workload import Workload, jsft_config, sample_flops


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class JsftSide:
    """jsft's real data pipeline and TrainStep on one CPU device."""

    def __init__(self, paths: dict, w: Workload, workdir: Path, settings: str):
        import jsft.models as jm
        from jsft.data.batch import BatchSpec, largest_micro_batch
        from jsft.data.pipeline import build_train_batches
        from jsft.data.tokenizer import load_tokenizer
        from jsft.models.params import param_arrays
        from jsft.sharding import make_mesh
        from jsft.train import setup
        from jsft.train.optim import make_optimizer
        from jsft.train.step import TrainStep

        self.cfg = cfg = jsft_config(paths, w, workdir, settings)
        self.settings = settings
        mesh = make_mesh({"fsdp": -1})
        self.data = build_train_batches(cfg.data, load_tokenizer(paths["tokenizer"]), seed=0, process_index=0,
                                        process_count=1, local_devices=1)
        run = setup.resolve(cfg, tokenizer=False)  # the remat policy as the trainer resolves it
        policy, self.remat_choice = run.remat_policy, run.remat_choice
        self.model = jm.from_pretrained(paths["model"], dtype=cfg.model.dtype, mesh=mesh, remat_policy=policy,
                                        attention_impl=cfg.model.attention_impl)
        self.step_fn = TrainStep(self.model, make_optimizer(cfg.optim, w.warmup_steps + w.steps), mesh,
                                 chunk_size=cfg.trainer.loss_chunk_size)
        self.params = param_arrays(self.model)
        self.opt_state = self.step_fn.init_opt_state(self.params)
        layout = self.data.layout
        self.spec = BatchSpec(layout, cfg.data.max_length, cfg.trainer.loss_agg_mode, cfg.trainer.shape_buckets)
        self.example = self.step_fn.device_batch(largest_micro_batch(layout.rows_per_micro_batch, layout.row_length))
        self.memory = self.step_fn.memory_analysis(self.params, self.opt_state, self.example)
        rerun = build_train_batches(cfg.data, load_tokenizer(paths["tokenizer"]), seed=0, process_index=0,
                                    process_count=1, local_devices=1)
        self.compile_s, self.shapes = self._compile_shapes([next(rerun) for _ in range(w.warmup_steps + w.steps)])

    def _prepare(self, batch):
        from jsft.data.batch import prepare_step

        return prepare_step(batch, self.spec)

    def _compile_shapes(self, batches) -> tuple[float, int]:
        """Compile (and run once) every micro-batch shape the run's steps will use, so that the measured
        steps time steady-state training; the compile cost is reported on its own."""
        shapes = {}
        for batch in batches:
            for mb in self._prepare(batch).micro_batches:
                shapes.setdefault((mb.input_ids.shape, mb.target_pos.shape), mb)
        self.seen_shapes = set(shapes)  # counted here, not through jax's private jit cache size
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
        self.params, self.opt_state, loss, _ = self.step_fn.train_step_stats(self.params, self.opt_state, batches)
        loss = float(loss)  # waits for the step
        shapes = {(mb.input_ids.shape, mb.target_pos.shape) for mb in g.micro_batches}
        new_shapes = len(shapes - self.seen_shapes)  # a shape not compiled ahead: this step compiled it
        self.seen_shapes |= shapes
        lengths = [n for mb in g.micro_batches for n in _segment_lengths(mb.segment_ids)]
        flops = sample_flops(self.model.config, lengths)
        c = self.model.config  # the unembedding is needed at target tokens only (6 FLOPs per weight)
        needed = flops - 6 * c.vocab_size * c.hidden_size * (g.counts.tokens - g.counts.target_tokens)
        return {"time": time.perf_counter() - t, "real": g.counts.tokens, "computed": g.computed_tokens,
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
            "micro_batch_shape": list(self.example.input_ids.shape),
            "attention_impl": self.model.attention_impl,
            "settings": self.settings,
            "remat_policy": self.model.remat_policy,
            "remat_choice_s": self.remat_choice.compile_s if self.remat_choice else None,
            "micro_batch_size_per_gpu": self.cfg.data.micro_batch_size_per_gpu,
            "loss_chunk_size": self.cfg.trainer.loss_chunk_size,
            "devices": jax.device_count(),
            "peak_rss": peak_rss(),
        }


def _segment_lengths(segment_ids):
    import numpy as np

    return [int(n) for row in np.asarray(segment_ids) for n in np.bincount(row)[1:] if n]


class TorchSide:
    """transformers' Qwen2 + torch AdamW; micro-batches of `torch_micro_batch` samples in dataset order,
    each padded to its longest sample; token-mean loss over the step, like jsft's default."""

    def __init__(self, paths: dict, w: Workload, workdir: Path, settings: str = "tuned"):
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


def _side_class(kind: str, root: Optional[str]):
    """SIDES[kind] of this checkout, or of the checkout at `root` (another commit's jsft, driven by that
    commit's own bench_sides.py, so that its API need not match this one's)."""
    if root is None:
        return SIDES[kind]
    for name in ("bench_sides", "bench_workload"):
        sys.modules.pop(name, None)
    sys.path[:0] = [root, str(Path(root) / "scripts")]
    return importlib.import_module("bench_sides").SIDES[kind]


def serve(kind: str, settings: str, conn, paths: dict, w: Workload, workdir: str, root: Optional[str] = None) -> None:
    """Child process: build one side, then answer "step" requests until "summary". An exception is sent
    to the parent as ("error", traceback) instead of dying silently."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # One real CPU device, whatever fake-device flag the caller runs under (a test session sets 8).
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags)
    try:
        side = _side_class(kind, root)(paths, w, Path(workdir), settings)
        conn.send("ready")
        while (request := conn.recv()) != "summary":
            conn.send(getattr(side, request)())  # "step" or "peak"
        conn.send(side.summary())
    except Exception:
        conn.send(("error", traceback.format_exc()))
        raise


class Remote:
    """A side running in its own (spawned) process."""

    def __init__(self, kind: str, settings: str, paths: dict, w: Workload, workdir: Path, root: Optional[str] = None):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(kind, settings, child_conn, paths, w, str(workdir), root),
                                daemon=True)
        self.proc.start()

    def ready(self) -> "Remote":
        """Waits until the side is built."""
        self._expect("ready")
        return self

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


def run_interleaved(paths: dict, w: Workload, workdir: Path, settings: list[str],
                    other_trees: Optional[dict[str, str]] = None, parallel_setup: bool = False) -> tuple[dict, list]:
    """A jsft side per settings name (and per settings name and other checkout: `other_trees` {label: root},
    side `jsft@label:settings`) and the torch side, their steps alternating, each step bracketed by
    matmul-peak probes. Each side is set up alone (so that its compile time is its own), or with
    `parallel_setup` all at once (quicker; compile times then overlap). Returns ({name: [step records]},
    [(name, summary)])."""
    kinds = {f"jsft:{s}": ("jsft", s, None) for s in settings}
    for label, root in (other_trees or {}).items():
        kinds |= {f"jsft@{label}:{s}": ("jsft", s, root) for s in settings}
    kinds["torch"] = ("torch", "tuned", None)
    sides = {}
    for name, (kind, s, root) in kinds.items():
        sides[name] = Remote(kind, s, paths, w, workdir, root)
        if not parallel_setup:
            sides[name].ready()
    if parallel_setup:
        for side in sides.values():
            side.ready()
    prober = next(iter(sides.values()))
    steps = {name: [] for name in sides}
    probe = prober.call("peak")
    for _ in range(w.warmup_steps + w.steps):
        for name, side in sides.items():
            step = side.call("step")
            after = prober.call("peak")
            steps[name].append({**step, "peaks": (probe, after)})
            probe = after
    return steps, [(name, side.finish()) for name, side in sides.items()]
