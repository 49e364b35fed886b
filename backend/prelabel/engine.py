"""Bulk pre-labelling: a stream of Label Studio tasks in, one prediction per task written back.

One code path serves ``osprey-label prelabel`` and the work a ``/predict`` batch defers.
:func:`prelabel` drives a :class:`~backend.predict.tasks.TaskPredictor` (cross-task batches; a task
that fails says why) over a task stream and writes through a sink (``LabelStudioClient``):
  tasks that already hold a non-empty prediction of this model version are skipped (so a rerun resumes);
  finished predictions are written in chunks (a crash loses at most one chunk); a failed task is retried
  with backoff, then reported with its reason. Nothing empty is ever written, and an empty prediction
  of this version found on a task is deleted once the task has a real one.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from backend.labelstudio.api import LabelStudioAPIError
from backend.labelstudio.schema import ProjectSchema
from backend.predict.tasks import TaskPredictor, TaskResult, task_id

logger = logging.getLogger(__name__)


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
    predictor: TaskPredictor,
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
    through ``sink`` (``create_predictions(project, items)``, ``delete_prediction(id)``, and
    ``tasks(project, ids=..., skip_missing=True)`` to read back after a write whose outcome is unknown:
    see :func:`write_chunk`).

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
        summary.written += write_chunk(sink, project, items, model_version, sleep=sleep)
        for result, empty_ids in buffer:
            for prediction_id in empty_ids:
                sink.delete_prediction(prediction_id)
                summary.deleted_empty += 1
            finish(result)
        buffer.clear()

    def run(batch: list[dict], attempt: int) -> list[dict]:
        again = []
        for task, result in zip(batch, predictor.predict(batch, schema, head=head), strict=True):
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
        _unfinished(tasks, model_version, sink, summary, empties, finish), predictor.batch_tasks
    ):
        retry += run(batch, 1)
    flush()
    for attempt in range(2, retries + 2):
        if not retry:
            break
        sleep(backoff_s * 2 ** (attempt - 2))
        pending, retry = retry, []
        for batch in _batches(iter(pending), predictor.batch_tasks):
            retry += run(batch, attempt)
        flush()
    summary.seconds = time.perf_counter() - started
    return summary


def write_chunk(sink, project: int, items: list[dict], model_version: str, *, attempts: int = 4,
                backoff_s: float = 2.0, sleep: Callable[[float], None] = time.sleep) -> int:  # fmt: skip
    """Write one chunk of predictions so that no task ends with two of ``model_version``, whatever fails.

    A failure whose outcome is unknown (the request went out, no answer came back: a reset, a timeout, a
    5xx after sending) is followed by reading back which of the chunk's tasks now hold a prediction of
    this version; only the others are sent again. A failure known not to have written (nothing was
    sent) sends the same chunk again. After ``attempts`` the last error is raised. Returns how many
    predictions exist now that did not before (as far as Label Studio says)."""
    pending, written = list(items), 0
    for attempt in range(1, attempts + 1):
        try:
            return written + sink.create_predictions(project, pending)
        except LabelStudioAPIError as error:
            if error.outcome_unknown:
                done = already_written(sink, project, [item["task"] for item in pending], model_version)
                written += len(done)
                pending = [item for item in pending if item["task"] not in done]
                if not pending:
                    return written
            if attempt == attempts:
                raise
            logger.warning(
                "writing %d predictions failed (%s); %d of them still to send, again in %.0f s",
                len(items), error, len(pending), backoff_s * 2 ** (attempt - 1),
            )  # fmt: skip
            sleep(backoff_s * 2 ** (attempt - 1))
    return written


def already_written(sink, project: int, task_ids: list[int], model_version: str) -> set[int]:
    """The tasks among ``task_ids`` that hold a non-empty prediction of ``model_version`` now."""
    tasks = sink.tasks(project, ids=task_ids, skip_missing=True)
    return {task["id"] for task in tasks if current_predictions(task, model_version)[0]}


def _unfinished(tasks, model_version, sink, summary, empties, finish) -> Iterator[dict]:
    """The tasks still to predict; tasks already done are finished as skipped (their stray empty
    predictions of this version deleted)."""
    for task in tasks:
        identity = task_id(task)
        done, empty_ids = current_predictions(task, model_version)
        if done:
            for prediction_id in empty_ids:
                sink.delete_prediction(prediction_id)
                summary.deleted_empty += 1
            finish(TaskResult(identity, "skipped", f"already has a prediction of {model_version}"))
            continue
        if identity is not None and empty_ids:
            empties[identity] = empty_ids
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


def format_summary(summaries: list[dict], *, version: str) -> str:
    """The summary table: predicted, skipped as already done, failed with reasons (per rank when
    several), and the rate."""
    total = {
        k: sum(s[k] for s in summaries) for k in ("predicted", "skipped", "failed", "written", "regions")
    }
    seconds = max(s["seconds"] for s in summaries)
    lines = [f"pre-label with {version}:"]
    rows = [
        ("predicted", total["predicted"]),
        ("skipped (already done)", total["skipped"]),
        ("failed", total["failed"]),
    ]
    lines += [f"  {name:<24}{count:>8}" for name, count in rows]
    rate = 60.0 * total["predicted"] / seconds if seconds > 0 else 0.0
    lines.append(f"  {'regions':<24}{total['regions']:>8}")
    lines.append(
        f"  {seconds:.1f} s, {rate:.1f} tasks/min"
        + (f" over {len(summaries)} ranks" if len(summaries) > 1 else "")
    )
    reasons: dict[str, list[str]] = {}
    for s in summaries:
        for task, reason in s["failures"].items():
            reasons.setdefault(reason, []).append(task)
    for reason, tasks in sorted(reasons.items(), key=lambda item: -len(item[1])):
        shown = ", ".join(tasks[:10]) + (f" (+{len(tasks) - 10})" if len(tasks) > 10 else "")
        lines.append(f"  failed: {reason}: tasks {shown}")
    return "\n".join(lines)
