"""Which distributed parameters the environment implies (the 2-process SLURM run: tests/train/test_hosts.py)."""

import pytest

from jsft import distributed

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[007-010]", "SLURM_NTASKS": "4",
         "SLURM_STEP_NUM_NODES": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}


@pytest.fixture
def env(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS",
                 "JAX_COORDINATOR_PORT", "JSFT_AUTO_DISTRIBUTED", "OMPI_MCA_orte_hnp_uri", *SLURM):
        monkeypatch.delenv(name, raising=False)

    def set_env(**values):
        for k, v in values.items():
            monkeypatch.setenv(k, v)

    return set_env


def test_plain_process_is_single(env):
    assert distributed.detect() is None


def test_jax_variables_win_and_must_be_complete(env, monkeypatch):
    env(**SLURM, JAX_COORDINATOR_ADDRESS="10.0.0.1:1234", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1")
    p = distributed.detect()
    assert (p.source, p.coordinator_address, p.num_processes, p.process_id) == ("jax_env", "10.0.0.1:1234", 2, 1)
    env(JAX_LOCAL_DEVICE_IDS="0,1")
    assert distributed.detect().local_device_ids == [0, 1]
    monkeypatch.delenv("JAX_NUM_PROCESSES")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
        distributed.detect()


def test_slurm_one_task_per_node_sees_all_its_gpus(env):
    env(**SLURM)
    p = distributed.detect()
    # first node of the step; the port jax derives from the job id
    assert (p.source, p.coordinator_address) == ("slurm", f"gpu007:{4242 % 4096 + 61440}")
    assert (p.num_processes, p.process_id, p.local_device_ids) == (4, 2, None)
    env(JAX_COORDINATOR_PORT="5000")
    assert distributed.detect().coordinator_address == "gpu007:5000"


def test_slurm_one_task_per_gpu_sees_its_own(env):
    env(**{**SLURM, "SLURM_NTASKS": "16", "SLURM_LOCALID": "3"})
    assert distributed.detect().local_device_ids == [3]


def test_single_task_and_opt_out_stay_single(env):
    env(**{**SLURM, "SLURM_NTASKS": "1", "SLURM_STEP_NUM_NODES": "1"})
    assert distributed.detect() is None
    env(**SLURM, JSFT_AUTO_DISTRIBUTED="0")
    assert distributed.detect() is None


def test_open_mpi(env):
    env(OMPI_MCA_orte_hnp_uri="1531576320.0;tcp://10.96.0.1,10.148.0.1:34911", OMPI_COMM_WORLD_SIZE="2",
        OMPI_COMM_WORLD_RANK="1", OMPI_COMM_WORLD_LOCAL_RANK="0", OMPI_COMM_WORLD_LOCAL_SIZE="1")
    p = distributed.detect()
    assert (p.source, p.coordinator_address.split(":")[0], p.num_processes, p.process_id) == ("ompi", "10.96.0.1", 2, 1)
    assert p.local_device_ids is None


def test_a_run_directory_one_host_cannot_see_is_an_error(tmp_path, monkeypatch):
    """Process 0's view, with a simulated second host that does not see the marker file."""
    import jax
    import numpy as np

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(distributed, "barrier", lambda name: None)
    monkeypatch.setattr(distributed, "all_hosts", lambda v: np.stack([np.asarray(v, np.int32), np.zeros(len(v), np.int32)]))
    with pytest.raises(RuntimeError, match=r"trainer.default_local_dir=.* process\(es\) \[1\] cannot see"):
        distributed.check_shared_directory(tmp_path / "run", "trainer.default_local_dir")
    assert not list((tmp_path / "run").iterdir())  # the marker is removed


def test_the_launch_examples_start_jsft_train_with_what_detect_reads(env):
    """scripts/launch: the sbatch script runs `python -m jsft.train` under srun; the JobSet's pods get JAX_*
    variables that detect() turns into a 2-process run coordinated by pod 0."""
    from pathlib import Path

    import yaml

    launch = Path(__file__).resolve().parents[1] / "scripts" / "launch"
    assert "srun --kill-on-bad-exit=1 python -m jsft.train" in (launch / "sbatch.sh").read_text()
    jobset = yaml.safe_load((launch / "jobset.yaml").read_text())
    job = jobset["spec"]["replicatedJobs"][0]
    pod = job["template"]["spec"]
    container = pod["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "jsft.train"]
    values = {e["name"]: e.get("value") for e in container["env"]}
    assert int(values["JAX_NUM_PROCESSES"]) == pod["parallelism"] == pod["completions"]
    host = f"{jobset['metadata']['name']}-{job['name']}-0-0.{jobset['metadata']['name']}"
    env(JAX_COORDINATOR_ADDRESS=values["JAX_COORDINATOR_ADDRESS"], JAX_NUM_PROCESSES=values["JAX_NUM_PROCESSES"],
        JAX_PROCESS_ID="1")  # the completion index of the second pod
    p = distributed.detect()
    assert (p.source, p.coordinator_address, p.num_processes, p.process_id) == ("jax_env", f"{host}:1234", 2, 1)
