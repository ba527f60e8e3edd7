"""Export streams: the gather programs hold one layer (or one block) per device, never a whole stacked
parameter, measured with XLA's memory analysis and with the live device arrays during a real export."""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import jsft.models as jm
from jsft.models import hf_io
from jsft.sharding import make_mesh

LAYERS, D, F, V = 6, 256, 1024, 4096


def _abstract(shape, spec):
    return jax.ShapeDtypeStruct(shape, np.float32, sharding=NamedSharding(make_mesh({"fsdp": -1}), P(*spec)))


def test_gathering_a_layer_costs_one_layer_per_device_not_the_stack():
    stacked = _abstract((LAYERS, D, F), (None, "fsdp", None))
    layer = D * F * 4
    per_layer = hf_io.gather_device_bytes(stacked, ("layer",))
    whole = hf_io.gather_device_bytes(stacked, ("whole",))  # what process_allgather of the stack costs
    assert layer <= per_layer <= 1.25 * layer
    # a minor sharded dimension too (gathered major-first, no transposed full-size copy)
    assert hf_io.gather_device_bytes(_abstract((LAYERS, D, F), (None, None, "fsdp")), ("layer",)) <= 1.25 * layer
    assert whole >= LAYERS * layer
    # one process owning all devices keeps the slice sharded: an eighth of a layer per device
    assert hf_io.gather_device_bytes(stacked, ("layer",), across_processes=False) <= 1.25 * layer / 8


def test_an_unstacked_tensor_moves_in_blocks_of_its_unsharded_dimension():
    embed = _abstract((V, D), ("fsdp", None))
    limit = D * F * 4  # the largest layer tensor
    block = limit * D // (V * D * 4)
    assert hf_io.gather_device_bytes(embed, ("block", 1, block)) <= 1.25 * limit
    assert hf_io.gather_device_bytes(embed, ("whole",)) >= V * D * 4


def test_gathers_reassemble_the_tensor_exactly():
    mesh = make_mesh({"fsdp": -1})
    value = np.arange(8 * 10, dtype=np.float32).reshape(8, 10)
    x = jax.device_put(value, NamedSharding(mesh, P("fsdp", None)))
    # blocks of 3 columns: starts 0, 3, 6, 9 (clamped to 7)
    got = hf_io.gather_whole(x, limit_bytes=3 * 8 * 4, across_processes=True)
    np.testing.assert_array_equal(got, value)
    layers = np.arange(2 * 5 * 16, dtype=np.float32).reshape(2, 5, 16)
    stacked = jax.device_put(layers, NamedSharding(mesh, P(None, None, "fsdp")))
    for across in (True, False):
        np.testing.assert_array_equal(hf_io.gather_layer(stacked, 1, across_processes=across), layers[1])


def _device_bytes() -> int:
    """Bytes of the distinct device buffers alive (shard views of one array alias its buffers)."""
    buffers = {}
    for a in jax.live_arrays():
        for shard in a.addressable_shards:
            buffers[(shard.device.id, shard.data.unsafe_buffer_pointer())] = shard.data.nbytes
    return sum(buffers.values())


def test_live_device_bytes_during_export_stay_below_one_layer(tiny_hf, tmp_path, monkeypatch):
    path, _ = tiny_hf("qwen2", num_hidden_layers=4)
    model = jm.from_pretrained(path, dtype="float32", mesh=make_mesh({"fsdp": -1}))
    baseline = _device_bytes()
    peak = []
    to_host = hf_io._to_host

    def measured(gather, x, index):
        out = gather.program(x, index)
        peak.append(_device_bytes() - baseline)
        return to_host(gather._replace(program=lambda *_: out), x, index)

    monkeypatch.setattr(hf_io, "_to_host", measured)
    jm.save_pretrained(model, tmp_path / "hf")
    cfg = model.config
    largest_layer = 4 * max(cfg.intermediate_size * cfg.hidden_size, cfg.num_heads * cfg.head_dim * cfg.hidden_size)
    stacked = cfg.num_layers * largest_layer
    assert peak and max(peak) <= largest_layer < stacked
