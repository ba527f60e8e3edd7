"""KV-cache generation for jsft decoders: one prefill pass over the prompts, then one token per step.

    from jsft.generate import generate
    new_tokens = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=64, eos_ids={2})   # greedy

A batch is left-padded to a power-of-two bucket P. Padding slots are segment 0, so attention never looks
at them, and each row's positions start at 0 at its own first token:

    cache slot   0  1  2  3 | 4   5   ...     P prompt slots, then one slot per decode step
    row 0        .  .  a  b | g0  g1          (. = padding, segment 0)
    positions    -  -  0  1 | 2   3
    row 1        c  d  e  f | h0  h1
    positions    0  1  2  3 | 4   5

Left padding puts every row's last prompt token in the same slot, so the prefill's next-token logits are
one slice and each decode step writes all rows into one cache slot.

Sliding-window layers and attention sinks use the same cache: a MASKED cache (every slot kept; a window
layer's attention masks the slots more than `window` positions back), not a rolling one, so its memory is
that of full attention.

Prefill and the decode loop (a `lax.while_loop` that exits once every row has emitted EOS) are ONE jitted
program: one dispatch per call and no host round trip per token. It is compiled once per model structure,
parameter shardings, batch size, prompt bucket, `max_new_tokens` and sampling mode (greedy / temperature /
top-p); temperature, top_p, seed and the parameter values are traced, so validation that calls it every
`test_freq` steps with new parameters reuses the compiled program (see `Generator`).
"""

from __future__ import annotations

from functools import partial
from typing import Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jsft.models.decoder import Decoder, init_cache
from jsft.models.params import replace_params
from jsft.sharding import batch_sharding, data_parallel_size

MIN_BUCKET = 16  # shortest padded prompt length: tiny prompts all share one compiled program


# ---- the model side: prefill and one decode step ----------------------------------------------------------------


def _last_logits(model: Decoder, hidden) -> jax.Array:
    """fp32 next-token logits [B, V] from the last position of hidden [B, T, D] (never all T positions)."""
    return model.logits(hidden[:, -1])


def prefill(model: Decoder, ids, lengths, cache):
    """Run left-padded prompts ids [B, P] (real lengths [B]) through the model in one pass, filling the cache.
    Returns (next-token logits [B, V], cache)."""
    pad = ids.shape[1] - lengths  # [B]
    slot = jnp.arange(ids.shape[1])[None, :]  # [1, P]
    segment_ids = (slot >= pad[:, None]).astype(jnp.int32)  # [B, P]
    positions = jnp.maximum(slot - pad[:, None], 0).astype(jnp.int32)  # [B, P]
    hidden, cache = model.hidden_states(ids, positions, segment_ids, cache=cache)
    return _last_logits(model, hidden), cache


def decode_step(model: Decoder, tokens, positions, cache):
    """Feed one token per row (tokens, positions [B]) at the cache's next slot. Returns (logits [B, V], cache)."""
    column = lambda x: x[:, None]  # noqa: E731  [B] -> [B, 1]
    hidden, cache = model.hidden_states(column(tokens), column(positions), column(jnp.ones_like(tokens)), cache=cache)
    return _last_logits(model, hidden), cache


# ---- sampling ---------------------------------------------------------------------------------------------------


def _top_p_logits(logits, top_p):
    """Mask all but the smallest set of most likely tokens whose probability reaches top_p (nucleus)."""
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V], descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # a token is kept while the mass above it is < top_p
    keep = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1), 1)  # [B], at least the argmax
    threshold = jnp.take_along_axis(sorted_logits, keep[:, None] - 1, axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample(logits, key, temperature, top_p, *, greedy: bool, nucleus: bool) -> jax.Array:
    """Next tokens [B] from fp32 logits [B, V]: argmax when greedy, else temperature (and top-p) sampling."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if nucleus:
        logits = _top_p_logits(logits, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ---- the compiled program ---------------------------------------------------------------------------------------


def _in_compute_dtype(graphdef, state) -> Decoder:
    """The model with its parameters cast to the compute dtype once, not in every decode step (the decoder
    casts on each call, so the values are the same)."""
    dtype = nnx.merge(graphdef, state).dtype
    cast = lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
    return nnx.merge(graphdef, jax.tree.map(cast, state))


def _generate_tokens(
    graphdef, state, ids, lengths, eos_mask, key, temperature, top_p, pad_id,
    *, max_new_tokens: int, greedy: bool, nucleus: bool, mesh: Optional[Mesh],
):
    """(new tokens [B, max_new_tokens], decode steps run). After a row's first EOS (and in rows of length 0,
    which only pad the batch) the tokens are pad_id."""
    model = _in_compute_dtype(graphdef, state)
    batch, prompt_len = ids.shape
    cache = init_cache(model.config, batch, prompt_len + max_new_tokens, model.dtype)
    pick = partial(sample, temperature=temperature, top_p=top_p, greedy=greedy, nucleus=nucleus)

    logits, cache = prefill(model, ids, lengths, cache)
    key, sub = jax.random.split(key)
    first = pick(logits, sub)
    done = (lengths == 0) | eos_mask[first]
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(jnp.where(lengths == 0, pad_id, first))

    def running(carry):
        step, _, done, _, _ = carry
        return (step < max_new_tokens - 1) & ~jnp.all(done)

    def step_fn(carry):
        step, out, done, cache, key = carry
        logits, cache = decode_step(model, out[:, step], lengths + step, cache)
        key, sub = jax.random.split(key)
        token = pick(logits, sub)
        out = out.at[:, step + 1].set(jnp.where(done, pad_id, token))
        return step + 1, out, done | eos_mask[token], cache, key

    steps, out, _, _, _ = jax.lax.while_loop(running, step_fn, (jnp.int32(0), out, done, cache, key))
    if mesh is not None:  # replicated, so every process can read every row
        out = jax.lax.with_sharding_constraint(out, NamedSharding(mesh, P()))
    return out, steps


# the graphdef (model structure and static config) is hashable, so models of one structure share programs
_generate_jit = jax.jit(
    _generate_tokens, static_argnums=(0,), static_argnames=("max_new_tokens", "greedy", "nucleus", "mesh")
)


# ---- host side --------------------------------------------------------------------------------------------------


def bucket(n: int) -> int:
    """Padded prompt length: the next power of two (at least MIN_BUCKET), so lengths share compiled programs."""
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


def left_pad(prompts: Sequence[Sequence[int]], rows: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """ids [rows, bucket] int32 with each prompt right-aligned, and lengths [rows] (0 for filler rows)."""
    width = bucket(max(len(p) for p in prompts))
    ids = np.full((rows, width), pad_id, np.int32)
    lengths = np.zeros((rows,), np.int32)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        lengths[i] = len(p)
    return ids, lengths


def cut_at_eos(tokens: Iterable[int], eos_ids: set[int]) -> list[int]:
    """Tokens up to and including the first EOS (all of them when there is none)."""
    out = []
    for t in tokens:
        out.append(int(t))
        if t in eos_ids:
            break
    return out


def _mesh_of(state) -> Optional[Mesh]:
    """The mesh the parameters live on (None for single-device parameters)."""
    sharding = jax.tree.leaves(state)[0].sharding
    return sharding.mesh if isinstance(sharding, NamedSharding) else None


def _global(x: np.ndarray, mesh: Optional[Mesh]) -> jax.Array:
    """A host array (the same on every process) as a device array, rows split over the batch axes."""
    if mesh is None:
        return jnp.asarray(x)
    return jax.make_array_from_callback(x.shape, batch_sharding(mesh, x.ndim), lambda index: x[index])


def generate(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_ids: Iterable[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    pad_id: int = 0,
) -> list[list[int]]:
    """The new tokens of each prompt, each cut after its first EOS. Greedy when temperature == 0.

    Under a mesh (parameters with NamedShardings), rows are padded to a multiple of the data-parallel
    devices and split over them; every process must pass the same prompts and gets every row back."""
    eos = {int(e) for e in eos_ids}
    tokens, _ = _run(model, prompts, max_new_tokens, eos, temperature, top_p, seed, pad_id)
    return [cut_at_eos(row, eos) for row in tokens]


def _run(model, prompts, max_new_tokens, eos, temperature, top_p, seed, pad_id) -> tuple[np.ndarray, int]:
    """Validate, lay out and run one batch: (tokens [len(prompts), max_new_tokens], decode steps run)."""
    vocab = model.config.vocab_size
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompts")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not eos or not all(0 <= e < vocab for e in eos):
        raise ValueError(f"eos_ids {sorted(eos)} must be non-empty token ids in [0, {vocab})")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature={temperature}, top_p={top_p}")
    graphdef, state = nnx.split(model)
    mesh = _mesh_of(state)
    dp = 1 if mesh is None else data_parallel_size(mesh)
    ids, lengths = left_pad(prompts, -(-len(prompts) // dp) * dp, pad_id)
    eos_mask = np.zeros((vocab,), bool)
    eos_mask[sorted(eos)] = True
    out, steps = _generate_jit(
        graphdef, state, _global(ids, mesh), _global(lengths, mesh), eos_mask, jax.random.key(seed),
        np.float32(temperature), np.float32(top_p), np.int32(pad_id),
        max_new_tokens=max_new_tokens, greedy=temperature == 0, nucleus=top_p < 1, mesh=mesh,
    )
    return np.asarray(out)[: len(prompts)], int(steps)


class Generator:
    """Fixed generation settings for one model structure, called with new parameters (the trainer's flat
    'layers/q_proj' -> array dict) at every validation. Only the parameter values change between calls, so
    the compiled program is reused."""

    def __init__(self, template: Decoder, *, max_new_tokens: int, eos_ids: Iterable[int], temperature: float = 0.0,
                 top_p: float = 1.0, pad_id: int = 0):
        self.template = template  # structure and static config; its own parameter values are not used
        self.settings = dict(max_new_tokens=max_new_tokens, eos_ids=set(eos_ids), temperature=temperature,
                             top_p=top_p, pad_id=pad_id)

    def __call__(self, params: dict[str, jax.Array], prompts: Sequence[Sequence[int]], *, seed: int = 0):
        """generate() with these settings and `params` in place of the template's parameters."""
        return generate(replace_params(self.template, params), prompts, seed=seed, **self.settings)
