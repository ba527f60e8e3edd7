"""The training loop. Reads top to bottom as the data flow:

    config -> set-up (tokenizer, model config, mesh, remat: train/setup.py) -> data -> model + optimizer
        -> (resume) -> steps -> checkpoints -> export

Every process runs this same code; only process 0 writes logs, metrics and run files.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import jax

import jsft.models as jm
from jsft import distributed, verl
from jsft.config import RunConfig, to_yaml
from jsft.data import fingerprint
from jsft.data.batch import BatchSpec, HostBatch, eval_steps, prepare_step
from jsft.data.pipeline import build_eval_batches, build_train_batches
from jsft.data.sources import resolve_files
from jsft.data.summary import format_summary
from jsft.data.tokenizer import describe_stop_tokens
from jsft.eval.generation import GenerationValidation
from jsft.models import lora
from jsft.models.hf_export import generation_config, model_card
from jsft.models.params import param_arrays, replace_params
from jsft.sharding import sequence_size
from jsft.train import checkpoint as ckpt
from jsft.train import run_identity
from jsft.train.console import fmt, run_info_table, wrap
from jsft.train.inflight import InFlightStep
from jsft.train.metrics import MetricsLogger
from jsft.train.optim import make_optimizer
from jsft.train.perf import device_peak_flops
from jsft.train.run_info import run_info
from jsft.train.setup import RunSetup, resolve
from jsft.train.step import TrainStep

def log(msg: str) -> None:
    if distributed.is_main():
        print(msg, flush=True)


# ---- stopping on signals --------------------------------------------------------------------------------------


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes the step, saves, and exits 0. All hosts agree."""

    def __init__(self):
        self.flag = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.flag = True

    def requested(self) -> bool:
        return bool(distributed.all_hosts([int(self.flag)]).max())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---- the run ----------------------------------------------------------------------------------------------------


def enable_compilation_cache(directory: Optional[str]) -> None:
    """JAX's persistent compilation cache: a restarted or resumed run loads its compiled programs (one per
    micro-batch shape, the update, validation, generation) instead of compiling them again."""
    if directory:
        jax.config.update("jax_compilation_cache_dir", str(Path(directory).expanduser()))
        # every program, however quick to compile: with a time threshold, whether a program is cached depends
        # on the machine's load, and a restart would compile again what its first run skipped
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


@dataclass
class Trainer:
    cfg: RunConfig
    # extra validation after val/loss and validation by generation: callables (params, step) -> metrics
    # (the demo job's tool-executing episodes, jsft/demo/job.py)
    validation_hooks: list[Callable[[dict, int], dict]] = field(default_factory=list)
    run_dir: Path = field(init=False)

    def __post_init__(self):
        cfg = self.cfg
        if not (cfg.model.path or cfg.model.init):
            raise ValueError("set model.path (a local Hugging Face checkpoint directory) or model.init (random init)")
        distributed.initialize()
        t = cfg.trainer
        verl.check_cluster(t.nnodes, t.n_gpus_per_node, t.device, jax.process_count(), jax.local_device_count(),
                           jax.default_backend())
        enable_compilation_cache(cfg.trainer.compilation_cache_dir)
        self.run_dir = Path(cfg.trainer.default_local_dir).absolute()
        distributed.check_shared_directory(self.run_dir, "trainer.default_local_dir")  # before anything writes there
        _check_paths(cfg)
        checkpoints = self.run_dir / ckpt.CHECKPOINT_SUBDIR
        run_identity.check(self.run_dir, cfg, checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()))
        self.setup: RunSetup = resolve(cfg, log)  # tokenizer, model config, mesh, remat: once, before data and weights
        self.mesh, self.tokenizer, self.feeders = self.setup.mesh, self.setup.tokenizer, self.setup.feeders
        self.lora, self.sequence_parallel = self.setup.lora, self.setup.sequence_parallel  # None: full fine-tuning
        self.remat_choice, self.stop_tokens = self.setup.remat_choice, self.setup.stop_tokens
        self._compiled_shapes: set = set()  # distinct micro-batch shapes dispatched: one compiled step each
        self._build_data()
        self._build_model()
        # only now, so that a run refused at start-up leaves no run directory behind
        if distributed.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
            run_identity.write(self.run_dir, cfg)

    def _build_data(self) -> None:
        cfg = self.cfg
        log(describe_stop_tokens(self.tokenizer))
        where = dict(process_index=jax.process_index(), process_count=jax.process_count(),
                     local_devices=self.feeders.row_blocks, feeder=(self.feeders.index, self.feeders.count))
        fingerprint.check_hosts_agree(fingerprint.inputs(cfg.data, self.tokenizer))  # before tokenizing
        self.train_data = build_train_batches(cfg.data, self.tokenizer, seed=cfg.data.seed, **where)
        log(format_summary(self.train_data.dataset, "train"))
        self.val_data = build_eval_batches(cfg.data, self.tokenizer, **where) if cfg.data.val_files else None
        if self.val_data is not None:
            log(format_summary(self.val_data.dataset, "val"))
        fingerprint.check_hosts_agree(fingerprint.samples(self.train_data, self.val_data))
        per_epoch = self.train_data.steps_per_epoch
        self.total_steps = cfg.trainer.total_training_steps or cfg.trainer.total_epochs * per_epoch
        self.dropped_per_epoch = len(self.train_data.dataset) - per_epoch * cfg.data.train_batch_size
        dropped = (f" ({self.dropped_per_epoch:,} samples per epoch left out: the last partial batch of the "
                   "shuffled order, different samples each epoch)") if self.dropped_per_epoch else ""
        log(f"{per_epoch} optimizer steps per epoch of {cfg.data.train_batch_size} samples{dropped}; "
            f"training for {self.total_steps} steps; loss_agg_mode={cfg.trainer.loss_agg_mode}")

    def _build_model(self) -> None:
        cfg, run = self.cfg, self.setup
        if cfg.model.path:
            self.model = jm.from_pretrained(cfg.model.path, **run.model_kwargs())
        else:
            model_cfg = run.model_config
            self.model = jm.init_model(model_cfg, seed=cfg.trainer.seed, **run.model_kwargs())
            log(f"random init: {model_cfg.model_type}, {model_cfg.num_layers} layers, hidden {model_cfg.hidden_size}, "
                f"{model_cfg.num_heads}/{model_cfg.num_kv_heads} heads, vocab {model_cfg.vocab_size}")
        if self.lora:
            self.model = lora.attach(self.model, self.lora, mesh=self.mesh, seed=cfg.trainer.seed,
                                     adapter_path=cfg.model.lora_adapter_path)
            log(f"LoRA {self.lora}: {len(lora.trainable_names(self.model))} adapter tensors trained, the base frozen")
        self.generation_config = generation_config([cfg.model.path, cfg.data.tokenizer], run.stop_token_ids,
                                                   self.model.config)
        self.optimizer = make_optimizer(cfg.optim, self.total_steps)
        self.step_fn = TrainStep(self.model, self.optimizer, self.mesh, chunk_size=cfg.trainer.loss_chunk_size,
                                 offload_opt_state=cfg.optim.offload_state, moe=run.moe)
        self.params = param_arrays(self.model)
        self.opt_state = self.step_fn.init_opt_state(self.params)
        self.generation_validation = None
        if cfg.trainer.val_generations:
            self.generation_validation = GenerationValidation(cfg, self.tokenizer, self.model, self.mesh,
                                                              self.run_dir, log=log)

    # ---- checkpoints -------------------------------------------------------------------------------------------

    def _meta(self, step: int, metrics: dict) -> dict:
        return {
            "step": step,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)},
            "generation_config": self.generation_config,
            "stop_tokens": list(self.stop_tokens),
            "data_state": self.train_data.get_state(),
            "model_config": ckpt.model_config_to_json(self.model.config),
            "param_dtype": str(self.model.param_dtype),  # of the base (model.frozen_param_dtype with LoRA)
            "lora": lora.spec_to_json(self.lora),
            "base_model": self.cfg.model.path,
            "frozen_base_saved": not self._base_from_path(),
            "seed": self.cfg.trainer.seed,
            "config": to_yaml(self.cfg),
            "tokenizer": str(self.run_dir / "tokenizer"),
        }

    def _resume(self, manager) -> int:
        """The step to continue from (0 for a fresh run), restoring params, optimizer and data state."""
        t = self.cfg.trainer
        if t.resume_mode == "disable":
            return 0
        if t.resume_mode == "resume_path":
            manager, step = ckpt.locate(t.resume_from_path)
        else:
            step = manager.latest_step()
            if step is None:
                return 0
        params = ckpt.abstract_like(self._saved(self.params))
        restored = ckpt.restore(manager, step, params=params, opt_state=ckpt.abstract_like(self.opt_state))
        self.params, self.opt_state = {**self.params, **restored["params"]}, restored["opt_state"]
        self.train_data.set_state(restored["meta"]["data_state"])
        log(f"resumed from step {step} of {manager.directory}")
        return int(restored["meta"]["step"])

    def _base_from_path(self) -> bool:
        """LoRA on a model.path base: checkpoints hold the adapters only; the frozen base is re-read from there."""
        return bool(self.lora and self.cfg.model.path)

    def _saved(self, params: dict) -> dict:
        return self.step_fn.split(params)[0] if self._base_from_path() else params

    # ---- steps -------------------------------------------------------------------------------------------------

    def batch_spec(self) -> BatchSpec:
        """How this run's host rows become the step's micro-batches (jsft/data/batch.py), training and
        validation alike."""
        cfg = self.cfg
        return BatchSpec(self.train_data.layout, cfg.data.max_length, cfg.trainer.loss_agg_mode,
                         cfg.trainer.shape_buckets, sequence_size(self.mesh), self.sequence_parallel == "ring",
                         self.feeders.leaders)

    def _train_step(self, step: int, batch: HostBatch, pending: Optional[InFlightStep] = None) -> InFlightStep:
        """Prepare and dispatch one optimizer step; returns without waiting for the device (see inflight.py).
        A step with a new micro-batch shape compiles while dispatching: `pending` is waited on first, so the
        compile counts in this step's time (a step the plot leaves out), not in the previous one's."""
        t0 = time.perf_counter()
        g = prepare_step(batch, self.batch_spec())
        shapes = {(mb.input_ids.shape, mb.target_pos.shape) for mb in g.micro_batches}
        if pending is not None and not shapes <= self._compiled_shapes:
            pending.wait()
        self._compiled_shapes |= shapes
        dispatch_begin = time.perf_counter()
        device_batches = [self.step_fn.device_batch(mb) for mb in g.micro_batches]
        self.params, self.opt_state, loss, stats = self.step_fn.train_step_stats(self.params, self.opt_state, device_batches)
        c = g.counts
        host = {
            "epoch": batch.epoch,
            "train/target_tokens": c.target_tokens,
            "train/global_tokens": c.tokens,
            "train/target_token_ratio": c.target_tokens / max(c.tokens, 1),
            "train/samples": c.samples,
            "train/micro_batches": len(g.micro_batches),
            "train/compiled_shapes": len(self._compiled_shapes),  # grows when a step compiled a new shape
            "train/padding_efficiency": c.tokens / max(g.computed_tokens, 1),
        }
        flops = self.model.config.flops_per_token(c.tokens / max(c.samples, 1)) * c.tokens
        return InFlightStep.dispatched(step, t0, loss, stats, host, c.tokens, flops, dispatch_begin)

    def validate(self, step: int) -> dict:
        """val/loss over the whole validation set, normalised like training (global counts of the set), then
        validation by generation (trainer.val_generations) and the extra hooks."""
        counts, chunks = eval_steps(self.val_data, self.batch_spec())
        total = sum(float(self.step_fn.eval_loss(self.params, [self.step_fn.device_batch(mb) for mb in micro]))
                    for micro in chunks)
        metrics = {"val/loss": total, "val/target_tokens": counts.target_tokens}
        if self.generation_validation is not None:
            metrics.update(self.generation_validation(self.params, step))
        for hook in self.validation_hooks:
            metrics.update(hook(self.params, step))
        return metrics

    # ---- main loop ---------------------------------------------------------------------------------------------

    def run(self) -> dict:
        cfg, t = self.cfg, self.cfg.trainer
        manager = ckpt.open_manager(self.run_dir / ckpt.CHECKPOINT_SUBDIR, max_to_keep=t.max_ckpt_to_keep)
        if t.resume_mode == "disable" and manager.all_steps():  # starting over here: an older step would block saving
            log(f"trainer.resume_mode=disable: removing the earlier run's checkpoints {list(manager.all_steps())} "
                f"in {manager.directory}")
            for old in manager.all_steps():
                manager.delete(old)
        start = self._resume(manager)
        if start >= self.total_steps:
            manager.close()
            log(_complete_message(self.run_dir, start, self.total_steps))
            return {"step": start, "complete": True}
        if distributed.is_main() and start == 0:
            self.tokenizer.save_pretrained(self.run_dir / "tokenizer")
        self.peak_flops = device_peak_flops(cfg.model.dtype, t.peak_tflops)
        info = run_info(self, self.peak_flops)
        info["dropped_samples_per_epoch"] = self.dropped_per_epoch
        log("run info (run_info.json):\n" + run_info_table(info))
        if distributed.is_main():
            (self.run_dir / "run_info.json").write_text(json.dumps(info, indent=2))
        stop = StopRequest()
        per_epoch = self.train_data.steps_per_epoch
        test_freq, save_freq = (per_epoch if f == "after_each_epoch" else f for f in (t.test_freq, t.save_freq))
        last: dict = {}
        metrics_logger = MetricsLogger(
            self.run_dir, t.logger, distributed.is_main(), self.total_steps, t.project_name, t.experiment_name,
            config_dict=json.loads(json.dumps(_as_dict(cfg), default=str)), start_step=start + 1,
        )
        pending, done, stopping = None, None, False  # the step dispatched last iteration, unread; when the one before ended

        def finish(p: InFlightStep, following: Optional[InFlightStep] = None) -> None:  # read, log, check a step
            nonlocal done, last
            metrics, skips, _ = p.read(done, self.peak_flops)
            if (metrics["train/mfu"] or 0) > 1 and jax.default_backend() == "cpu":
                # CPU's peak is a matmul probed at start; a step that beat it means the probe ran on a busy
                # host: probe again and keep the higher rate (MFU above 100% would be a measurement error)
                self.peak_flops = max(self.peak_flops, device_peak_flops(cfg.model.dtype))
                metrics["train/mfu"] = p.flops / metrics["train/step_time"] / self.peak_flops
            done = p.end_for(following)
            metrics_logger.log(p.step, metrics)
            last = {"step": p.step, **metrics}
            self._check_skips(skips)

        try:
            for step in range(start + 1, self.total_steps + 1):
                # checked before dispatching: a signal during step - 1 stops at its end, with no step after it
                stopping = stop.requested()
                if stopping:
                    if pending is not None:  # not saved yet (a saved step is never left pending)
                        finish(pending)
                        ckpt.save(manager, pending.step, params=self._saved(self.params), opt_state=self.opt_state,
                                  meta=self._meta(pending.step, last))
                        pending = None
                    break
                current = self._train_step(step, next(self.train_data), pending)  # dispatched: the device is busy
                if pending is not None:
                    finish(pending, current)  # step - 1, read while `step` runs
                final = step == self.total_steps
                if self.val_data is not None and (final or (test_freq > 0 and step % test_freq == 0)):
                    current.wait()  # the step's time ends here, not after its validation
                    current.extra.update(self.validate(step))
                if final or (save_freq > 0 and step % save_freq == 0):
                    finish(current)  # read now: a checkpoint's metadata carries its step's figures
                    current = None
                    ckpt.save(manager, step, params=self._saved(self.params), opt_state=self.opt_state,
                              meta=self._meta(step, last))
                pending = current
            if pending is not None:
                finish(pending)
            if stopping:
                log(f"stop requested: saved step {last['step']}, exiting" if last else
                    "stop requested before the first step: nothing trained")
        finally:
            manager.wait_until_finished()
            manager.close()
            metrics_logger.close()
            stop.restore()
        if t.export_hf and last.get("step") == self.total_steps:
            model = self.trained_model()
            if self.lora:
                adapter = lora.save_adapter(model, self.run_dir / "adapter", base_model_name_or_path=cfg.model.path)
                log(f"exported PEFT adapter to {adapter}")
                model = lora.merge(model)
            out = jm.save_pretrained(
                model, self.run_dir / "hf", tokenizer=self.tokenizer, generation_config=self.generation_config,
                readme=model_card(cfg, last["step"], last, self.stop_tokens),
            )
            log(f"exported Hugging Face checkpoint to {out}" + (" (LoRA merged)" if self.lora else ""))
        log(self._where_everything_is(last))
        return last

    def _where_everything_is(self, last: dict) -> str:
        d = self.run_dir
        lines = [f"run directory {d}"]
        if last:
            keys = [k for k in last if k in ("train/loss", "val/loss") or k.endswith(("_rate", "_match"))]
            lines += wrap(f"  step {last['step']}:", [f"{k} {fmt(last[k])}" for k in keys], sep=", ")
        items = [
            ("config.yaml", "resolved config"), ("run_info.json", "mesh, parameter and memory figures"),
            ("metrics.jsonl", "one JSON object per optimizer step (python -m jsft.plot " + str(d) + ")"),
            ("checkpoints", "orbax checkpoints (python -m jsft.export --checkpoint " + str(d) + " --out DIR)"),
            ("samples", "validation generations, samples/step_N.jsonl"), ("hf", "Hugging Face export"),
            ("adapter", "PEFT LoRA adapter (peft.PeftModel.from_pretrained(base, dir))"),
            ("demo", "generated dataset and tokenizer"), ("tensorboard", "TensorBoard logs"),
        ]
        lines += [f"  {name:<14} {what}" for name, what in items if (d / name).exists()]
        return "\n".join(lines)

    def trained_model(self):
        """The model with the current (trained) parameters."""
        return replace_params(self.model, self.params)

    def _check_skips(self, n: int) -> None:
        """n: consecutive non-finite steps up to the step just read."""
        limit = self.cfg.optim.max_consecutive_skips
        if n >= limit:
            raise RuntimeError(
                f"{n} consecutive optimizer steps had a non-finite loss or gradient (optim.max_consecutive_skips="
                f"{limit}); aborting. Check the data (inspect it with python -m jsft.inspect), lower optim.lr, "
                "or use model.dtype=float32"
            )


def _check_paths(cfg: RunConfig) -> None:
    """Fail before any work on missing inputs; jsft never downloads from a hub."""
    if not cfg.data.train_files:
        demo = " (demo.enabled: the demo job runs through python -m jsft.train, jsft.demo.job.train)"
        raise ValueError("data.train_files is not set" + (demo if cfg.demo.enabled else ""))
    for key, value in (("model.path", cfg.model.path), ("data.tokenizer", cfg.data.tokenizer)):
        if value and not Path(value).is_dir():
            raise FileNotFoundError(f"{key}={value}: no such directory (jsft loads local checkpoints only)")
    if cfg.model.path and not (Path(cfg.model.path) / "config.json").is_file():
        raise FileNotFoundError(f"model.path={cfg.model.path} has no config.json: not a Hugging Face checkpoint directory")
    for key, files in (("data.train_files", cfg.data.train_files), ("data.val_files", cfg.data.val_files)):
        if files:
            try:
                resolve_files(files)  # missing inputs, unknown types, a DatasetDict: refused before any work
            except (ValueError, FileNotFoundError) as e:
                raise type(e)(f"{key}: {e}") from None


def _complete_message(run_dir: Path, step: int, total: int) -> str:
    return (
        f"{run_dir} is complete: its checkpoint is at step {step} of {total}; nothing to train. To train more, "
        "raise trainer.total_training_steps (or trainer.total_epochs); to start over, set trainer.resume_mode=disable "
        "or a new trainer.default_local_dir"
    )


def _as_dict(cfg: RunConfig) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)


def train(cfg: RunConfig) -> dict:
    return Trainer(cfg).run()
