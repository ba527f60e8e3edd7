"""Feeders: which processes feed which micro-batch rows, read off meshes of fake devices (a process index
each, laid out host by host as jax.make_mesh does), for 1, 2 and 4 processes with sequence groups inside
a process or spanning several; an irregular layout fails at start naming sizes that work."""

from types import SimpleNamespace

import jax
import numpy as np
import pytest

from jsft.config import load_config
from jsft.sharding import MESH_AXES, make_mesh
from jsft.train import setup as run_mesh_module
from jsft.train.feeders import Feeders, mesh_feeders, row_feeders


def _grid(processes: int, per_process: int, data: int, fsdp: int, seq: int, expert: int = 1) -> np.ndarray:
    devices = [SimpleNamespace(id=i, process_index=i // per_process) for i in range(processes * per_process)]
    return np.array(devices, dtype=object).reshape(data, fsdp, seq, expert)  # MESH_AXES order


def _all(grid) -> list[Feeders]:
    processes = sorted({d.process_index for d in grid.flat})
    return [row_feeders(grid, MESH_AXES, p) for p in processes]


@pytest.mark.parametrize("processes, per, sizes, expect", [
    # (data, fsdp, sequence) -> per process (index, count, row_blocks), leaders
    (1, 8, (1, 2, 4), ([(0, 1, 2)], (0,))),
    (1, 8, (2, 4, 1), ([(0, 1, 8)], (0,))),
    (2, 4, (1, 8, 1), ([(0, 2, 4), (1, 2, 4)], (0, 1))),  # no sequence axis: one feeder per process
    (2, 4, (1, 2, 4), ([(0, 2, 1), (1, 2, 1)], (0, 1))),  # S=4 within each process
    (2, 4, (1, 1, 8), ([(0, 1, 1), (0, 1, 1)], (0,))),  # S=8 spans both: they feed the same rows
    (4, 2, (1, 2, 4), ([(0, 2, 1), (0, 2, 1), (1, 2, 1), (1, 2, 1)], (0, 2))),  # S=4 spans pairs
    (4, 2, (2, 1, 4), ([(0, 2, 1), (0, 2, 1), (1, 2, 1), (1, 2, 1)], (0, 2))),  # rows over data instead
    (4, 4, (1, 2, 8), ([(0, 2, 1), (0, 2, 1), (1, 2, 1), (1, 2, 1)], (0, 2))),
    (4, 2, (1, 1, 8), ([(0, 1, 1)] * 4, (0,))),
])
def test_feeders_of_meshes(processes, per, sizes, expect):
    per_process, leaders = expect
    got = _all(_grid(processes, per, *sizes))
    assert [(f.index, f.count, f.row_blocks) for f in got] == per_process
    assert all(f.leaders == leaders for f in got)


def test_a_sequence_group_straddling_processes_unevenly_is_refused():
    # 2 processes x 6 devices, S=4: row block 1 has devices on both processes, blocks 0 and 2 on one each
    with pytest.raises(ValueError, match=r"process 0: row blocks \[0, 1\]; process 1: row blocks \[1, 2\]"):
        row_feeders(_grid(2, 6, 1, 3, 4), MESH_AXES, 0)


def test_the_real_mesh_of_one_process():
    assert mesh_feeders(make_mesh({"sequence": 4}, devices=jax.devices()[:8])) == Feeders(0, 1, 2, (0,))
    assert mesh_feeders(make_mesh({"data": 2, "fsdp": 4})) == Feeders(0, 1, 8, (0,))


def test_run_mesh_names_sequence_sizes_that_work(monkeypatch):
    """Devices 0-2 on one process, 3-7 on another (uneven, to get an irregular layout out of 8 devices):
    only S=8 lets both processes feed the same rows; run_mesh says so before any work."""
    uneven = lambda mesh: row_feeders(  # noqa: E731
        np.vectorize(lambda d: SimpleNamespace(id=d.id, process_index=int(d.id >= 3)), otypes=[object])(mesh.devices),
        mesh.axis_names, 0)
    monkeypatch.setattr(run_mesh_module, "mesh_feeders", uneven)
    cfg = load_config(None, ["model.init={model_type: qwen2, vocab_size: 64, hidden_size: 64, intermediate_size: 64, "
                             "num_attention_heads: 8, num_key_value_heads: 2}", "data.max_length=256",
                             "trainer.mesh.sequence=4"])
    with pytest.raises(ValueError, match=r"trainer.mesh.sequence=4: processes hold overlapping.*"
                                         r"use trainer.mesh.sequence in \[8\]"):
        run_mesh_module.run_mesh(cfg)
