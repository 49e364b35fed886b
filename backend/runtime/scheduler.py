"""Who runs on the model next: one scheduler per process, shared by ``/predict``, the pre-label engine
and training jobs.

The model (one GPU) serves one piece of work at a time. Work asks for it with a priority:
``INTERACTIVE`` (an annotator's click) before ``BATCH`` (Retrieve Predictions, pre-label jobs) before
``BACKGROUND`` (training on the serving GPU); within a priority, first come first served. Long work
holds the model one *step* at a time: at the step boundaries of :mod:`osprey.runtime.steps` (before
every encoder and decoder block, between decoding steps and SAM's decoder batches, between LoRA
training steps) it hands the model over whenever more urgent work is waiting, then takes it back and
restores its project's adapter. On CUDA, batch and background work also wait at each boundary for the
device to finish their step before (:class:`~osprey.runtime.steps.DeviceThrottle`), so a click waits
for at most one block of batch work, on the host and on the device. Work blocked on another thread's computation (the
same image being encoded) lets go of the model meanwhile, so a hand-over never deadlocks. ``/health``
and ``/setup`` never touch the scheduler.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from osprey.runtime.steps import DeviceThrottle, between_steps

INTERACTIVE, BATCH, BACKGROUND = 0, 1, 2
PRIORITY_NAMES = {INTERACTIVE: "interactive", BATCH: "batch", BACKGROUND: "background"}


class ModelScheduler:
    """A priority lock on the model with hand-over at step boundaries (see the module docstring)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._holder: int | None = None  # priority of the work holding the model
        self._waiting: dict[int, int] = {}  # ticket -> priority
        self._tickets = itertools.count()
        self.busy_since: float | None = None
        self.handovers = 0  # times long work stepped aside for more urgent work
        self.pauses = 0  # times work let go of the model while waiting on another thread's computation
        self.gave_way_s = 0.0  # time work outside the model waited for more urgent work
        self._thread = threading.local()  # this thread's seconds holding / waiting for the model
        self.sessions = dict.fromkeys(PRIORITY_NAMES.values(), 0)
        self.waited_s = dict.fromkeys(PRIORITY_NAMES.values(), 0.0)  # total time spent waiting
        self.max_wait_s = dict.fromkeys(PRIORITY_NAMES.values(), 0.0)
        self.last_wait_s = dict.fromkeys(PRIORITY_NAMES.values(), 0.0)
        self.max_step_s = dict.fromkeys(
            PRIORITY_NAMES.values(), 0.0
        )  # longest hold between two hand-over points

    def _acquire(self, priority: int) -> None:
        started = time.perf_counter()
        with self._cond:
            ticket = next(self._tickets)
            self._waiting[ticket] = priority
            while (
                self._holder is not None
                or min(self._waiting.items(), key=lambda w: (w[1], w[0]))[0] != ticket
            ):
                self._cond.wait()
            del self._waiting[ticket]
            self._holder = priority
            self.busy_since = time.time()
            waited, name = time.perf_counter() - started, PRIORITY_NAMES[priority]
            self._thread.waited_s = getattr(self._thread, "waited_s", 0.0) + waited
            self.waited_s[name] += waited
            self.last_wait_s[name] = waited
            self.max_wait_s[name] = max(self.max_wait_s[name], waited)

    def _release(self) -> None:
        with self._cond:
            self._holder = None
            self.busy_since = None
            self._cond.notify_all()

    def give_way(self, priority: int) -> None:
        """Wait, without taking the model, while more urgent work than ``priority`` holds it or waits
        for it: the courtesy of work that does not need the model (turning masks into Label Studio's
        formats) but shares the CPU and the interpreter with the click that does."""
        started = None
        with self._cond:
            while (self._holder is not None and self._holder < priority) or any(
                p < priority for p in self._waiting.values()
            ):
                started = started or time.perf_counter()
                self._cond.wait()
        if started is not None:
            self.gave_way_s += time.perf_counter() - started

    @contextmanager
    def courtesy(self, priority: int) -> Iterator[None]:
        """Inside, every :func:`~osprey.runtime.steps.step_boundary` of this thread's work outside the
        model gives way to more urgent work (:meth:`give_way`)."""
        with between_steps(lambda: self.give_way(priority)):
            yield

    def more_urgent_waiting(self, priority: int) -> bool:
        """Whether work of a higher priority than ``priority`` waits for the model."""
        with self._cond:
            return any(p < priority for p in self._waiting.values())

    @contextmanager
    def session(self, priority: int, *, on_resume: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold the model for one step of work. Inside, between forward passes, the model is handed to
        more urgent work when some waits; ``on_resume`` runs after taking it back (e.g. to activate the
        project's adapter again)."""
        if priority not in PRIORITY_NAMES:
            raise ValueError(f"priority must be one of {sorted(PRIORITY_NAMES)}, got {priority!r}")
        name = PRIORITY_NAMES[priority]
        self._acquire(priority)
        self.sessions[name] += 1
        held = [time.perf_counter()]
        # batch and background work run at most one step ahead of the GPU: a click handed the model at
        # a boundary queues behind one step of theirs, not behind all they launched
        throttle = DeviceThrottle() if priority != INTERACTIVE else None

        def lap() -> None:
            now = time.perf_counter()
            self.max_step_s[name] = max(self.max_step_s[name], now - held[0])
            self._thread.held_s = getattr(self._thread, "held_s", 0.0) + now - held[0]
            held[0] = now

        def take_back() -> None:
            self._acquire(priority)
            held[0] = time.perf_counter()
            if on_resume is not None:
                on_resume()

        def step() -> None:
            if throttle is not None:
                throttle.lap()
            lap()
            if priority == INTERACTIVE or not self.more_urgent_waiting(priority):
                return
            self._release()
            self.handovers += 1
            take_back()

        @contextmanager
        def pause() -> Iterator[None]:  # blocked on another thread's work: let it have the model
            lap()
            self._release()
            self.pauses += 1
            try:
                yield
            finally:
                take_back()

        try:
            with between_steps(step, pause):
                yield
        finally:
            lap()
            self._release()

    def thread_times(self) -> tuple[float, float]:
        """Seconds this thread has held the model, and waited for it, since it started."""
        return getattr(self._thread, "held_s", 0.0), getattr(self._thread, "waited_s", 0.0)

    def stats(self) -> dict:
        with self._cond:
            waiting = sorted(PRIORITY_NAMES[p] for p in self._waiting.values())
            holder = PRIORITY_NAMES.get(self._holder) if self._holder is not None else None
            return {
                "holder": holder,
                "waiting": waiting,
                "handovers": self.handovers,
                "pauses": self.pauses,
                "gave_way_s": round(self.gave_way_s, 3),
                "sessions": dict(self.sessions),
                "waited_s": {k: round(v, 3) for k, v in self.waited_s.items()},
                "max_wait_s": {k: round(v, 3) for k, v in self.max_wait_s.items()},
                "max_step_s": {k: round(v, 3) for k, v in self.max_step_s.items()},
            }
