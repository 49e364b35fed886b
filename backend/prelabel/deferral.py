"""The part of a ``/predict`` batch that does not fit Label Studio's deadline, finished in the background.

Label Studio's *Retrieve Predictions* sends every selected task in one ``/predict`` call and stores
nothing at all when the call outlives ``ML_TIMEOUT_PREDICT`` (default 100 s). So a batch is answered
within ``OSPREY_PREDICT_BUDGET_S``: the tasks predicted by then get their results, and every other task
gets an answer **without** a ``result`` key, which Label Studio skips (it stores no prediction, logging
"incorrect prediction") while the result count stays right. Those tasks go into a ``prelabel-*`` job on
the job queue's pre-label lane (persisted with the request's label config), which the pre-label worker
runs with the bulk engine, writing each prediction through Label Studio's API under the project's
current model version. A task in a queued or running pre-label job is not deferred twice. Pre-label
jobs never wait behind training: they have their own lane and worker.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

from backend.jobs import PRELABEL_LANE
from backend.labelstudio.api import LabelStudioAPIError

from .claims import Claimer
from .engine import prelabel

logger = logging.getLogger(__name__)

PRELABEL_KIND = "prelabel"
PROGRESS_EVERY = 10  # log a progress line every this many tasks...
PROGRESS_EVERY_S = 10.0  # ...once this many seconds have passed since the last one


class Deferrals:
    """Defers a batch's rest (``waiting``, ``defer``: what :class:`backend.predict.batch.BatchPredictor`
    needs) and runs the jobs it queued (``run``: the pre-label lane's job handler).

    Collaborators: ``queue`` (the job queue), ``client`` (the Label Studio API client, or None without
    ``LABEL_STUDIO_URL``/``LABEL_STUDIO_API_KEY``: then nothing can be deferred), ``projects``
    (``schema_for``, ``version``, ``head``), ``tasks_for(project)`` (a task predictor at batch priority),
    ``record(project, task_id, version, items)``, ``wake()`` (the pre-label worker looks for a job now),
    ``chunk_tasks`` and ``retries`` as for :func:`backend.prelabel.engine.prelabel`;
    ``claimer_for(project, version, what, owner=...)`` a writer's claims (:class:`~.claims.Claimer`;
    a job's owner is named after the job, so that the job resumed after a crash takes its claims back)."""

    def __init__(
        self,
        *,
        queue,
        client,
        projects,
        tasks_for: Callable,
        record: Callable[..., None],
        wake: Callable[[], None] = lambda: None,
        chunk_tasks: int = 8,
        retries: int = 2,
        claimer_for: Callable[..., Claimer] | None = None,
    ) -> None:
        self.claimer_for = claimer_for
        self.queue = queue
        self.client = client
        self.projects = projects
        self.tasks_for = tasks_for
        self.record = record
        self.wake = wake
        self.chunk_tasks = chunk_tasks
        self.retries = retries
        self._lock = threading.Lock()
        self._progress: dict[str, Progress] = {}

    def waiting(self, project: str) -> set[int]:
        """Tasks of ``project`` waiting in a queued or running pre-label job."""
        out: set[int] = set()
        for job in self.queue.active(project, lane=PRELABEL_LANE):  # all of them: a sweep may queue many
            out.update(int(t) for t in job.payload.get("task_ids", []))
        return out

    def defer(
        self,
        project: str,
        tasks: list[dict],
        *,
        label_config: str,
        model_version: str,
        leave_annotated: bool = False,
    ) -> str | None:
        """Queue ``tasks`` (Label Studio task objects with integer ids) as one pre-label job and return its
        id; None when there is no Label Studio API access to write them later. Each deferral is its own
        job (queued jobs of one kind are merged, which would drop tasks). ``leave_annotated``: the job
        leaves the tasks that have an annotation by then (automatic pre-labelling: nobody asked for them)."""
        if self.client is None:
            return None
        payload = {
            "task_ids": [int(t["id"]) for t in tasks],
            "label_config": label_config,
            "model_version": model_version,  # what the batch answered with (the job writes the current one)
            "deferred_at": time.time(),
        }
        if leave_annotated:
            payload["leave_annotated"] = True
        job_id = self.queue.enqueue(project, f"{PRELABEL_KIND}-{uuid.uuid4().hex[:12]}", payload)
        self.wake()
        return job_id

    def run(self, project: str, kind: str, payload: dict) -> dict:
        """Predict a deferred batch's tasks and write them through Label Studio's API (the job handler)."""
        if self.client is None:
            raise RuntimeError(
                "a pre-label job needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to write predictions"
            )
        schema = self.projects.schema_for(payload["label_config"])
        asked, deleted = payload.get("task_ids", []), []  # deleted: before the job read them
        try:
            tasks = list(
                self.client.tasks(int(project), ids=asked, skip_missing=True, on_missing=deleted.extend)
            )
        except LabelStudioAPIError as error:
            if error.kind != "not_found":
                raise
            # deleted in Label Studio while the job waited: nothing to do, and not a failure of ours
            logger.warning("project %s: pre-label job %s left its %d tasks: the project is gone from Label "
                           "Studio, or its token's user no longer sees it (%s)", project, kind, len(asked), error)  # fmt: skip
            return {"status": "project gone", "gone": len(asked), "predicted": 0, "failed": 0}
        listed, annotated = len(tasks), 0
        if payload.get("leave_annotated"):  # submitted or skipped by an annotator: done by a person
            tasks = [t for t in tasks if not t.get("annotations")]
            annotated = listed - len(tasks)
        version = self.projects.version(project)
        progress = Progress(project=project, job=kind, total=len(tasks))
        with self._lock:
            self._progress[project] = progress

        def seen(result) -> None:
            progress(result)
            if result.status == "predicted":
                self.record(project, result.task_id, version, result.result)

        claimer = None
        if self.claimer_for is not None:
            claimer = self.claimer_for(project, version, "job", owner=f"job:{project}:{kind}")
        try:
            summary = prelabel(
                tasks, predictor=self.tasks_for(project), schema=schema, project=int(project), model_version=version,
                sink=self.client, head=self.projects.head(project), chunk_tasks=self.chunk_tasks,
                retries=self.retries, on_result=seen, claimer=claimer,
            )  # fmt: skip
        finally:
            progress.finish()
        summary.gone += len(deleted)
        logger.info("project %s: pre-label job %s finished: %s%s", project, kind, summary.to_dict(),
                    f" ({annotated} annotated tasks left alone)" if annotated else "")  # fmt: skip
        return {"status": "done", "model_version": version, "annotated_left": annotated, **summary.to_dict()}

    def metrics(self) -> dict:
        """Per project, its latest pre-label job's progress (``/metrics``)."""
        with self._lock:
            progress = dict(self._progress)
        return {project: p.to_dict() for project, p in progress.items()}


class Progress:
    """Done / total / failed, the rate and an ETA for one pre-label run (``/metrics``, the log): a line
    every :data:`PROGRESS_EVERY` tasks once :data:`PROGRESS_EVERY_S` have passed, and at the end.
    Updated by the run's threads, read by ``/metrics``: under a lock. ``total`` None: unknown (no ETA)."""

    def __init__(
        self, *, project: str, job: str, total: int | None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.project, self.job, self.total = project, job, total
        self.done = self.failed = 0
        self.running = True
        self._clock = clock
        self._lock = threading.Lock()
        self.started = self._logged = clock()

    def __call__(self, result) -> None:
        with self._lock:
            self.done += 1
            self.failed += result.status == "failed"
            done, failed, now = self.done, self.failed, self._clock()
            due = (
                done % PROGRESS_EVERY == 0 and now - self._logged >= PROGRESS_EVERY_S
            ) or done == self.total
            if due:
                self._logged = now
        if due:
            rate = 60.0 * done / max(now - self.started, 1e-9)
            logger.info(
                "project %s: pre-label %s: %d/%s tasks (%d failed), %.1f tasks/min, ETA %s",
                self.project, self.job, done, self.total if self.total is not None else "?", failed, rate,
                _eta(self.eta_s()),
            )  # fmt: skip

    def finish(self) -> None:
        with self._lock:
            self.running = False

    def eta_s(self) -> float | None:
        with self._lock:
            done, total = self.done, self.total
        if not done or total is None:
            return None
        return (self._clock() - self.started) / done * max(total - done, 0)

    def to_dict(self) -> dict:
        eta = self.eta_s()
        with self._lock:
            return {
                "job_id": self.job, "done": self.done, "total": self.total, "failed": self.failed,
                "running": self.running, "eta_s": round(eta, 1) if eta is not None and self.running else None,
            }  # fmt: skip


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
