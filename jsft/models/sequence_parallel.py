"""Which attention runs over rows split across the `sequence` axis: Ulysses (ulysses.py) or ring (ring.py).

    trainer.sequence_parallel=auto     Ulysses where S splits the heads (ulysses.supported), ring otherwise
    trainer.sequence_parallel=ulysses  Ulysses; heads S cannot split stop the run at start (sizes that work)
    trainer.sequence_parallel=ring     ring attention, any heads; rows in the zigzag layout (lengths % 2S == 0)
"""

from __future__ import annotations

from jsft.config import SEQUENCE_PARALLEL_MODES as MODES
from jsft.config import check_ring_length as check_length  # noqa: F401 (the ring length rule, as this module names it)
from jsft.models import ulysses


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
