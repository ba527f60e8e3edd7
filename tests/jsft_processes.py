"""(Not named multiprocess.py: that would shadow the `multiprocess` package that `datasets` imports.)
Run one job as N local processes under jax.distributed (127.0.0.1, gloo), as the multi-host tests do.

    from jsft_processes import run_processes
    outputs = run_processes([[sys.executable, "-m", "jsft.train", *overrides]] * 2)

Each process gets JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>, JAX_NUM_PROCESSES, JAX_PROCESS_ID, its own
fake CPU devices and a PYTHONPATH that resolves `jsft` to this checkout. If one process fails or the timeout
passes, the others are killed and the assertion message shows every process's exit code and output tail.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
# variables of a launcher (ours or the caller's) that must not leak into the children
_LAUNCHER_PREFIXES = ("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS", "SLURM_",
                      "OMPI_")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jax_env(num_processes: int, port: Optional[int] = None) -> list[dict]:
    """The JAX_* variables of each process of one job."""
    port = port or free_port()
    return [{"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(num_processes),
             "JAX_PROCESS_ID": str(i)} for i in range(num_processes)]


def start_processes(commands: Sequence[Sequence[str]], envs: Sequence[dict], devices_per_process: int = 4
                    ) -> list[subprocess.Popen]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
    base.update({"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
                 "JAX_PLATFORMS": "cpu",
                 "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    procs = []
    for cmd, env in zip(commands, envs, strict=True):
        # output to a file, not a pipe: a pipe nobody drains while we wait on another process blocks its writer
        log = tempfile.TemporaryFile("w+")
        procs.append(subprocess.Popen(list(cmd), env={**base, **env}, stdout=log, stderr=subprocess.STDOUT, text=True))
        procs[-1].log = log
    return procs


def wait_all(procs: Sequence[subprocess.Popen], timeout: float, stop_on_failure: bool = True
             ) -> list[tuple[Optional[int], str]]:
    """(exit code, output) of every process, in order. With `stop_on_failure`, once one exits non-zero the
    others get a few seconds to stop on their own, then are killed; any still running at `timeout` are killed
    and report None."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if stop_on_failure and any(p.poll() not in (None, 0) for p in procs):
            deadline = min(deadline, time.monotonic() + 5)
        time.sleep(0.2)
    running = [p.poll() is None for p in procs]
    for p, alive in zip(procs, running):
        if alive:
            p.kill()
    return [(None if alive else p.wait(), _output(p)) for p, alive in zip(procs, running)]


def _output(proc: subprocess.Popen) -> str:
    proc.wait()
    with proc.log as log:
        log.seek(0)
        return log.read()


def describe(results: Sequence[tuple[Optional[int], str]], tail: int = 3000) -> str:
    state = lambda rc: "still running, killed" if rc is None else f"exit {rc}"  # noqa: E731
    return "\n".join(f"--- process {i}: {state(rc)}, last output:\n{out[-tail:]}"
                     for i, (rc, out) in enumerate(results))


def run_processes(commands: Sequence[Sequence[str]], envs: Optional[Sequence[dict]] = None, *, timeout: float = 600,
                  devices_per_process: int = 4, expect_success: bool = True) -> list[str]:
    """Start `commands` (one per process) as one jax.distributed job and wait; the outputs, in process order.

    `envs` (default `jax_env(len(commands))`) are each process's extra variables. With `expect_success` every
    process must exit 0; otherwise every process must stop with an error on its own before `timeout` (a hang
    fails)."""
    envs = jax_env(len(commands)) if envs is None else envs
    results = wait_all(start_processes(commands, envs, devices_per_process), timeout, stop_on_failure=expect_success)
    if expect_success:
        assert all(rc == 0 for rc, _ in results), "a process failed\n" + describe(results)
    else:
        assert all(rc not in (None, 0) for rc, _ in results), "expected every process to fail\n" + describe(results)
    return [out for _, out in results]
