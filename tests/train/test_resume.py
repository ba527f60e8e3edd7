"""Checkpoints: kill -9 then resume reproduces the uninterrupted run exactly; SIGTERM saves and exits 0;
a half-written checkpoint is never picked."""

import json
import signal
import subprocess
import sys
import time

from jsft.config import load_config
from jsft.train import checkpoint as ckpt
from jsft.train.loop import train

from jsft_testing import losses, sft_overrides

STEPS = 8


def launch(setup, run_dir, **extra):
    args = sft_overrides(setup, run_dir, **{"trainer.total_training_steps": STEPS, "trainer.save_freq": 2, **extra})
    return subprocess.Popen([sys.executable, "-m", "jsft.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def wait_for_step(run_dir, step, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(json.loads(line)["step"] >= step for line in open(path) if line.strip()):
            return
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached")


def wait_for_checkpoint(run_dir, step, proc, timeout=300):
    """Until orbax has committed the checkpoint of `step` (it renames the step's directory when complete)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "checkpoints" / str(step)).is_dir():
            return
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.1)
    raise TimeoutError(f"checkpoint {step} not written")


def test_kill_9_then_resume_is_exact(sft_setup, tmp_path):
    # the three launches run one job: they share a compilation cache, so only the first compiles
    # (test_compilation_cache_is_written_and_reused checks that the cache keeps the losses)
    cache = {"trainer.compilation_cache_dir": str(tmp_path / "xla-cache")}
    reference = tmp_path / "reference"
    rc, out = finish(launch(sft_setup, reference, **cache))
    assert rc == 0, out[-3000:]

    # resume_mode=resume_path continues another run's checkpoint in a new directory
    forked = tmp_path / "forked"
    train(load_config(None, sft_overrides(sft_setup, forked, **{
        "trainer.total_training_steps": STEPS, "trainer.resume_mode": "resume_path",
        "trainer.resume_from_path": str(reference / "checkpoints" / "4"), "trainer.max_ckpt_to_keep": 1,
        "trainer.save_freq": 2})))
    assert losses(forked) == {s: v for s, v in losses(reference).items() if s > 4}
    assert [p.name for p in (forked / "checkpoints").iterdir() if p.name.isdigit()] == [str(STEPS)]

    run = tmp_path / "killed"
    proc = launch(sft_setup, run, **cache)
    wait_for_step(run, 5, proc)
    wait_for_checkpoint(run, 4, proc)  # saves are asynchronous: under load step 4's may still be in flight
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and max(steps) >= 4, steps
    # a save that crashed half-way leaves only a temporary directory, which resume must ignore
    (run / "checkpoints" / f"{max(steps) + 2}.orbax-checkpoint-tmp-1").mkdir()

    rc, out = finish(launch(sft_setup, run, **cache))
    assert rc == 0, out[-3000:]
    assert f"resumed from step {max(steps)}" in out
    assert losses(run) == losses(reference)  # bit-exact, every step
    assert sorted(losses(run)) == list(range(1, STEPS + 1))


def test_sigterm_saves_and_exits_cleanly(sft_setup, tmp_path):
    run = tmp_path / "run"
    proc = launch(sft_setup, run, **{"trainer.total_training_steps": 200, "trainer.save_freq": -1})
    wait_for_step(run, 2, proc)
    proc.send_signal(signal.SIGTERM)
    rc, out = finish(proc)
    assert rc == 0, out[-3000:]
    last = max(losses(run))
    assert last < 200
    assert "stop requested" in out
    manager, step = ckpt.locate(run)
    assert step == last
    meta = ckpt.read_meta(manager, step)
    assert meta["step"] == last
    assert divmod(last, 48 // 8) == (meta["data_state"]["epoch"], meta["data_state"]["step"])  # data position saved


def test_compilation_cache_is_written_and_reused(sft_setup, tmp_path):
    """trainer.compilation_cache_dir: a run writes its compiled programs; the same job run again finds
    every one of them there (it adds no entry)."""
    cache = tmp_path / "xla-cache"
    job = {"trainer.total_training_steps": 2, "trainer.compilation_cache_dir": str(cache)}
    rc, out = finish(launch(sft_setup, tmp_path / "first", **job))
    assert rc == 0, out[-3000:]
    written = sorted(p.name for p in cache.iterdir())
    assert written, "no compiled program was cached"
    rc, out = finish(launch(sft_setup, tmp_path / "again", **job))
    assert rc == 0, out[-3000:]
    assert sorted(p.name for p in cache.iterdir()) == written
    assert losses(tmp_path / "again") == losses(tmp_path / "first")
