"""Work repeated every few minutes in a thread of its own (the reconciliation, the auto pre-label
sweep): started and stopped by the runtime that owns it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from backend.errors import internal_error

logger = logging.getLogger(__name__)

FULL_READ_S = 6 * 3600.0  # a sweep that reads only what changed reads a project whole at least this often


def whole_read_due(full_at: float | None, now: float) -> bool:
    """Whether a sweep that reads a project's changes since its last look must read it whole: never read
    whole (``full_at`` None: after a start), or last read whole :data:`FULL_READ_S` or more ago."""
    return full_at is None or now - full_at >= FULL_READ_S


class GoneProjects:
    """Projects a sweep found gone from Label Studio (it answered 404 for them: deleted), each left alone
    for :data:`FULL_READ_S`, then looked at again, so that one deleted project costs neither the other
    projects their sweep nor the log a warning every few minutes. ``what`` names the sweep in the log."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._since: dict[str, float] = {}
        self._lock = threading.Lock()

    def skip(self, project: str, now: float) -> bool:
        """Whether ``project`` was found gone less than :data:`FULL_READ_S` ago."""
        with self._lock:
            since = self._since.get(project)
        return since is not None and not whole_read_due(since, now)

    def swept(self, project: str) -> None:
        """``project`` was swept: it is there."""
        with self._lock:
            self._since.pop(project, None)

    def failed(self, project: str, error: Exception, now: float) -> str:
        """Log why the sweep of ``project`` failed (call inside the ``except``); an error of kind
        ``not_found`` (a Label Studio 404) marks the project gone, an error without a ``kind`` (not a
        Label Studio call's) is logged as an internal error with its traceback. Returns ``"gone"`` or
        ``"failed"``."""
        if getattr(error, "kind", None) == "not_found":
            with self._lock:
                self._since[project] = now
            logger.warning("project %s: Label Studio has no such project (deleted?): %s; the %s leaves it alone "
                           "and looks again in %.0f h", project, error, self.what, FULL_READ_S / 3600)  # fmt: skip
            return "gone"
        if getattr(error, "kind", None) is None:  # not Label Studio's answer: a bug of ours, traceback kept
            internal_error(logger, f"the {self.what} of project {project}")
        else:
            logger.warning(
                "project %s: the %s failed, tried again at the next one: %s", project, self.what, error
            )
        return "failed"

    def gone(self) -> list[str]:
        with self._lock:
            return sorted(self._since, key=lambda p: (len(p), p))


class Periodic:
    """Calls ``work()`` every ``interval_s`` seconds, the first time ``first_s`` after :meth:`start`,
    until :meth:`stop`. A call that raises is logged (``what``, with an error id) and tried again at the
    next interval; ``on_error(error)`` may say more (e.g. for ``/metrics``)."""

    def __init__(
        self,
        work: Callable[[], object],
        *,
        interval_s: float,
        first_s: float,
        thread_name: str,
        what: str,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0 seconds, got {interval_s}")
        self.work, self.what, self.on_error = work, what, on_error
        self.interval_s = float(interval_s)
        self.first_s = min(float(first_s), self.interval_s)
        self.thread_name = thread_name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
            self._thread.start()

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called (long work looks between its steps)."""
        return self._stop.is_set()

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop after the call under way; True when the thread has stopped."""
        self._stop.set()
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        wait = self.first_s
        while not self._stop.wait(wait):
            try:
                self.work()
            except Exception as error:  # tried again at the next interval
                internal_error(logger, self.what)
                if self.on_error is not None:
                    self.on_error(error)
            wait = self.interval_s
