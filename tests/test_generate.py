"""The KV-cache sampler against transformers' generate and against full forward passes, sharded and not."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jsft.models as jm
from jsft.generate import Generator, _generate_jit, _run, cut_at_eos, decode_step, generate, left_pad, prefill
from jsft.models.params import param_arrays
from jsft.sharding import make_mesh

from jsft_processes import run_processes

# different lengths; one is longer than MIN_BUCKET, so the batch pads to 32
PROMPTS = [[5, 6, 7, 8, 9], list(range(20, 39)), [100, 3, 4]]
MAX_NEW = 12


def _hf_greedy(ref, prompt, eos_ids):
    """transformers' greedy continuation of one unpadded prompt (new tokens only, EOS included)."""
    ids = torch.tensor([prompt])
    ref.generation_config.eos_token_id = None  # the config's default EOS (llama: 2) must not stop the free run
    with torch.no_grad():
        out = ref.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW,
            eos_token_id=eos_ids, pad_token_id=0,
        )
    return out[0, len(prompt):].tolist()


def _eos_that_stops_a_row(free_runs):
    """A token greedy decoding reaches after a few steps in some row and is no row's first token, so EOS
    stopping is exercised mid-generation rather than at step 0 or never."""
    firsts = {run[0] for run in free_runs}
    for run in free_runs:
        for t in run[2:]:
            if t not in firsts:
                return t
    raise AssertionError(f"no usable EOS in {free_runs}")


def _sharpened(tiny_hf, kind):
    """A tiny checkpoint whose attention is peaked: at init scale it is near uniform, and greedy tokens
    would not notice a decode step fed the wrong position."""
    path, ref = tiny_hf(kind)
    with torch.no_grad():
        for layer in ref.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    ref.save_pretrained(path)
    return path, ref


@pytest.mark.parametrize("kind", ["qwen2", "llama3"])
def test_greedy_matches_transformers_with_eos(tiny_hf, kind):
    path, ref = _sharpened(tiny_hf, kind)
    model = jm.from_pretrained(path, dtype="float32")
    free = [_hf_greedy(ref, p, eos_ids=None) for p in PROMPTS]
    assert all(0 not in run for run in free)  # so eos_ids={0} means "never stop"
    assert generate(model, PROMPTS, max_new_tokens=MAX_NEW, eos_ids={0}) == free
    eos = _eos_that_stops_a_row(free)
    expected = [_hf_greedy(ref, p, eos_ids=[eos]) for p in PROMPTS]
    assert any(len(e) < MAX_NEW for e in expected)
    assert generate(model, PROMPTS, max_new_tokens=MAX_NEW, eos_ids=[eos]) == expected


def test_decoding_stops_once_every_row_has_emitted_eos(tiny_hf):
    path, _ = _sharpened(tiny_hf, "qwen2")
    model = jm.from_pretrained(path, dtype="float32")
    free = generate(model, PROMPTS, max_new_tokens=MAX_NEW, eos_ids={0})
    eos = {run[2] for run in free}  # every row emits one of these by its third token
    first_eos = [next(i for i, t in enumerate(run) if t in eos) for run in free]
    tokens, steps = _run(model, PROMPTS, MAX_NEW, eos, temperature=0.0, top_p=1.0, seed=0, pad_id=7)
    assert steps == max(first_eos) < MAX_NEW - 1
    for row, run, i in zip(tokens, free, first_eos):
        assert list(row[: i + 1]) == run[: i + 1]
        assert (row[i + 1 :] == 7).all()


def test_cut_at_eos():
    assert cut_at_eos([4, 2, 7, 2], {2}) == [4, 2]
    assert cut_at_eos([2, 9], {9, 2}) == [2]
    assert cut_at_eos([4, 5, 6], {2}) == [4, 5, 6]


@pytest.mark.parametrize("attention_impl", ["xla", "auto"])
def test_cache_decode_logits_match_full_forward(tiny_hf, attention_impl):
    path, _ = tiny_hf("qwen3")  # qk-norm and a head_dim that differs from hidden/heads
    model = jm.from_pretrained(path, dtype="float32", attention_impl=attention_impl)
    rows = np.random.RandomState(0).randint(0, 512, (2, 30)).astype(np.int32)
    prompt_lens, steps = [4, 19], 8
    ids, lengths = left_pad([r[:n] for r, n in zip(rows, prompt_lens)], rows=2, pad_id=0)
    cache = jm.init_cache(model.config, 2, ids.shape[1] + steps, jnp.float32)
    step = nnx.jit(decode_step)  # eager op-by-op dispatch of the scanned layers is slow on CPU
    logits, cache = nnx.jit(prefill)(model, jnp.asarray(ids), jnp.asarray(lengths), cache)
    got = [logits]
    for s in range(steps):
        tokens = np.array([r[n + s] for r, n in zip(rows, prompt_lens)], np.int32)
        logits, cache = step(model, jnp.asarray(tokens), jnp.asarray(lengths) + s, cache)
        got.append(logits)
    got = np.stack(got, axis=1)  # [B, steps + 1, V]
    for b, n in enumerate(prompt_lens):
        full = np.asarray(model(jnp.asarray(rows[b : b + 1])))[0]  # [T, V], unpadded
        np.testing.assert_allclose(got[b], full[n - 1 : n + steps], atol=1e-4, rtol=0)


def test_sampling_is_seeded(tiny_hf):
    path, _ = tiny_hf("qwen2")
    model = jm.from_pretrained(path, dtype="float32")
    run = lambda **kw: generate(model, PROMPTS, max_new_tokens=MAX_NEW, eos_ids={0}, **kw)  # noqa: E731
    a, b, c = run(temperature=1.0, seed=3), run(temperature=1.0, seed=3), run(temperature=1.0, seed=4)
    assert a == b
    assert a != c
    assert a != run()  # sampling from a random model's flat distribution is not greedy
    # a nucleus smaller than the top token's probability keeps only the argmax: sampling becomes greedy
    assert run(temperature=1.0, top_p=1e-6, seed=3) == run()
    assert run(temperature=1.0, top_p=0.5, seed=3) != a


def test_fsdp_mesh_and_new_params_reuse_the_compiled_program(tiny_hf):
    path, _ = tiny_hf("qwen2")
    plain = generate(jm.from_pretrained(path, dtype="float32"), PROMPTS, max_new_tokens=MAX_NEW, eos_ids={0})
    model = jm.from_pretrained(path, dtype="float32", mesh=make_mesh({"fsdp": -1}))
    assert model.layers["q_proj"][...].sharding.spec[1] == "fsdp"
    generator = Generator(model, max_new_tokens=MAX_NEW, eos_ids={0})
    params = param_arrays(model)
    assert generator(params, PROMPTS) == plain  # 3 rows padded to 8, split over 8 devices
    compiled = _generate_jit._cache_size()
    changed = jax.tree.map(lambda p: p * 1.5, params)
    shorter = [p[:-1] for p in PROMPTS]  # same bucket
    assert generator(changed, shorter) != generator(params, shorter)  # parameters are inputs, not constants
    assert _generate_jit._cache_size() == compiled


def test_two_processes_generate_what_one_process_generates(tiny_hf, tmp_path):
    """Generation under jax.distributed (2 processes x 4 CPU devices, gloo): every process passes the same
    prompts, rows are split over the 8 devices of both, and process 0 gets the single-process tokens."""
    path, _ = _sharpened(tiny_hf, "qwen2")
    plain = generate(jm.from_pretrained(path, dtype="float32"), PROMPTS, max_new_tokens=MAX_NEW, eos_ids={0})
    assert len({tuple(t) for t in plain}) == len(PROMPTS)  # distinct continuations: a meaningful comparison
    worker = Path(__file__).with_name("generate_worker.py")
    cmd = [sys.executable, str(worker), path, str(tmp_path / "out.json"), json.dumps(PROMPTS), str(MAX_NEW)]
    run_processes([cmd, cmd])
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["devices"] == 8
    assert result["tokens"] == [list(map(int, t)) for t in plain]
