"""Which attention runs over rows split across the `sequence` axis: Ulysses (ulysses.py) or ring (ring.py).

    trainer.sequence_parallel=auto     Ulysses where S splits the heads (ulysses.supported), ring otherwise
    trainer.sequence_parallel=ulysses  Ulysses; heads S cannot split stop the run at start (sizes that work)
    trainer.sequence_parallel=ring     ring attention, any heads; rows in the zigzag layout (lengths % 2S == 0)
"""

from __future__ import annotations

from jsft.models import ulysses

MODES = ("auto", "ulysses", "ring")


def choose(mode: str, num_heads: int, num_kv_heads: int, s: int) -> str:
    """`ulysses` or `ring` for this model at sequence size S (ValueError for explicit Ulysses on heads it
    cannot split). At S = 1 nothing is split and the answer does not matter: `ulysses`."""
    if mode not in MODES:
        raise ValueError(f"trainer.sequence_parallel={mode!r} is not supported; allowed: {', '.join(MODES)}")
    if s == 1 or mode == "ulysses":
        ulysses.check_heads(num_heads, num_kv_heads, s)
        return "ulysses"
    if mode == "ring" or not ulysses.supported(num_heads, num_kv_heads, s):
        return "ring"
    return "ulysses"


def check_length(choice: str, row_length: int, s: int, key: str) -> None:
    """Ring rows are cut into 2S zigzag chunks: the row length must be a multiple of 2S (before any work)."""
    if choice == "ring" and s > 1 and row_length % (2 * s):
        raise ValueError(f"{key}={row_length} must be a multiple of 2 x trainer.mesh.sequence = {2 * s} with ring "
                         f"attention (each row is cut into 2S chunks for the causal load balance)")


def describe(mode: str, choice: str, num_heads: int, num_kv_heads: int, s: int, attention_impl: str) -> str:
    """The line printed with the mesh: what runs and why."""
    why = {"auto": (f"auto: S={s} splits {num_heads}/{num_kv_heads} heads" if choice == "ulysses"
                    else f"auto: S={s} cannot split {num_heads}/{num_kv_heads} heads"),
           "ulysses": "trainer.sequence_parallel=ulysses", "ring": "trainer.sequence_parallel=ring"}[mode]
    text = f"sequence parallel: {choice} ({why})"
    if choice == "ring":
        text += ", zigzag rows"
        if attention_impl != "blockwise":  # the kernels return no log-sum-exp to merge blocks with
            text += f"; each KV block attends with blockwise (attention_impl={attention_impl} serves generation only)"
    return text


def for_run(cfg, model_cfg) -> tuple[str, str]:
    """(choice, the line printed with the mesh; "" at S=1) for a run config and its model; raises before any work."""
    from jsft.config import row_length, sequence_parallel_size  # noqa: PLC0415 (the run config's S, alias included)

    s, mode = sequence_parallel_size(cfg), cfg.trainer.sequence_parallel
    choice = choose(mode, model_cfg.num_heads, model_cfg.num_kv_heads, s)
    key, row = row_length(cfg)
    check_length(choice, row, s, key)
    if s == 1:
        return choice, ""
    from jsft.models.attention import resolve_impl  # noqa: PLC0415 (attention imports ulysses, as this module)

    impl = resolve_impl(cfg.model.attention_impl, cfg.model.dtype)
    return choice, describe(mode, choice, model_cfg.num_heads, model_cfg.num_kv_heads, s, impl)
