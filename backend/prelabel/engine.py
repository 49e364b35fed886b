"""The pre-label engine: a stream of Label Studio tasks in, one prediction per task written back.

One code path serves ``osprey-label prelabel`` and the work a ``/predict`` batch defers:

- :class:`PrelabelEngine` predicts a batch of tasks: images fetched in parallel threads, each task's
  regions found with SAM, then every task's regions labelled by Osprey in the same forward passes and
  decoding loop (:func:`backend.predict.regions.answer_tasks`); a task that fails says why.
- :func:`prelabel` drives it over a task stream and writes through a sink (``LabelStudioClient``):
  tasks that already hold a non-empty prediction of this model version are skipped (so a rerun resumes);
  finished predictions are written in chunks (a crash loses at most one chunk); a failed task is retried
  with backoff, then reported with its reason. Nothing empty is ever written, and an empty prediction
  of this version found on a task is deleted once the task has a real one.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from backend.labelstudio.schema import ProjectSchema
from backend.predict.regions import PredictOptions, answer_tasks, find_regions, task_results

logger = logging.getLogger(__name__)


@dataclass
class TaskResult:
    """What became of one task: ``status`` is ``predicted`` (``result``/``score`` set), ``skipped``
    (``reason`` says why: it already had a prediction of this version) or ``failed`` (``reason``)."""

    task_id: int | None
    status: str
    reason: str | None = None
    result: list[dict] | None = None
    score: float | None = None
    regions: int = 0
    attempts: int = 1
    retryable: bool = True  # a failure that may pass next time (a fetch, memory); False when it is final


@dataclass
class Summary:
    """Counts of a run, the failed tasks with their reasons, and how long it took."""

    predicted: int = 0
    skipped: int = 0
    failed: dict[int | None, str] = field(default_factory=dict)
    regions: int = 0
    seconds: float = 0.0
    written: int = 0
    deleted_empty: int = 0

    @property
    def tasks_per_minute(self) -> float:
        return 60.0 * self.predicted / self.seconds if self.seconds > 0 else 0.0

    def failure_reasons(self) -> Counter:
        return Counter(self.failed.values())

    def to_dict(self) -> dict:
        return {
            "predicted": self.predicted,
            "skipped": self.skipped,
            "failed": len(self.failed),
            "failures": {str(k): v for k, v in self.failed.items()},
            "regions": self.regions,
            "written": self.written,
            "deleted_empty": self.deleted_empty,
            "seconds": round(self.seconds, 2),
            "tasks_per_minute": round(self.tasks_per_minute, 2),
        }


class PrelabelEngine:
    """Predicts tasks in batches across tasks (see the module docstring).

    ``models``: the service's :class:`~backend.runtime.runtime.Models` (Osprey, SAM refiner and
    segment-everything); ``loader``: an :class:`~backend.labelstudio.images.ImageLoader`;
    ``batch_tasks``: how many tasks share Osprey's forward passes; ``model_session``: a context
    manager factory entered around every model step (the service's scheduler and the project's
    adapter), so interactive requests can run between steps; ``courtesy``: one entered around the
    work that needs no model (Label Studio's formats), which gives way to interactive requests at
    each region.
    """

    def __init__(
        self,
        *,
        models,
        loader,
        options: PredictOptions,
        batch_tasks: int = 4,
        model_session: Callable[[], contextlib.AbstractContextManager] | None = None,
        courtesy: Callable[[], contextlib.AbstractContextManager] | None = None,
        image_threads: int = 4,
    ) -> None:
        if batch_tasks < 1:
            raise ValueError(f"batch_tasks must be >= 1, got {batch_tasks}")
        self.models = models
        self.loader = loader
        self.options = options
        self.batch_tasks = int(batch_tasks)
        self.model_session = model_session or contextlib.nullcontext
        self.courtesy = courtesy or contextlib.nullcontext
        self.image_threads = max(1, int(image_threads))

    def predict(self, tasks: list[dict], schema: ProjectSchema, *, head=None) -> list[TaskResult]:
        """One :class:`TaskResult` per task, in order."""
        results: list[TaskResult | None] = [None] * len(tasks)
        images = self._load_images(tasks, schema, results)
        found: list[tuple[int, object, list]] = []
        for index, rgb in images:
            try:
                with self.model_session():
                    regions = find_regions(
                        task=tasks[index],
                        rgb=rgb,
                        schema=schema,
                        context=None,
                        models=self.models,
                        options=self.options,
                    )
            except (ValueError, FileNotFoundError) as error:  # bad stored regions, SAM refusing the image
                results[index] = TaskResult(_task_id(tasks[index]), "failed", f"regions: {error}")
                continue
            if not regions and not any(not s.per_region for s in schema.fields):
                results[index] = TaskResult(
                    _task_id(tasks[index]), "failed", "no regions found (nothing written)", retryable=False
                )
                continue
            found.append((index, rgb, regions))
        for start in range(0, len(found), self.batch_tasks):
            batch = found[start : start + self.batch_tasks]
            items = [(rgb, regions) for _, rgb, regions in batch]
            try:
                with self.model_session():
                    answers = answer_tasks(
                        items, schema=schema, models=self.models, options=self.options, head=head
                    )
                with self.courtesy():  # no model needed; clicks go first
                    labelled = task_results(items, answers, schema=schema, options=self.options)
            except (ValueError, RuntimeError) as error:  # e.g. out of memory: every task of the batch says so
                for index, _, _ in batch:
                    results[index] = TaskResult(_task_id(tasks[index]), "failed", f"labelling: {error}")
                continue
            for (index, _, regions), (items, score) in zip(batch, labelled, strict=True):
                if items:
                    results[index] = TaskResult(
                        _task_id(tasks[index]), "predicted", result=items, score=score, regions=len(regions)
                    )
                else:
                    results[index] = TaskResult(
                        _task_id(tasks[index]),
                        "failed",
                        "nothing to predict (nothing written)",
                        retryable=False,
                    )
        return [r for r in results if r is not None]

    def _load_images(
        self, tasks: list[dict], schema: ProjectSchema, results: list
    ) -> list[tuple[int, object]]:
        def load(index: int):
            task = tasks[index]
            data = task.get("data") if isinstance(task, dict) else None
            reference = data.get(schema.image_data_key) if isinstance(data, dict) else None
            if not isinstance(reference, str) or not reference:
                raise ValueError(f"task data has no image under '{schema.image_data_key}'")
            return self.loader.load(reference).rgb

        loaded = []
        with ThreadPoolExecutor(max_workers=min(self.image_threads, max(1, len(tasks)))) as pool:
            futures = {index: pool.submit(load, index) for index in range(len(tasks))}
            for index, future in futures.items():
                try:
                    loaded.append((index, future.result()))
                except (ValueError, OSError) as error:  # ImageLoadError is a ValueError
                    results[index] = TaskResult(_task_id(tasks[index]), "failed", f"image: {error}")
        return loaded


def _task_id(task) -> int | None:
    value = task.get("id") if isinstance(task, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def current_predictions(task: dict, model_version: str) -> tuple[bool, list[int]]:
    """Whether ``task`` already has a non-empty prediction of ``model_version``, and the ids of its empty
    ones of that version (which block Label Studio's later retrieves and must go)."""
    done, empty = False, []
    for prediction in task.get("predictions") or []:
        if not isinstance(prediction, dict) or prediction.get("model_version") != model_version:
            continue
        if prediction.get("result"):
            done = True
        elif isinstance(prediction.get("id"), int):
            empty.append(prediction["id"])
    return done, empty


def prelabel(
    tasks: Iterable[dict],
    *,
    engine: PrelabelEngine,
    schema: ProjectSchema,
    project: int,
    model_version: str,
    sink,
    head=None,
    chunk_tasks: int = 8,
    retries: int = 2,
    backoff_s: float = 2.0,
    on_result: Callable[[TaskResult], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Summary:
    """Predict every task of ``tasks`` that has no prediction of ``model_version`` yet and write it
    through ``sink`` (``create_predictions(project, items)``, ``delete_prediction(id)``).

    ``on_result`` sees every task's final :class:`TaskResult` (progress bars, logs). Failed tasks are
    tried ``retries`` more times, after ``backoff_s``, then twice that, and so on.
    """
    summary = Summary()
    started = time.perf_counter()
    buffer: list[tuple[TaskResult, list[int]]] = []
    empties: dict[int, list[int]] = {}

    def finish(result: TaskResult) -> None:
        if result.status == "predicted":
            summary.predicted += 1
            summary.regions += result.regions
        elif result.status == "skipped":
            summary.skipped += 1
        else:
            summary.failed[result.task_id] = result.reason or "failed"
        if on_result is not None:
            on_result(result)

    def flush() -> None:
        if not buffer:
            return
        items = [
            {"task": r.task_id, "result": r.result, "score": r.score, "model_version": model_version}
            for r, _ in buffer
        ]
        summary.written += sink.create_predictions(project, items)
        for result, empty_ids in buffer:
            for prediction_id in empty_ids:
                sink.delete_prediction(prediction_id)
                summary.deleted_empty += 1
            finish(result)
        buffer.clear()

    def run(batch: list[dict], attempt: int) -> list[dict]:
        again = []
        for task, result in zip(batch, engine.predict(batch, schema, head=head), strict=True):
            result.attempts = attempt
            if result.status == "predicted":
                buffer.append((result, empties.pop(result.task_id, [])))
                if len(buffer) >= chunk_tasks:
                    flush()
            elif attempt <= retries and result.retryable:
                again.append(task)
                logger.info(
                    "task %s failed (attempt %d), will retry: %s", result.task_id, attempt, result.reason
                )
            else:
                finish(result)
        return again

    retry: list[dict] = []
    for batch in _batches(
        _unfinished(tasks, model_version, sink, summary, empties, finish), engine.batch_tasks
    ):
        retry += run(batch, 1)
    flush()
    for attempt in range(2, retries + 2):
        if not retry:
            break
        sleep(backoff_s * 2 ** (attempt - 2))
        pending, retry = retry, []
        for batch in _batches(iter(pending), engine.batch_tasks):
            retry += run(batch, attempt)
        flush()
    summary.seconds = time.perf_counter() - started
    return summary


def _unfinished(tasks, model_version, sink, summary, empties, finish) -> Iterator[dict]:
    """The tasks still to predict; tasks already done are finished as skipped (their stray empty
    predictions of this version deleted)."""
    for task in tasks:
        task_id = _task_id(task)
        done, empty_ids = current_predictions(task, model_version)
        if done:
            for prediction_id in empty_ids:
                sink.delete_prediction(prediction_id)
                summary.deleted_empty += 1
            finish(TaskResult(task_id, "skipped", f"already has a prediction of {model_version}"))
            continue
        if task_id is not None and empty_ids:
            empties[task_id] = empty_ids
        yield task


def _batches(items: Iterator[dict], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
