"""Which processes feed which rows of a micro-batch: "feeders", read off the mesh.

A micro-batch [rows, length] is split rows over the batch axes (data x fsdp: one "row block" per position)
and tokens over `sequence`. The devices of one row block hold the same rows; when a sequence group spans
processes (trainer.mesh.sequence larger than a process's devices), several processes hold the same row
blocks. Processes holding the same row blocks form one feeder: each builds the same whole rows (the same
samples, packed the same way) and passes them with the global shape, and each device takes its token slice
(`jax.make_array_from_process_local_data`: a dimension whose local size equals the global one is looked up,
not concatenated). The data pipeline shards samples over the feeders, not over processes, and host-side
counts (samples, target tokens) are summed over one process per feeder, so nothing counts twice.

    2 processes x 4 devices, {fsdp: 2, sequence: 4}: row block 0 on process 0, 1 on 1 -> 2 feeders of 1 block
    2 processes x 4 devices, {sequence: 8}:          row block 0 on both processes  -> 1 feeder of 1 block
    4 processes x 2 devices, {fsdp: 2, sequence: 4}: block 0 on processes 0, 1; block 1 on 2, 3 -> 2 feeders

A layout where two processes share some row blocks but not all (sequence groups straddling processes
unevenly) cannot be fed this way and is refused (run_mesh names sequence sizes that work).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from jsft.sharding import ACTIVATION_RULES


@dataclass(frozen=True)
class Feeders:
    index: int  # this process's feeder (the pipeline's shard index)
    count: int  # distinct feeders (the pipeline's shard count)
    row_blocks: int  # row blocks per feeder: a feeder's micro-batch has row_blocks x micro_batch_size_per_gpu rows
    leaders: tuple[int, ...]  # the first process of each feeder, in feeder order: whose host counts are summed


def row_feeders(devices: np.ndarray, axis_names: Sequence[str], process_index: int) -> Feeders:
    """Feeders of a device grid (`mesh.devices`, any objects with .process_index) with these axis names,
    seen from process `process_index`; ValueError for a layout that cannot be fed."""
    names = list(axis_names)
    batch = [names.index(a) for a in ACTIVATION_RULES["batch"] if a in names]
    rest = [i for i in range(len(names)) if i not in batch]
    grid = np.transpose(np.asarray(devices, dtype=object), batch + rest)
    n_blocks = int(np.prod([grid.shape[i] for i in range(len(batch))]))
    grid = grid.reshape(n_blocks, -1)  # [row block, devices holding it]
    blocks: dict[int, set[int]] = {}  # process -> the row blocks its devices hold
    for b in range(n_blocks):
        for d in grid[b]:
            blocks.setdefault(int(d.process_index), set()).add(b)
    groups = sorted({tuple(sorted(s)) for s in blocks.values()})  # a feeder per distinct set, by first block
    held = [b for g in groups for b in g]
    if len(held) != len(set(held)) or len({len(g) for g in groups}) != 1:
        shown = "; ".join(f"process {p}: row blocks {sorted(s)}" for p, s in sorted(blocks.items()))
        raise ValueError(f"processes hold overlapping or unequal sets of micro-batch rows ({shown}): processes "
                         "that share rows must hold the same rows, so that they can feed them together")
    if process_index not in blocks:
        raise ValueError(f"process {process_index} holds no device of the mesh")
    mine = tuple(sorted(blocks[process_index]))
    leaders = tuple(min(p for p, s in blocks.items() if tuple(sorted(s)) == g) for g in groups)
    return Feeders(index=groups.index(mine), count=len(groups), row_blocks=len(mine), leaders=leaders)


def mesh_feeders(mesh: Mesh, process_index: Optional[int] = None) -> Feeders:
    """Feeders of the run's mesh, for this process (or `process_index`)."""
    return row_feeders(mesh.devices, mesh.axis_names, jax.process_index() if process_index is None else process_index)
