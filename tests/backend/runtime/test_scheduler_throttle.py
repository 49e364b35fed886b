"""On CUDA, batch and background sessions lap a device throttle at every step boundary (at most one step
queued ahead of the GPU when a click takes the model); a click's own session is never throttled."""

from __future__ import annotations

from backend.runtime import scheduler as scheduler_module
from backend.runtime.scheduler import BACKGROUND, BATCH, INTERACTIVE, ModelScheduler
from osprey.runtime.steps import DeviceThrottle, step_boundary


def test_batch_and_background_sessions_throttle_at_every_boundary_and_clicks_never(monkeypatch):
    laps = []

    class Counting(DeviceThrottle):
        def __init__(self) -> None:
            super().__init__()
            self.number = len(laps)
            laps.append(0)

        def lap(self) -> None:
            laps[self.number] += 1

    monkeypatch.setattr(scheduler_module, "DeviceThrottle", Counting)
    scheduler = ModelScheduler()
    for priority, boundaries in ((BATCH, 3), (BACKGROUND, 2), (INTERACTIVE, 4)):
        with scheduler.session(priority):
            for _ in range(boundaries):
                step_boundary()
    assert laps == [3, 2]  # one throttle per batch or background session, lapped at each boundary
