"""Batch ``/predict`` within Label Studio's deadline, and the pre-label jobs that finish the rest.

A *Retrieve Predictions* of any size is answered within ``OSPREY_PREDICT_BUDGET_S``: tasks are predicted
by the pre-label engine in cross-task batches sized to the time left (from the measured seconds per
task), and the tasks that do not fit are deferred to a ``prelabel-*`` job (see
:mod:`backend.prelabel.deferral`) whose predictions go through Label Studio's API. Tasks that fail
(image gone, bad data) get no ``result`` either, so Label Studio stores nothing that would block them.
"""

from __future__ import annotations

import logging
import threading
import time

from backend.labelstudio.api import LabelStudioClient
from backend.labelstudio.schema import ProjectSchema
from backend.prelabel.deferral import Progress, defer, deferred_task_ids
from backend.prelabel.engine import PrelabelEngine, prelabel
from backend.runtime.scheduler import BATCH

logger = logging.getLogger(__name__)


class BatchPredictor:
    """The batch half of the service: ``predict`` for ``/predict`` without a context, ``run_job`` for
    the worker's pre-label jobs. ``service`` is the :class:`~backend.runtime.runtime.OspreyService`."""

    def __init__(self, *, service) -> None:
        self.service = service
        self.settings = service.settings
        self._task_seconds: float | None = None  # moving average of one task's prediction time
        self._lock = threading.Lock()
        self._client: LabelStudioClient | None = None
        self.progress: dict[str, Progress] = {}

    # ---- the engine, one step at a time at batch priority ----
    def engine(self, project: str | None) -> PrelabelEngine:
        service = self.service
        return PrelabelEngine(
            models=service.models,
            loader=service.loader,
            options=service.options,
            batch_tasks=self.settings.prelabel_batch_tasks,
            model_session=lambda: service.model_session(project, BATCH),
            courtesy=lambda: service.scheduler.courtesy(BATCH),
        )

    def client(self) -> LabelStudioClient | None:
        """The Label Studio API client, or None without ``LABEL_STUDIO_URL``/``LABEL_STUDIO_API_KEY``."""
        if not (self.settings.label_studio_url and self.settings.label_studio_api_key):
            return None
        with self._lock:
            if self._client is None:
                self._client = LabelStudioClient(
                    url=self.settings.label_studio_url, api_key=self.settings.label_studio_api_key
                )
            return self._client

    # ---- /predict without a context ----
    def predict(
        self,
        tasks: list,
        *,
        schema: ProjectSchema,
        label_config: str,
        project: str | None,
        version: str,
        head,
    ) -> dict:
        started = time.monotonic()
        results: list[dict | None] = [None] * len(tasks)
        errors: list[dict] = []
        waiting = deferred_task_ids(self.service.queue, project) if project else set()
        todo = []
        for index, task in enumerate(tasks):
            problem = _task_problem(task, schema)
            if problem is not None:
                results[index] = _no_result(version)
                errors.append(
                    {
                        "index": index,
                        "task": task.get("id") if isinstance(task, dict) else None,
                        "error": problem,
                    }
                )
            elif task.get("id") in waiting:
                results[index] = _no_result(version)  # its pre-label job will write it
            else:
                todo.append((index, task))
        engine, position = self.engine(project), 0
        while position < len(todo):
            size = self._batch_size(self.settings.predict_budget_s - (time.monotonic() - started))
            if size == 0:
                break
            batch = todo[position : position + size]
            began = time.monotonic()
            outcomes = engine.predict([task for _, task in batch], schema, head=head)
            self._observe((time.monotonic() - began) / len(batch))
            self._answer(batch, outcomes, results, errors, project, version)
            position += size
        rest = [task for _, task in todo[position:]]
        if rest:
            self._defer_or_run(
                rest, todo[position:], results, errors, schema, label_config, project, version, head
            )
        out: dict = {"results": results}
        if errors:
            out["errors"] = errors
        return out

    def _defer_or_run(
        self, rest, entries, results, errors, schema, label_config, project, version, head
    ) -> None:
        if project is None or self.client() is None or any(not isinstance(t.get("id"), int) for t in rest):
            # nowhere to write them later: finish them now, past the budget (Label Studio may time out)
            logger.warning(
                "%d tasks do not fit OSPREY_PREDICT_BUDGET_S=%s and cannot be deferred (%s); predicting them now",
                len(rest), self.settings.predict_budget_s,
                "no project id" if project is None else "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY",
            )  # fmt: skip
            outcomes = self.engine(project).predict(rest, schema, head=head)
            self._answer(entries, outcomes, results, errors, project, version)
            return
        job_id = defer(self.service.queue, project, rest, label_config=label_config, model_version=version)
        for index, _ in entries:
            results[index] = _no_result(version)
        self.service.count("tasks deferred", len(rest))
        logger.info(
            "project %s: %d of the batch's tasks deferred to pre-label job %s (budget %.0f s)",
            project, len(rest), job_id, self.settings.predict_budget_s,
        )  # fmt: skip
        self.service.worker.wake()

    def _answer(self, entries, outcomes, results, errors, project, version) -> None:
        """Fill the batch's answers (and errors) for ``entries`` = ``[(index, task)]`` from the engine."""
        for (index, task), outcome in zip(entries, outcomes, strict=True):
            if outcome.status == "predicted":
                results[index] = {"result": outcome.result, "score": outcome.score, "model_version": version}
                self.service.record_prediction(project, task, version, outcome.result)
                self.service.count("tasks ok")
            else:
                results[index] = _no_result(version)
                errors.append({"index": index, "task": outcome.task_id, "error": outcome.reason})
                logger.warning("task %s got no prediction: %s", outcome.task_id, outcome.reason)
                self.service.count("tasks failed")

    def _batch_size(self, remaining_s: float) -> int:
        """How many tasks to start with ``remaining_s`` of the budget left: one while nothing is measured,
        then as many as the measured time per task allows (at most ``OSPREY_PRELABEL_BATCH_TASKS``)."""
        if remaining_s <= 0:
            return 0
        with self._lock:
            per_task = self._task_seconds
        if per_task is None:
            return 1
        return max(0, min(self.settings.prelabel_batch_tasks, int(remaining_s // max(per_task, 1e-3))))

    def _observe(self, seconds_per_task: float) -> None:
        with self._lock:
            previous = self._task_seconds
            self._task_seconds = (
                seconds_per_task if previous is None else 0.7 * previous + 0.3 * seconds_per_task
            )

    # ---- the worker's pre-label jobs ----
    def run_job(self, project: str, kind: str, payload: dict) -> dict:
        """Predict a deferred batch's tasks and write them through Label Studio's API."""
        client = self.client()
        if client is None:
            raise RuntimeError(
                "a pre-label job needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to write predictions"
            )
        service = self.service
        schema = service.schema_for(payload["label_config"])
        tasks = list(client.tasks(int(project), ids=payload.get("task_ids", []), skip_missing=True))
        version = service.project_version(project)
        progress = Progress(project=project, job=kind, total=len(tasks))
        self.progress[project] = progress

        def seen(result) -> None:
            progress(result)
            if result.status == "predicted":
                service.record_prediction(project, {"id": result.task_id}, version, result.result)

        summary = prelabel(
            tasks, engine=self.engine(project), schema=schema, project=int(project), model_version=version,
            sink=client, head=service.current_head(project), chunk_tasks=self.settings.prelabel_chunk_tasks,
            retries=self.settings.prelabel_retries, on_result=seen,
        )  # fmt: skip
        missing = len(payload.get("task_ids", [])) - len(tasks)
        logger.info("project %s: pre-label job %s finished: %s", project, kind, summary.to_dict())
        return {"status": "done", "model_version": version, "tasks_gone": missing, **summary.to_dict()}

    def metrics(self) -> dict:
        return {project: progress.to_dict() for project, progress in self.progress.items()}


def _no_result(version: str) -> dict:
    """A batch answer Label Studio skips (it stores no prediction without ``result``)."""
    return {"score": 0.0, "model_version": version}


def _task_problem(task, schema: ProjectSchema) -> str | None:
    if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
        return "each task must be an object with a 'data' object"
    reference = task["data"].get(schema.image_data_key)
    if not isinstance(reference, str) or not reference:
        return f"task data has no image under '{schema.image_data_key}' (the Image tag's value)"
    return None
