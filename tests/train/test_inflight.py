"""Step timing of the async pipeline: a step's time is never shorter than its device time, so MFU never
exceeds the truth, even when the previous step is seen done only after the next one was dispatched."""

import jax.numpy as jnp

from jsft.train.inflight import InFlightStep


def step(n, started, dispatch_begin):
    loss = jnp.ones(())
    stats = {"grad_norm": jnp.ones(()), "skipped_steps": jnp.zeros((), jnp.int32), "consecutive_skips": jnp.zeros((), jnp.int32)}
    return InFlightStep.dispatched(n, started, loss, stats, {}, tokens=100, flops=1e9, dispatch_begin=dispatch_begin)


def test_a_step_seen_done_late_ends_at_the_next_dispatch():
    first, second = step(1, 0.0, 0.5), step(2, 1.0, 2.0)
    first.wait()  # already computed: done is only when we looked
    assert first.was_ready
    first.done = 5.0  # looked at long after `second` was dispatched
    # the device may have started `second` at its dispatch (2.0): its time starts there, not at 5.0
    assert first.end_for(second) == 2.0
    second.wait()
    second.done = 6.0
    metrics, _, _ = second.read(first.end_for(second), peak_flops=1e9)
    assert metrics["train/step_time"] == 4.0 and metrics["train/mfu"] == 1e9 / 4.0 / 1e9


def test_a_step_still_running_when_waited_on_ends_when_it_ends():
    first, second = step(1, 0.0, 0.5), step(2, 1.0, 2.0)
    first.wait()
    first.was_ready, first.done = False, 3.0  # it finished while we waited: `done` is its end
    assert first.end_for(second) == 3.0
    assert first.end_for(None) == 3.0
