"""The part of a ``/predict`` batch that does not fit Label Studio's deadline, finished in the background.

Label Studio's *Retrieve Predictions* sends every selected task in one ``/predict`` call and stores
nothing at all when the call outlives ``ML_TIMEOUT_PREDICT`` (default 100 s). So a batch is answered
within ``OSPREY_PREDICT_BUDGET_S``: the tasks predicted by then get their results, and every other task
gets an answer **without** a ``result`` key, which Label Studio skips (it stores no prediction, logging
"incorrect prediction") while the result count stays right. Those tasks go into a ``prelabel-*`` job
(the job queue persists them with the request's label config) that the service's worker runs with the
pre-label engine, writing each prediction through Label Studio's API under the project's current model
version. A task in a queued or running pre-label job is not deferred twice.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

logger = logging.getLogger(__name__)

PRELABEL_KIND = "prelabel"
PROGRESS_EVERY = 10  # log a progress line every this many tasks


def is_prelabel_job(kind: str) -> bool:
    return kind == PRELABEL_KIND or kind.startswith(f"{PRELABEL_KIND}-")


def defer(queue, project: str, tasks: list[dict], *, label_config: str, model_version: str) -> str:
    """Queue ``tasks`` (Label Studio task objects) for the background engine; returns the job id. Each
    deferral is its own job (queued jobs of one kind are merged, which would drop tasks)."""
    payload = {
        "task_ids": [int(t["id"]) for t in tasks],
        "tasks": tasks,
        "label_config": label_config,
        "model_version": model_version,  # what the batch answered with (the job writes the current one)
        "deferred_at": time.time(),
    }
    return queue.enqueue(project, f"{PRELABEL_KIND}-{uuid.uuid4().hex[:12]}", payload)


def deferred_task_ids(queue, project: str) -> set[int]:
    """Tasks of ``project`` waiting in a queued or running pre-label job."""
    out: set[int] = set()
    for job in queue.jobs(project, limit=200):
        if job.status in ("queued", "running") and is_prelabel_job(job.kind):
            out.update(int(t) for t in job.payload.get("task_ids", []))
    return out


class Progress:
    """Done / total / failed and an ETA for one running pre-label job (``/metrics``), logged every
    :data:`PROGRESS_EVERY` tasks."""

    def __init__(
        self, *, project: str, job: str, total: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.project, self.job, self.total = project, job, total
        self.done = self.failed = 0
        self._clock = clock
        self.started = clock()

    def __call__(self, result) -> None:
        self.done += 1
        self.failed += result.status == "failed"
        if self.done % PROGRESS_EVERY == 0 or self.done == self.total:
            logger.info(
                "project %s: pre-label job %s: %d/%d tasks (%d failed), ETA %s",
                self.project, self.job, self.done, self.total, self.failed, _eta(self.eta_s()),
            )  # fmt: skip

    def eta_s(self) -> float | None:
        if not self.done:
            return None
        elapsed = self._clock() - self.started
        return elapsed / self.done * max(self.total - self.done, 0)

    def to_dict(self) -> dict:
        eta = self.eta_s()
        return {
            "job_id": self.job, "done": self.done, "total": self.total, "failed": self.failed,
            "eta_s": round(eta, 1) if eta is not None else None,
        }  # fmt: skip


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
