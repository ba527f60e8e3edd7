"""Multi-host start-up: `jax.distributed.initialize` from the standard variables or cluster auto-detection.

Variables: JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES, JAX_PROCESS_ID, optionally
JAX_LOCAL_DEVICE_IDS. Without them, jax's own cluster detection (SLURM, Open MPI, TPU pods, ...) is tried
when JSFT_AUTO_DISTRIBUTED=1. On the CPU backend, collectives across processes go through gloo.
"""

from __future__ import annotations

import os

import jax

_initialized = False


def initialize() -> None:
    """Idempotent; a no-op for a single process without cluster variables."""
    global _initialized
    if _initialized:
        return
    explicit = "JAX_COORDINATOR_ADDRESS" in os.environ
    auto = os.environ.get("JSFT_AUTO_DISTRIBUTED") == "1"
    if explicit or auto:
        if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if explicit:
            missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if v not in os.environ]
            if missing:
                raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} is not")
            local = os.environ.get("JAX_LOCAL_DEVICE_IDS")
            jax.distributed.initialize(
                coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                process_id=int(os.environ["JAX_PROCESS_ID"]),
                local_device_ids=[int(x) for x in local.split(",")] if local else None,
            )
        else:
            jax.distributed.initialize()
    _initialized = True


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
