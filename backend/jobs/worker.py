"""The worker thread that runs one lane's queued jobs inside a service process, whichever queue holds
them. The process runs one Worker per lane (:data:`backend.jobs.base.LANES`), so deferred pre-labels
run beside a training job instead of behind it."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable

from .base import Job, JobQueue, LeaseLostError, check_lane

logger = logging.getLogger(__name__)

JobHandler = Callable[[str, str, dict], dict]


class Worker:
    """Runs the queued jobs of one ``lane`` in a background thread of the service process.

    ``handler(project_id, kind, payload) -> dict`` does the work; its dict is the job's result. While it
    runs, a second thread heartbeats every ``lease_s / 3`` seconds. A handler exception fails the job with
    the error (the worker goes on); a job whose lease was lost meanwhile is left to whoever holds it now.
    Stale jobs (dead workers) are requeued at ``start()`` and every ``lease_s`` seconds after.
    """

    def __init__(
        self,
        *,
        queue: JobQueue,
        handler: JobHandler,
        lane: str,
        worker_id: str | None = None,
        lease_s: float = 60.0,
        poll_s: float = 2.0,
    ) -> None:
        if lease_s <= 0 or poll_s <= 0:
            raise ValueError(f"lease_s and poll_s must be > 0 seconds, got {lease_s} and {poll_s}")
        self.queue = queue
        self.handler = handler
        self.lane = check_lane(lane)
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{lane}:{uuid.uuid4().hex[:6]}"
        self.lease_s = float(lease_s)
        self.poll_s = float(poll_s)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_requeue = 0.0
        self.current: Job | None = None
        self.processed = 0

    def start(self) -> None:
        """Requeue stale jobs, then poll for jobs in a daemon thread. RuntimeError if already started."""
        if self.is_alive():
            raise RuntimeError(f"worker {self.worker_id} is already running; call stop() first")
        self._stop.clear()
        self._requeue()
        self._thread = threading.Thread(
            target=self._loop, name=f"osprey-worker-{self.worker_id}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> bool:
        """Ask the thread to stop after its current job; True when it has stopped within ``timeout``."""
        self._stop.set()
        self._wake.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def is_alive(self) -> bool:
        """True while the worker's thread runs (between ``start()`` and the end of ``stop()``)."""
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        """Look for a job now instead of at the next poll (call after enqueue)."""
        self._wake.set()

    def _requeue(self) -> None:
        self._last_requeue = time.monotonic()
        try:
            self.queue.requeue_stale()
        except Exception:
            logger.exception("worker %s: requeueing stale jobs failed", self.worker_id)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if time.monotonic() - self._last_requeue >= self.lease_s:
                self._requeue()
            try:
                ran = self.run_once()
            except Exception:  # a queue outage must not kill the thread; try again at the next poll
                logger.exception("worker %s: claiming a job failed", self.worker_id)
                ran = None
            if ran is None:
                self._wake.wait(self.poll_s)
                self._wake.clear()

    def run_once(self) -> Job | None:
        """Claim one job of this worker's lane and run it to the end in this thread; None when no job was
        ready."""
        job = self.queue.claim(self.worker_id, self.lease_s, lane=self.lane)
        if job is None:
            return None
        self.current = job
        beating = threading.Event()
        lost = threading.Event()
        beat = threading.Thread(
            target=self._heartbeat,
            args=(job, beating, lost),
            name=f"osprey-heartbeat-{job.job_id}",
            daemon=True,
        )
        beat.start()
        started = time.perf_counter()
        try:
            outcome, error = self._call(job)
        finally:
            beating.set()
            beat.join()
            self.current = None
        try:
            if error is None:
                self.queue.complete(job.job_id, outcome, token=job.token)
            else:
                self.queue.fail(job.job_id, error, token=job.token)
        except LeaseLostError as lease_error:
            logger.error("worker %s: %s", self.worker_id, lease_error)
        self.processed += 1
        logger.info(
            "worker %s: job %s (%s, project %s) %s in %.1f s", self.worker_id, job.job_id, job.kind,
            job.project_id, "done" if error is None else "failed", time.perf_counter() - started,
        )  # fmt: skip
        return job

    def _call(self, job: Job) -> tuple[dict | None, str | None]:
        try:
            outcome = self.handler(job.project_id, job.kind, job.payload)
        except Exception as error:
            logger.error("job %s failed:\n%s", job.job_id, traceback.format_exc())
            return None, f"{type(error).__name__}: {error}"
        if outcome is not None and not isinstance(outcome, dict):
            return (
                None,
                f"the {job.kind} handler returned {type(outcome).__name__}; expected a dict (the job's result)",
            )
        return outcome or {}, None

    def _heartbeat(self, job: Job, done: threading.Event, lost: threading.Event) -> None:
        while not done.wait(self.lease_s / 3):
            try:
                if not self.queue.heartbeat(job.job_id, token=job.token):
                    lost.set()
                    logger.error("worker %s: job %s lost its lease; its outcome will not be recorded",
                                 self.worker_id, job.job_id)  # fmt: skip
                    return
            except Exception:
                logger.exception("worker %s: heartbeat for job %s failed", self.worker_id, job.job_id)
