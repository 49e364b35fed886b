"""Step boundaries: no hand-over inside an atomic block, and the device throttle that keeps batch work
at most one step ahead of the GPU (its logic checked with recording fake events on the CPU)."""

from __future__ import annotations

import pytest

from osprey.runtime.steps import DeviceThrottle, atomic, between_steps, step_boundary


class FakeEvent:
    """A CUDA event stand-in that logs what is done with it."""

    log: list[tuple[str, int]] = []
    made = 0

    def __init__(self) -> None:
        FakeEvent.made += 1
        self.number = FakeEvent.made

    def record(self) -> None:
        FakeEvent.log.append(("record", self.number))

    def synchronize(self) -> None:
        FakeEvent.log.append(("wait", self.number))


@pytest.fixture
def events():
    FakeEvent.log, FakeEvent.made = [], 0
    return FakeEvent


def test_each_lap_records_an_event_and_waits_for_the_one_before(events):
    throttle = DeviceThrottle(event=events)
    for _ in range(4):
        throttle.lap()
    # step n is queued (recorded) before the host waits for step n - 1: one step in flight, never more
    assert events.log == [
        ("record", 1),
        ("record", 2), ("wait", 1),
        ("record", 3), ("wait", 2),
        ("record", 4), ("wait", 3),
    ]  # fmt: skip
    assert throttle.waits == 3


def test_without_cuda_the_throttle_does_nothing():
    throttle = DeviceThrottle()
    for _ in range(3):
        throttle.lap()
    assert throttle.waits == 0


def test_no_boundary_fires_inside_an_atomic_block():
    fired = []
    with between_steps(lambda: fired.append("boundary")):
        step_boundary()
        with atomic():
            step_boundary()
            step_boundary()
        step_boundary()
    assert fired == ["boundary", "boundary"]
