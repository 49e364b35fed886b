"""Where a ``/predict`` request's time goes: holding the model, waiting for it, and everything else.

"Everything else" is the backend's own overhead: reading and checking the JSON body, fetching and
decoding the image, turning masks into brush RLE or polygons, building and serialising the answer.
The model's share is what the request's thread spent holding the model (:class:`ModelScheduler`
sessions: SAM, Osprey, and the mask post-processing SAM does on the way); waiting is time queued
behind other work. ``/metrics`` shows the sums per kind of request and the overhead's share.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from backend.runtime.scheduler import ModelScheduler

__all__ = ["RequestTimes"]


class RequestTimes:
    """Per kind of request (``interactive``, ``batch``): counts and seconds by where they went."""

    def __init__(self, scheduler: ModelScheduler) -> None:
        self.scheduler = scheduler
        self._lock = threading.Lock()
        self._kinds: dict[str, dict[str, float]] = {}

    def reset(self) -> None:
        """Forget what was measured so far (benchmarks leave out their warm-up)."""
        with self._lock:
            self._kinds.clear()

    @contextmanager
    def measure(self, kind: str = "batch") -> Iterator[dict]:
        """Time the request handled inside, in this thread; set ``["kind"]`` of the yielded dict once
        the request says what it is."""
        started = time.perf_counter()
        held, waited = self.scheduler.thread_times()
        label = {"kind": kind}
        try:
            yield label
        finally:
            kind = label["kind"]
            total = time.perf_counter() - started
            held_now, waited_now = self.scheduler.thread_times()
            model, wait = held_now - held, waited_now - waited
            other = max(0.0, total - model - wait)
            with self._lock:
                row = self._kinds.setdefault(
                    kind,
                    dict.fromkeys(
                        ("requests", "total_s", "model_s", "wait_s", "other_s", "max_other_s"), 0.0
                    ),
                )
                row["requests"] += 1
                row["total_s"] += total
                row["model_s"] += model
                row["wait_s"] += wait
                row["other_s"] += other
                row["max_other_s"] = max(row["max_other_s"], other)

    def stats(self) -> dict[str, dict]:
        """Sums per kind, with ``overhead_share``: everything else as a fraction of the time not spent
        waiting for the model (the part the backend itself decides)."""
        with self._lock:
            rows = {kind: dict(row) for kind, row in self._kinds.items()}
        for row in rows.values():
            busy = row["total_s"] - row["wait_s"]
            row["overhead_share"] = round(row["other_s"] / busy, 4) if busy > 0 else 0.0
            row["requests"] = int(row["requests"])
            for key in ("total_s", "model_s", "wait_s", "other_s", "max_other_s"):
                row[key] = round(row[key], 4)
        return rows
