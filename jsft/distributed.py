"""Multi-host start-up: `jax.distributed.initialize` from the standard variables or the scheduler's.

Which variables decide (first match wins):

    JAX_COORDINATOR_ADDRESS   host:port, with JAX_NUM_PROCESSES, JAX_PROCESS_ID and optionally
                              JAX_LOCAL_DEVICE_IDS (what scripts/launch/jobset.yaml sets on Kubernetes)
    SLURM (srun)              SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID:
                              the coordinator is the first node of the step, port JAX_COORDINATOR_PORT or
                              one derived from the job id (jax's SlurmCluster); only when SLURM_NTASKS > 1
    Open MPI (mpirun)         OMPI_MCA_orte_hnp_uri / OMPI_COMM_WORLD_*, through jax's OmpiCluster
    JSFT_AUTO_DISTRIBUTED=1   whatever else jax detects (TPU pods, Kubernetes with the `kubernetes` package)

JSFT_AUTO_DISTRIBUTED=0 turns detection off (one process, whatever the scheduler says). On the CPU
backend, collectives across processes go through gloo.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import jax

_initialized = False
# how long a host waits for a file another host wrote to appear (shared filesystems cache directory listings)
SHARED_FS_WAIT_S = 30.0


@dataclass(frozen=True)
class ClusterParams:
    source: str  # "jax_env" | "slurm" | "ompi" | "auto"
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    local_device_ids: Optional[list[int]] = None


def detect() -> Optional[ClusterParams]:
    """The distributed parameters the environment implies, or None for a plain single process."""
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if v not in env]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} is not: set both")
        local = env.get("JAX_LOCAL_DEVICE_IDS")
        return ClusterParams(
            "jax_env", env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"]),
            [int(x) for x in local.split(",")] if local else None,
        )
    switch = env.get("JSFT_AUTO_DISTRIBUTED")
    if switch == "0":
        return None
    from jax._src.clusters import OmpiCluster, SlurmCluster  # jax's own detection, reused for the parsing

    for cluster in (SlurmCluster, OmpiCluster):
        if cluster.is_env_present():
            count = cluster.get_process_count()
            if count <= 1:
                return None
            return ClusterParams(
                cluster.name, cluster.get_coordinator_address(None, env.get("JAX_COORDINATOR_PORT")), count,
                cluster.get_process_id(), _local_devices(cluster, count),
            )
    return ClusterParams("auto") if switch == "1" else None


def _local_devices(cluster, count: int) -> Optional[list[int]]:
    """Several tasks on a node: each sees only GPU `local rank`, as jax does. One task per node: it sees
    all of the node's GPUs (jax's own detection would narrow it to GPU 0)."""
    env = os.environ
    if cluster.name == "slurm":
        per_node = count // int(env.get("SLURM_STEP_NUM_NODES", count))
    else:
        per_node = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", 1))
    return [cluster.get_local_process_id()] if per_node > 1 else None


def initialize() -> None:
    """Idempotent; a no-op for a single process without cluster variables."""
    global _initialized
    if _initialized:
        return
    params = detect()
    if params is not None:
        if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if params.source == "auto":
            jax.distributed.initialize()
        else:
            # all four given and detection off: jax's own detection would narrow a one-task-per-node
            # process to GPU `SLURM_LOCALID`
            jax.distributed.initialize(
                coordinator_address=params.coordinator_address, num_processes=params.num_processes,
                process_id=params.process_id, local_device_ids=params.local_device_ids,
                cluster_detection_method="deactivate",
            )
        if jax.process_index() == 0:
            print(f"jax.distributed from {params.source}: {jax.process_count()} processes, coordinator "
                  f"{params.coordinator_address or 'detected by jax'}", flush=True)
    _initialized = True


def several_processes() -> bool:
    """True once jax.distributed joined this process to others."""
    return _initialized and jax.process_count() > 1


def is_main() -> bool:
    return jax.process_index() == 0


def all_hosts(values):
    """[processes, n] int32 array: every process's small integer vector (every process must call it)."""
    import numpy as np

    local = np.asarray(values, np.int32)
    if jax.process_count() == 1:
        return local[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local))


def barrier(name: str) -> None:
    """Every process waits here until all have arrived."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def wait_for(files, timeout: Optional[float] = None) -> bool:
    """True once every file exists, False after `timeout` seconds (default SHARED_FS_WAIT_S)."""
    deadline = time.monotonic() + (SHARED_FS_WAIT_S if timeout is None else timeout)
    while not all(Path(f).exists() for f in files):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def check_shared_directory(directory, key: str) -> None:
    """With several processes: raise unless every process sees a file that process 0 wrote in `directory`
    (checkpoints and run files must be on one filesystem shared by all hosts). Every process calls it."""
    if jax.process_count() == 1:
        return
    token = int(all_hosts([random.getrandbits(31) if is_main() else 0])[0, 0])
    marker = Path(directory) / f".jsft-shared-{token}"
    if is_main():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    barrier(f"jsft wrote {marker.name}")
    seen = all_hosts([wait_for([marker])])[:, 0]
    barrier(f"jsft checked {marker.name}")
    if is_main():
        marker.unlink()
    blind = [p for p, ok in enumerate(seen) if not ok]
    if blind:
        raise RuntimeError(
            f"{key}={directory} is not on a filesystem shared by all hosts: process(es) {blind} cannot see a file "
            f"process 0 wrote there. Checkpoints and run files need one shared directory: point {key} at it"
        )
