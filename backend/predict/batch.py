"""A batch ``/predict`` answered within Label Studio's deadline.

Label Studio's *Retrieve Predictions* sends every selected task in one call and stores nothing when
the call outlives ``ML_TIMEOUT_PREDICT``. So tasks are predicted in cross-task batches sized to the
time left of ``OSPREY_PREDICT_BUDGET_S`` (from the measured seconds per task), and the tasks that do not
fit are handed to a ``deferral`` (a background pre-label job that writes them through Label Studio's
API). The check is made before each batch is started, against the slowest recent task, with batches
that grow only as tasks are done, so the answer leaves within the budget unless one task alone takes
longer than every task before it. Tasks that fail (image gone, bad data) or are deferred get no
``result``, so Label Studio stores nothing that would block them, while the answer keeps one entry per
task.

One writer per task and version (:mod:`backend.prelabel.claims`): the batch claims its tasks first;
those another writer holds (a pre-label job, ``osprey-label prelabel``) get no ``result`` here. The
claims of predicted tasks are held a little longer than the answer takes to be stored
(:data:`HOLD_S`), those of deferred and failed tasks given back at once.

A batch Label Studio gave up on (its ``ML_TIMEOUT_PREDICT`` ran out and it closed the connection) is
noticed before each cross-task batch and before the answer is sent, through the server's
``disconnected()`` check (waitress reads ahead on the connection and sees it closed): then nothing more
is predicted and *every* task of the request, answered or not, goes to the deferred job, since Label
Studio will store nothing of this answer. A client that leaves between that last check and the end of
sending the answer is not seen (the window is the time to send one JSON body).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from backend.errors import InputError
from backend.labelstudio.schema import ProjectSchema

from .tasks import TaskPredictor, TaskResult, task_id

logger = logging.getLogger(__name__)

RECENT_TASKS = 5  # batches whose time per task the estimate looks at
SAFETY = 1.25  # a batch is started only when this much more than its estimate fits
RESERVE_SHARE, RESERVE_MIN_S = 0.05, 0.2  # of the budget kept for building and sending the answer
HOLD_S = 120.0  # claims on answered tasks outlive the answer by this: Label Studio stores it meanwhile


class Deferral(Protocol):
    """Where the tasks that do not fit go: ``waiting(project)`` are the ids already in a job;
    ``defer(...)`` queues tasks and returns the job id, or None when nothing can write them later
    (no Label Studio API access)."""

    def waiting(self, project: str) -> set[int]: ...
    def defer(
        self, project: str, tasks: list[dict], *, label_config: str, model_version: str
    ) -> str | None: ...


class Claims(Protocol):
    """One writer's claims (:class:`backend.prelabel.claims.Claimer`)."""

    def claim(self, task_ids: list[int]) -> set[int]: ...
    def release(self, task_ids: list) -> None: ...
    def hold(self, task_ids: list, seconds: float) -> None: ...


class _Unclaimed:
    """No shared claims (no project id, or none configured): every task is this request's."""

    def claim(self, task_ids: list[int]) -> set[int]:
        return set(task_ids)

    def release(self, task_ids: list) -> None:
        pass

    def hold(self, task_ids: list, seconds: float) -> None:
        pass


class BatchPredictor:
    """``predict`` answers one batch ``/predict``.

    ``tasks_for(project)`` gives a :class:`TaskPredictor` working at batch priority for the project;
    ``record(project, task_id, version, items)`` keeps what was predicted; ``count(key, n)`` counts
    outcomes for ``/metrics``; ``budget_s`` is ``OSPREY_PREDICT_BUDGET_S`` and ``max_batch_tasks``
    ``OSPREY_PRELABEL_BATCH_TASKS``; ``claimer_for(project, version)`` a new writer's claims
    (:class:`backend.prelabel.claims.Claimer`; None: every task is this request's)."""

    def __init__(
        self,
        *,
        tasks_for: Callable[[str | None], TaskPredictor],
        deferral: Deferral,
        record: Callable[..., None],
        count: Callable[[str, int], None],
        budget_s: float,
        max_batch_tasks: int,
        claimer_for: Callable[[str, str], Claims] | None = None,
    ) -> None:
        self.claimer_for = claimer_for
        self.tasks_for = tasks_for
        self.deferral = deferral
        self.record = record
        self.count = count
        self.budget_s = budget_s
        self.max_batch_tasks = max_batch_tasks
        self._recent: deque[float] = deque(maxlen=RECENT_TASKS)  # seconds per task of the last batches
        self._lock = threading.Lock()

    def predict(
        self,
        tasks: list,
        *,
        schema: ProjectSchema,
        label_config: str,
        project: str | None,
        version: str,
        head,
        disconnected: Callable[[], bool] | None = None,
    ) -> dict:
        """``{"results": [one per task, in order], "errors": [...]}`` within the budget. ``disconnected``
        says whether Label Studio has closed the connection (then the answer is abandoned: see the
        module docstring)."""
        started = time.monotonic()
        gone = disconnected or (lambda: False)
        results: list[dict | None] = [None] * len(tasks)
        errors: list[dict] = []
        waiting = self.deferral.waiting(project) if project else set()
        todo = []
        for index, task in enumerate(tasks):
            try:
                schema.image_reference(task)
            except InputError as problem:
                results[index] = no_result(version)
                errors.append({"index": index, "task": task.get("id") if isinstance(task, dict) else None,
                               "error": str(problem)})  # fmt: skip
                continue
            if task.get("id") in waiting:
                results[index] = no_result(version)  # its pre-label job will write it
            else:
                todo.append((index, task))
        claimer = self.claimer_for(project, version) if project and self.claimer_for else _Unclaimed()
        todo = self._claimed(todo, claimer, results, version)
        predictor, position, abandoned = self.tasks_for(project), 0, False
        try:
            while position < len(todo):
                size = self._batch_size(self.budget_s - (time.monotonic() - started), done=position)
                if size == 0 or (abandoned := gone()):
                    break
                batch = todo[position : position + size]
                began = time.monotonic()
                outcomes = predictor.predict([task for _, task in batch], schema, head=head)
                self._observe((time.monotonic() - began) / len(batch))
                self._answer(batch, outcomes, results, errors, project, version)
                position += size
            abandoned = abandoned or gone()
            if abandoned:
                self._abandoned(todo, position, claimer, label_config, project, version)
                for index, _ in todo:
                    results[index] = no_result(version)
            elif position < len(todo):
                self._defer_or_run(
                    todo[position:], predictor, results, errors, schema, label_config, project, version, head
                )
        finally:
            answered = [task_id(t) for i, t in todo if not abandoned and (results[i] or {}).get("result")]
            claimer.hold([t for t in answered if t is not None], HOLD_S)
            claimer.release([task_id(t) for _, t in todo if task_id(t) not in answered])
        self.count("tasks ok", sum(1 for r in results if r and "result" in r))
        out: dict = {"results": results}
        if errors:
            out["errors"] = errors
        return out

    def _claimed(self, todo: list, claimer: Claims, results: list, version: str) -> list:
        """The entries of ``todo`` this request now holds; the others get no result (another writer is
        writing them)."""
        claimed = claimer.claim([task_id(t) for _, t in todo if task_id(t) is not None])
        mine = []
        for index, task in todo:
            if task_id(task) is None or task_id(task) in claimed:
                mine.append((index, task))
            else:
                results[index] = no_result(version)
        if len(mine) < len(todo):
            self.count("tasks left to another writer", len(todo) - len(mine))
        return mine

    def _abandoned(self, todo: list, position: int, claimer, label_config, project, version) -> None:
        """Label Studio closed the connection: it stores nothing of this answer, so every task goes to
        the deferred job (those already predicted too)."""
        tasks = [task for _, task in todo]
        claimer.release([task_id(t) for t in tasks])
        job_id = None
        if project is not None and tasks and all(isinstance(t.get("id"), int) for t in tasks):
            job_id = self.deferral.defer(project, tasks, label_config=label_config, model_version=version)
        self.count("batches abandoned by Label Studio", 1)
        self.count("tasks deferred", len(tasks) if job_id else 0)
        logger.warning(
            "project %s: Label Studio closed the connection of a batch /predict after %d of %d tasks (its "
            "ML_TIMEOUT_PREDICT is shorter than OSPREY_PREDICT_BUDGET_S=%.0f?); %s",
            project, position, len(todo), self.budget_s,
            f"all {len(tasks)} deferred to pre-label job {job_id}" if job_id else "nothing can write them later",
        )  # fmt: skip

    def _defer_or_run(
        self, entries, predictor, results, errors, schema, label_config, project, version, head
    ) -> None:
        rest = [task for _, task in entries]
        job_id = None
        if project is not None and all(isinstance(t.get("id"), int) for t in rest):
            job_id = self.deferral.defer(project, rest, label_config=label_config, model_version=version)
        if job_id is None:  # nowhere to write them later: finish them now, past the budget
            logger.warning(
                "%d tasks do not fit OSPREY_PREDICT_BUDGET_S=%s and cannot be deferred (%s); predicting them now",
                len(rest), self.budget_s,
                "no project id" if project is None else "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY",
            )  # fmt: skip
            self._answer(
                entries, predictor.predict(rest, schema, head=head), results, errors, project, version
            )
            return
        for index, _ in entries:
            results[index] = no_result(version)
        self.count("tasks deferred", len(rest))
        logger.info(
            "project %s: %d of the batch's tasks deferred to pre-label job %s (budget %.0f s)",
            project, len(rest), job_id, self.budget_s,
        )  # fmt: skip

    def _answer(self, entries, outcomes: list[TaskResult], results, errors, project, version) -> None:
        """Fill the batch's answers (and errors) for ``entries`` = ``[(index, task)]``."""
        for (index, _), outcome in zip(entries, outcomes, strict=True):
            if outcome.status == "predicted":
                results[index] = {"result": outcome.result, "score": outcome.score, "model_version": version}
                self.record(project, outcome.task_id, version, outcome.result)
            else:
                results[index] = no_result(version)
                errors.append({"index": index, "task": outcome.task_id, "error": outcome.reason})
                logger.warning("task %s got no prediction: %s", outcome.task_id, outcome.reason)
                self.count("tasks failed", 1)

    def _batch_size(self, remaining_s: float, *, done: int) -> int:
        """How many tasks to start with ``remaining_s`` of the budget left, so that the answer goes out in
        time: as many as the slowest recent task (plus a quarter) says fit before a reserve for writing
        the answer, never more than were already done in this request (1, 1, 2, 4, ...: a bad estimate
        costs one small batch) nor ``max_batch_tasks``; one while nothing is measured. 0: defer the rest."""
        reserve = max(RESERVE_SHARE * self.budget_s, RESERVE_MIN_S)
        if remaining_s <= reserve:
            return 0
        with self._lock:
            slowest = max(self._recent) if self._recent else None
        if slowest is None:
            return 1
        fit = int((remaining_s - reserve) // max(slowest * SAFETY, 1e-3))
        return max(0, min(self.max_batch_tasks, max(done, 1), fit))

    def _observe(self, seconds_per_task: float) -> None:
        with self._lock:
            self._recent.append(seconds_per_task)


def no_result(version: str) -> dict:
    """A batch answer Label Studio skips (it stores no prediction without ``result``)."""
    return {"score": 0.0, "model_version": version}
