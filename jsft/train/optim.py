"""Optimizer: optax AdamW + global-norm clipping + lr schedule, skipping non-finite steps.

One call of the optimizer's `update` is one OPTIMIZER step. Gradient accumulation happens before it: the
trainer sums micro-batch gradients, already normalised by the global counts (see loss.py), in float32
(jsft/train/step.py) and the optimizer runs once on the sum. We do not use `optax.MultiSteps`:
it runs the inner optimizer on every micro step and keeps its result only on the last, and after one
non-finite micro-batch its accumulator stays NaN for good (it resets with `0 * acc`), so every later step
would be skipped.

The chain, outermost last:

    apply_if_finite(clip_by_global_norm -> scale_by_adam -> add_decayed_weights(mask))
      -> inject_hyperparams(scale_by_learning_rate)(schedule)

A step whose gradient has a NaN/Inf leaves parameters and Adam moments untouched and is counted, while the
schedule still advances, as in veRL (it skips `optimizer.step()` but always steps the lr scheduler); the
trainer aborts after `optim.max_consecutive_skips`. The lr sits in the state, so what is logged is what
was applied.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from jsft.config import OptimConfig

# apply_if_finite gives up and applies a non-finite update after this many skips; the trainer aborts long
# before (optim.max_consecutive_skips), so in practice it never does.
_NEVER_APPLY_NON_FINITE = 2**31 - 1


def warmup_steps(optim_cfg: OptimConfig, total_steps: int) -> int:
    """optim.lr_warmup_steps when >= 0, else int(lr_warmup_steps_ratio * total optimizer steps) (veRL)."""
    if optim_cfg.lr_warmup_steps >= 0:
        return optim_cfg.lr_warmup_steps
    return int(optim_cfg.lr_warmup_steps_ratio * total_steps)


def make_schedule(optim_cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """lr as a function of the optimizer step (0-based): linear warmup from 0, then the scheduler's shape.

    constant: lr. cosine: cosine from lr to min_lr_ratio * lr at total_steps. wsd: lr, then linear decay
    to min_lr_ratio * lr over the last wsd_decay_ratio * total_steps steps.
    """
    lr, kind = optim_cfg.lr, optim_cfg.lr_scheduler_type
    warmup = warmup_steps(optim_cfg, total_steps)
    min_lr = optim_cfg.min_lr_ratio * lr
    if kind == "constant":
        after = optax.constant_schedule(lr)
    elif kind == "cosine":
        after = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1), alpha=optim_cfg.min_lr_ratio)
    elif kind == "wsd":
        decay = int(optim_cfg.wsd_decay_ratio * total_steps)
        stable = max(total_steps - decay - warmup, 0)
        after = optax.join_schedules(
            [optax.constant_schedule(lr), optax.linear_schedule(lr, min_lr, decay)], [stable]
        )
    else:
        raise ValueError(f"optim.lr_scheduler_type={kind!r} is not supported; allowed: constant, cosine, wsd")
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: all but those with 'norm' or 'bias' in a path key."""

    def decays(path, _):
        names = [_key_name(k).lower() for k in path]
        return not any("norm" in n or "bias" in n for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW with clipping, the lr schedule and the non-finite skip; `update` once per optimizer step."""
    b1, b2 = optim_cfg.betas
    inner = [
        optax.scale_by_adam(b1=b1, b2=b2, eps=optim_cfg.eps),
        optax.add_decayed_weights(
            optim_cfg.weight_decay, mask=decay_mask if optim_cfg.no_decay_norms_and_biases else None
        ),
    ]
    if optim_cfg.clip_grad > 0:
        inner.insert(0, optax.clip_by_global_norm(optim_cfg.clip_grad))
    return optax.chain(
        optax.apply_if_finite(optax.chain(*inner), max_consecutive_errors=_NEVER_APPLY_NON_FINITE),
        # Outside apply_if_finite, so the schedule counts every optimizer step, skipped or not.
        optax.inject_hyperparams(optax.scale_by_learning_rate)(learning_rate=make_schedule(optim_cfg, total_steps)),
    )


def _get(opt_state: Any, key: str) -> jax.Array:
    return optax.tree_utils.tree_get(opt_state, key)


def skipped_steps(opt_state: Any) -> jax.Array:
    """Optimizer steps skipped so far because the gradient was not finite (train/skipped_steps)."""
    return _get(opt_state, "total_notfinite")


def consecutive_skips(opt_state: Any) -> jax.Array:
    """Non-finite steps in a row up to the last one; the trainer aborts at optim.max_consecutive_skips."""
    return _get(opt_state, "notfinite_count")


def current_lr(opt_state: Any) -> jax.Array:
    """The lr applied by the last `update` (schedule(0) before the first): train/lr."""
    return _get(opt_state, "hyperparams")["learning_rate"]
