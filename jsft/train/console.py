"""What a person reads on the terminal: a short config summary, step lines that fit 120 columns, and the run
info as a small table. The full record stays in files (config.yaml, metrics.jsonl, run_info.json)."""

from __future__ import annotations

from typing import Any, Mapping

WIDTH = 120

# (metric, short name, format) of the step line, in order; everything else stays in metrics.jsonl
STEP_FIELDS = [
    ("train/loss", "loss", "{:.4f}"),
    ("train/lr", "lr", "{:.2e}"),
    ("train/grad_norm", "gnorm", "{:.3g}"),
    ("train/target_tokens", "tgt", "{:,}"),
    ("train/global_tokens", "tok", "{:,}"),
    ("train/tokens_per_sec", "tok/s", "{:,.0f}"),
    ("train/mfu", "mfu", "{:.1%}"),
    ("train/step_time", "s", "{:.2f}"),
]


def _fmt(value: Any, spec: str = "{:.4g}") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and value != value:
        return "nan"
    try:
        return spec.format(value)
    except (ValueError, TypeError):
        return str(value)


def step_lines(step: int, total: int, metrics: Mapping[str, Any]) -> list[str]:
    """`step 12/200 | loss 1.2345 | lr 3.00e-04 | ...` (<= 120 columns), then the val/* metrics, wrapped."""
    head = f"step {step}/{total}"
    parts = [f"{short} {_fmt(metrics[k], spec)}" for k, short, spec in STEP_FIELDS if k in metrics]
    if metrics.get("train/skipped_steps"):
        parts.append(f"skipped {metrics['train/skipped_steps']}")
    lines = _wrap(head, parts)
    val = [f"{k.removeprefix('val/')} {_fmt(v)}" for k, v in metrics.items() if k.startswith("val/")]
    if val:
        lines += _wrap(" " * len(head) + " val", val)
    return lines


def _wrap(head: str, parts: list[str]) -> list[str]:
    lines, line = [], head
    for part in parts:
        if len(line) + 3 + len(part) > WIDTH:
            lines.append(line)
            line = " " * len(head)
        line += " | " + part
    return lines + [line]


def config_summary(cfg) -> str:
    """The few settings that say what this run is; the resolved config is in <run dir>/config.yaml."""
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.trainer
    if m.path:
        model = m.path
    elif m.init:
        init = m.init
        model = (f"random init {init.get('model_type')} hidden {init.get('hidden_size')} "
                 f"layers {init.get('num_hidden_layers')}")
    else:
        model = "(none)"
    steps = f"{t.total_training_steps} steps" if t.total_training_steps else f"{t.total_epochs} epoch(s)"
    rows = [
        ("model", f"{model}  (compute {m.dtype}, params {m.param_dtype})"),
        ("data", f"train {_files(d.train_files)}; val {_files(d.val_files)}"),
        ("batch", f"{d.train_batch_size} samples/step, micro-batch {d.micro_batch_size_per_gpu}/device, "
                  f"max_length {d.max_length}, {d.pad_mode}"),
        ("optim", f"lr {o.lr:g} {o.lr_scheduler_type}, warmup {o.lr_warmup_steps if o.lr_warmup_steps >= 0 else o.lr_warmup_steps_ratio}, "
                  f"wd {o.weight_decay:g}, clip {o.clip_grad:g}"),
        ("trainer", f"{steps}, loss {t.loss_agg_mode}, mesh {dict(t.mesh)}, run dir {t.default_local_dir}"),
    ]
    return table(rows)


def _files(files: Any) -> str:
    if not files:
        return "-"
    if isinstance(files, str):
        return files
    files = list(files)
    return files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more)"


def run_info_table(info: Mapping[str, Any]) -> str:
    """run_info.json as a few lines of `name  value`."""
    mem = info.get("step_memory_per_device") or {}
    rows = [
        ("mesh", f"{info['mesh']} over {info['devices']} device(s), {info['processes']} process(es), {info['backend']}"),
        ("parameters", f"{info['num_params']:,}: {_bytes(info['param_bytes_total'])} total, "
                       f"{_bytes(info['param_bytes_per_device'])} per device ({info['param_dtype']})"),
        ("optimizer state", f"{_bytes(info['opt_state_bytes_total'])} total, {_bytes(info['opt_state_bytes_per_device'])} "
                            f"per device, {info['opt_state_memory']}"),
        ("micro-step", f"shape {info['micro_batch_shape']}, compute {info['compute_dtype']}, "
                       f"temporaries {_bytes(mem.get('temp_bytes'))} per device"),
        ("steps", f"{info['total_steps']} optimizer steps, {info['loss_agg_mode']}"),
    ]
    return table(rows)


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def _bytes(n: Any) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)
