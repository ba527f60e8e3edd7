"""Ring attention (trainer.sequence_parallel=ring): the loss and every gradient equal S=1's for S = 2, 4, 8
on packed rows with several samples, padding, GQA, and 6 query heads / 2 KV heads that Ulysses cannot split
at S=4 or 8; the zigzag layout changes no number; auto picks ring where Ulysses cannot split the heads."""

import jax
import numpy as np
import pytest

from jsft.config import OptimConfig
from jsft.data.batch import WeightedRows, fit_shapes, zigzag_order
from jsft.models.params import init_model, param_arrays
from jsft.models.sequence_parallel import choose
from jsft.sharding import make_mesh
from jsft.train.optim import make_optimizer
from jsft.train.step import TrainStep
from test_sequence_parallel import T, _assert_same, _config, _rows, _weighted

HEADS = dict(heads=6, kv_heads=2)  # Ulysses splits these at S=2 only


def _micro_batch(s, zigzag):
    rows = _rows(np.random.default_rng(0))
    return rows, fit_shapes([_weighted(rows)], 4, multiple=s, zigzag=zigzag)[0]


def _loss_and_grads(cfg, s, *, zigzag=True, dtype="float32"):
    mesh = make_mesh({"sequence": s}, devices=jax.devices()[:8])
    model = init_model(cfg, seed=0, mesh=mesh, dtype=dtype, attention_impl="blockwise", remat_policy="full",
                       sequence_parallel="ring")
    step = TrainStep(model, make_optimizer(OptimConfig(), 10), mesh, chunk_size=32)
    loss, grads = step.gradients(param_arrays(model), [step.device_batch(_micro_batch(s, zigzag)[1])])
    return float(loss), {k: np.asarray(v, np.float32) for k, v in grads.items()}


def test_ring_loss_and_gradients_match_sequence_1():
    """Remat full (the default). S=2 in plain token order, S=4 and 8 in zigzag order (S=8: 8 tokens per
    device, two chunks of 4), so the zigzag changes no number either."""
    cfg = _config(**HEADS)
    ref = _loss_and_grads(cfg, 1)
    _assert_same(ref, _loss_and_grads(cfg, 2, zigzag=False), 1e-5)
    for s in (4, 8):
        _assert_same(ref, _loss_and_grads(cfg, s), 1e-5)


def test_ring_bf16_matches_sequence_1():
    """bf16 activations: the ring sums each query's blocks in another order than one blockwise pass (the
    online-lse merge rescales partial outputs, rounded to bf16 at the block's output like S=1's), so values
    agree to bf16's precision: 2e-2 of the largest gradient is a few ulps (2^-8), as Ulysses' bf16 test."""
    cfg = _config(**HEADS)
    _assert_same(_loss_and_grads(cfg, 1, dtype="bfloat16"), _loss_and_grads(cfg, 4, dtype="bfloat16"), 2e-2)


def test_zigzag_layout_keeps_every_target():
    """Device d holds chunks d and 2S-1-d; each target slot still points at the hidden state of the token
    before its label, so the target-only logits gather reads the same (token, label) pairs."""
    assert zigzag_order(8, 2).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    rows, mb = _micro_batch(4, zigzag=True)
    _, plain = _micro_batch(4, zigzag=False)
    length = mb.input_ids.shape[1]
    assert length % 8 == 0 and mb.target_pos.shape == plain.target_pos.shape
    order = zigzag_order(length, 4)
    for k in ("input_ids", "segment_ids", "positions"):
        np.testing.assert_array_equal(getattr(mb, k), getattr(plain, k)[:, order])
    np.testing.assert_array_equal(order[mb.target_pos], plain.target_pos)  # same predicting tokens
    np.testing.assert_array_equal(mb.target_ids, plain.target_ids)
    np.testing.assert_array_equal(mb.target_weight, plain.target_weight)
    with pytest.raises(ValueError, match="multiple of 8"):
        fit_shapes([WeightedRows(rows.input_ids[:, :60], rows.segment_ids[:, :60], rows.positions[:, :60],
                                 np.zeros((8, 60), np.float32))], 4, multiple=4, zigzag=True)


def test_zigzag_balances_the_live_tiles():
    """One causal row of 1024 tokens at S=4, 64-token tiles: the live (query tile, key tile) pairs each
    device visits over the ring. Contiguous: device 3 does 5.8x device 0's work (and the ring waits for it);
    zigzag: all equal, 34 = 136 / 4."""
    from jsft.models.blockwise import _live_pairs, window_data

    def per_device(order, s=4, tile=64):
        pos = np.asarray(order, np.int32).reshape(s, -1)
        seg = np.ones_like(pos)
        def live(d, j):  # fully visible + partly masked tiles (split=1: whole tiles in both lists)
            _, full, _, part = _live_pairs((seg[d:d + 1], seg[j:j + 1], pos[d:d + 1], pos[j:j + 1], window_data(None)),
                                           tile, tile)
            return int(full) + int(part)

        return [sum(live(d, j) for j in range(s)) for d in range(s)]

    plain, zigzag = per_device(np.arange(1024)), per_device(zigzag_order(1024, 4))
    assert sum(plain) == sum(zigzag) == 16 * 17 // 2  # the causal half of 16 x 16 tiles, diagonal included
    assert plain == [10, 26, 42, 58] and zigzag == [34] * 4, (plain, zigzag)


def test_auto_picks_ring_where_ulysses_cannot_split_and_explicit_ulysses_names_ring():
    assert choose("auto", 8, 2, 4) == "ulysses" and choose("auto", 6, 2, 4) == "ring"
    assert choose("auto", 14, 2, 4) == "ring" and choose("auto", 4, 2, 8) == "ring"  # Qwen2.5-0.5B; S > heads
    assert choose("ring", 8, 2, 4) == "ring" and choose("auto", 6, 2, 1) == "ulysses"
    with pytest.raises(ValueError, match=r"cannot split 6 query heads.*or trainer.sequence_parallel=ring"):
        choose("ulysses", 6, 2, 4)


def test_ring_config_keys_fail_at_load():
    from jsft.config import load_config

    base = ["model.init={model_type: qwen2, vocab_size: 64}", "trainer.mesh.sequence=4"]
    load_config(None, base + ["data.max_length=260", "trainer.sequence_parallel=ulysses"])
    with pytest.raises(ValueError, match="data.max_length=258 must be a multiple of the sequence-parallel size 4"):
        load_config(None, base + ["data.max_length=258"])
    with pytest.raises(ValueError, match=r"data.max_length=260 must be a multiple of 2 x trainer.mesh.sequence = 8"):
        load_config(None, base + ["data.max_length=260", "trainer.sequence_parallel=ring"])
    with pytest.raises(ValueError, match="trainer.sequence_parallel='zigzag' is not supported; allowed: auto, ulysses, ring"):
        load_config(None, base + ["data.max_length=256", "trainer.sequence_parallel=zigzag"])


def test_run_mesh_prints_the_choice_and_checks_auto_ring_lengths():
    """auto -> ring is known once the heads are: the 2S length check runs at start, before any data."""
    from jsft.config import load_config
    from jsft.models.sequence_parallel import describe
    from jsft.train.setup import run_mesh

    init = "model.init={model_type: qwen2, vocab_size: 64, hidden_size: 48, num_attention_heads: 6, num_key_value_heads: 2}"
    lines = []
    run_mesh(load_config(None, [init, "trainer.mesh.sequence=4", "data.max_length=256"]), lines.append)
    assert lines == ["mesh {data: 1, fsdp: 2, sequence: 4} (trainer.mesh=auto): the largest fsdp dividing 2 devices "
                     "that splits every parameter of >= 1048576 elements; sequence parallel: ring (auto: S=4 cannot "
                     "split 6/2 heads), zigzag rows"], lines
    with pytest.raises(ValueError, match="data.max_length=260 must be a multiple of 2 x trainer.mesh.sequence = 8"):
        run_mesh(load_config(None, [init, "trainer.mesh.sequence=4", "data.max_length=260"]))
    # GPU defaults: the packed kernels return no lse, so ring's blocks attend with blockwise, and it says so
    assert "each KV block attends with blockwise (attention_impl=pallas_gpu serves generation only)" in describe(
        "ring", "ring", 8, 2, 4, "pallas_gpu")


def test_trainer_with_ring_reproduces_sequence_1_and_resumes_with_sequence_1(sft_setup, tmp_path, capsys):
    """The tiny model's 4 query heads cannot split over S=8, so `auto` picks ring (printed with the mesh):
    the loss curve and validation loss of sequence=1, and its step-2 checkpoint continues with S=1."""
    from jsft.train.__main__ import main
    from jsft_testing import losses, sft_overrides

    # one micro-batch shape per run (shape_buckets=1): a third of the compiles; bucketed zigzag rows are
    # covered above
    extra = {"data.val_files": sft_setup["val"], "trainer.total_training_steps": 3, "trainer.shape_buckets": 1}
    assert main(sft_overrides(sft_setup, tmp_path / "s1", **extra)) == 0
    ring = sft_overrides(sft_setup, tmp_path / "ring", **{**extra, "trainer.save_freq": 2})
    capsys.readouterr()
    assert main(ring + ["trainer.mesh.sequence=8"]) == 0
    assert "sequence: 8}" in (out := capsys.readouterr().out) and "sequence parallel: ring (auto: S=8 cannot split 4/2 heads)" in out
    one, eight = losses(tmp_path / "s1"), losses(tmp_path / "ring")
    np.testing.assert_allclose([eight[s] for s in (1, 2, 3)], [one[s] for s in (1, 2, 3)], rtol=1e-5)
    val = [__import__("json").loads(line)["val/loss"] for d in ("s1", "ring") for line in open(tmp_path / d / "metrics.jsonl")
           if "val/loss" in line]
    assert val[1] == pytest.approx(val[0], rel=1e-5)
    resumed = sft_overrides(sft_setup, tmp_path / "resumed", **{
        **extra, "trainer.resume_mode": "resume_path", "trainer.resume_from_path": str(tmp_path / "ring" / "checkpoints" / "2")})
    assert main(resumed) == 0
    assert losses(tmp_path / "resumed")[3] == pytest.approx(one[3], rel=1e-5)


def _attention_loss_and_grads(mode, s, impl="blockwise", zigzag=False):
    """attention() with a traced window of 12 (shorter than most samples, crossing the S blocks' edges), sinks
    and a softcap on the 8 packed rows, rows split over S devices: sum(out * weights) and d(q, k, v, sinks).
    Zigzag: every per-token array enters in zigzag order (as the trainer's rows), so the numbers are the same."""
    import jax.numpy as jnp

    from jsft.models import attention as A
    from jsft_testing import dense_attention

    rows = _rows(np.random.default_rng(1))
    seg, pos = jnp.asarray(rows.segment_ids), jnp.asarray(rows.positions)
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    q, k, v = (jax.random.normal(key, (8, T, n, 16)) for key, n in zip(keys, (4, 2, 2)))
    sinks = jnp.asarray([0.5, -1.0, 2.0, 0.0], jnp.float32)
    weights = jax.random.normal(keys[3], q.shape) * (seg > 0)[..., None, None]
    order = zigzag_order(T, s) if zigzag else np.arange(T)

    def loss(q, k, v, sinks, window):
        ids = dict(q_segment_ids=seg[:, order], q_positions=pos[:, order])
        ids.update(kv_segment_ids=ids["q_segment_ids"], kv_positions=ids["q_positions"])
        out = A.attention(q[:, order], k[:, order], v[:, order], impl=impl, sequence_parallel=mode, window=window,
                          sinks=sinks, softcap=4.0, **ids)
        return jnp.sum(out * weights[:, order])

    with jax.set_mesh(make_mesh({"sequence": s}, devices=jax.devices()[:8])):
        value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, sinks, jnp.int32(12))
    result = float(value), {name: np.asarray(g) for name, g in zip(("q", "k", "v", "sinks"), grads)}
    if s == 1:  # S=1 itself equals the dense definition (jsft_testing.dense_attention)
        ref = lambda q, k, v, sinks: jnp.sum(dense_attention(  # noqa: E731
            q, k, v, seg, seg, pos, pos, window=12, sinks=sinks, softcap=4.0) * weights)
        ref_value, ref_grads = jax.value_and_grad(ref, argnums=(0, 1, 2, 3))(q, k, v, sinks)
        _assert_same((float(ref_value), dict(zip(("q", "k", "v", "sinks"), map(np.asarray, ref_grads)))), result,
                     1e-5)
    return result


@pytest.mark.parametrize("mode, impl", [("ring", "blockwise"), ("ulysses", "blockwise"), ("ulysses", "pallas_gpu")])
def test_window_sinks_softcap_under_sequence_parallelism_match_sequence_1(mode, impl, monkeypatch):
    """Ring: the window follows positions across the blocks that travel the ring (S=4 in zigzag order), sinks
    join once in the final merge; Ulysses: each device the sinks of its heads (S=4 repeats the 2 kv heads).
    Loss and d(q, k, v, sinks) at S=2, 4 equal S=1's, which equals the dense definition."""
    from jsft.models import attention as A

    monkeypatch.setattr(A, "BLOCK", 32)  # 64-token rows: blockwise (not the one-tile xla shortcut) inside Ulysses
    ref = _attention_loss_and_grads(mode, 1, impl)
    for s in (2, 4):
        _assert_same(ref, _attention_loss_and_grads(mode, s, impl, zigzag=mode == "ring" and s == 4), 1e-5)
