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
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from backend.labelstudio.api import LabelStudioAPIError
from backend.labelstudio.schema import ProjectSchema
from backend.predict.tasks import TaskPredictor, TaskResult, task_id

from .claims import Claimer, converge
from .pipeline import run_stages

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
    elsewhere: int = 0  # left to another writer holding their claims
    duplicates: int = 0  # other writers' duplicates deleted (see claims.converge)
    gone: int = 0  # deleted from Label Studio while they were pre-labelled

    @property
    def tasks_per_minute(self) -> float:
        return 60.0 * self.predicted / self.seconds if self.seconds > 0 else 0.0

    def add(self, result: TaskResult) -> None:
        """Count one task's outcome."""
        if result.status == "predicted":
            self.predicted += 1
            self.regions += result.regions
        elif result.status == "skipped":
            self.skipped += 1
        elif result.status == "elsewhere":
            self.elsewhere += 1
        elif result.status == "gone":
            self.gone += 1
        else:
            self.failed[result.task_id] = result.reason or "failed"

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
            "elsewhere": self.elsewhere,
            "gone": self.gone,
            "duplicates_deleted": self.duplicates,
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
    claimer: Claimer | None = None,
    pipeline: bool = True,
    prefetch: int = 2,
) -> Summary:
    """Predict every task of ``tasks`` that has no prediction of ``model_version`` yet and write it
    through ``sink`` (``create_predictions(project, items)``, ``delete_prediction(id)``, and
    ``tasks(project, ids=..., skip_missing=True)`` to read back: see :func:`write_chunk` and
    :func:`backend.prelabel.claims.converge`).

    Each batch of tasks is claimed through ``claimer`` before it is predicted (tasks another writer
    holds are left to it, counted as ``elsewhere``), read back (tasks finished meanwhile are skipped),
    and its claims are given back once written or failed. ``pipeline`` (the default) overlaps the
    stages (:mod:`backend.prelabel.pipeline`, ``prefetch`` batches ahead); False runs them one after
    another. Both give the same answers and the same writes.

    ``on_result`` sees every task's final :class:`TaskResult` (progress bars, logs), from any thread.
    Failed tasks are tried ``retries`` more times, after ``backoff_s``, then twice that, and so on.
    """
    run = _Run(
        predictor=predictor, schema=schema, project=project, model_version=model_version, sink=sink, head=head,
        chunk_tasks=chunk_tasks, retries=retries, on_result=on_result, sleep=sleep,
        claimer=claimer or Claimer(None, str(project), model_version, owner="-"),
    )  # fmt: skip
    started = time.perf_counter()
    try:
        pending = _unfinished(tasks, run)
        for attempt in range(1, retries + 2):
            if attempt > 1:
                if not run.retry:
                    break
                sleep(backoff_s * 2 ** (attempt - 2))
                pending, run.retry = iter(run.retry), []
            batches = _batches(pending, predictor.batch_tasks)
            if pipeline:
                run_stages(batches, attempt=attempt, run=run, prefetch=prefetch)
            else:
                for batch in batches:
                    admitted = run.admit(batch)
                    if admitted:
                        run.accept(predictor.predict(admitted, schema, head=head), admitted, attempt)
                run.flush()
    finally:
        run.claimer.release(sorted(run.held))  # a run cut off gives its claims back at once
    run.summary.seconds = time.perf_counter() - started
    return run.summary


class _Run:
    """One run's state and the steps every batch goes through, in either engine: ``admit`` (claim and
    read back), the predictor's stages, ``accept`` (results to the write buffer or to the retries) and
    ``flush`` (a chunk written, duplicates converged, claims given back). ``finish`` may be called from
    several threads."""

    def __init__(self, *, predictor, schema, project, model_version, sink, head, chunk_tasks, retries, on_result,
                 sleep, claimer: Claimer) -> None:  # fmt: skip
        self.predictor, self.schema, self.head = predictor, schema, head
        self.project, self.model_version, self.sink = project, model_version, sink
        self.chunk_tasks, self.retries, self.on_result, self.sleep = chunk_tasks, retries, on_result, sleep
        self.claimer = claimer
        self.summary = Summary()
        self.buffer: list[TaskResult] = []
        self.retry: list[dict] = []
        self.held: set[int] = set()
        self._lock = threading.Lock()

    def finish(self, result: TaskResult) -> None:
        with self._lock:
            self.summary.add(result)
        if self.on_result is not None:
            self.on_result(result)

    def count(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self.summary, name, getattr(self.summary, name) + n)

    def admit(self, batch: list[dict]) -> list[dict]:
        """The tasks of ``batch`` this run now holds and that are still to do."""
        ids = [i for i in (task_id(t) for t in batch) if i is not None]
        claimed = self.claimer.claim(ids)
        with self._lock:
            self.held |= claimed
        mine, found_done = [], converge(self.sink, self.project, sorted(claimed), self.model_version)
        self.count(deleted_empty=found_done.empty, duplicates=found_done.duplicates)
        for task in batch:
            identity = task_id(task)
            if identity is not None and identity not in claimed:
                self.finish(TaskResult(identity, "elsewhere", "being pre-labelled by another writer"))
            elif identity in found_done.done:
                self.finish(
                    TaskResult(identity, "skipped", f"already has a prediction of {self.model_version}")
                )
            else:
                mine.append(task)
        kept = {task_id(task) for task in mine}
        self._release([identity for identity in claimed if identity not in kept])
        return mine

    def accept(self, results: list[TaskResult], tasks: list[dict], attempt: int) -> None:
        """Results of one batch (in order of ``tasks``): predicted ones to the write buffer (written
        once it holds ``chunk_tasks``), retryable failures to the next round, the rest finished."""
        for task, result in zip(tasks, results, strict=True):
            result.attempts = attempt
            if result.status == "predicted":
                self.buffer.append(result)
                if len(self.buffer) >= self.chunk_tasks:
                    self.flush()
                continue
            self._release([result.task_id])
            if attempt <= self.retries and result.retryable:
                self.retry.append(task)
                logger.info(
                    "task %s failed (attempt %d), will retry: %s", result.task_id, attempt, result.reason
                )
            else:
                self.finish(result)

    def flush(self) -> None:
        if not self.buffer:
            return
        chunk, self.buffer = self.buffer, []
        items = [
            {"task": r.task_id, "result": r.result, "score": r.score, "model_version": self.model_version}
            for r in chunk
        ]
        outcome = write_chunk(self.sink, self.project, items, self.model_version, sleep=self.sleep)
        stored = [
            r.task_id for r in chunk if r.task_id not in outcome.gone and r.task_id not in outcome.refused
        ]
        after = converge(self.sink, self.project, stored, self.model_version)
        self.count(written=outcome.written, deleted_empty=after.empty, duplicates=after.duplicates)
        self._release([r.task_id for r in chunk])
        for result in chunk:
            if result.task_id in outcome.gone:
                self.finish(
                    TaskResult(result.task_id, "gone", "deleted from Label Studio while it was pre-labelled")
                )
            elif result.task_id in outcome.refused:
                self.finish(
                    TaskResult(result.task_id, "failed", outcome.refused[result.task_id], retryable=False)
                )
            else:
                self.finish(result)

    def _release(self, ids: list) -> None:
        ids = [i for i in ids if i is not None]
        if ids:
            self.claimer.release(ids)
            with self._lock:
                self.held.difference_update(ids)


@dataclass
class Written:
    """What became of a chunk of predictions: how many exist now that did not before, the tasks deleted
    from Label Studio meanwhile (``gone``), and those whose prediction it refused, with its reason."""

    written: int = 0
    gone: set[int] = field(default_factory=set)
    refused: dict[int, str] = field(default_factory=dict)

    def add(self, other: Written) -> Written:
        self.written += other.written
        self.gone |= other.gone
        self.refused.update(other.refused)
        return self


def write_chunk(sink, project: int, items: list[dict], model_version: str, *, attempts: int = 4,
                backoff_s: float = 2.0, sleep: Callable[[float], None] = time.sleep, whole: bool = True) -> Written:  # fmt: skip
    """Write one chunk of predictions so that no task ends with two of ``model_version``, whatever fails,
    and one task Label Studio will not take costs no other task its prediction.

    A failure whose outcome is unknown (the request went out, no answer came back: a reset, a timeout, a
    5xx after sending) is followed by reading back which of the chunk's tasks now hold a prediction of
    this version; only the others are sent again. A failure known not to have written (nothing was
    sent) sends the same chunk again. After ``attempts`` the last error is raised. A write Label Studio
    refuses (a 4xx: a task deleted meanwhile makes it refuse the whole request, a proxy refuses a body
    over its size) is sent again in halves until the tasks it is about are found: those deleted are
    ``gone``, the others ``refused`` with Label Studio's reason; a refused write of several stores none
    of them, so nothing is written twice. When every task of a ``whole`` chunk of several is refused on
    its own, Label Studio refuses the writes, not these tasks (a label config changed under the run, say):
    its error is raised, as for any write that cannot succeed, instead of failing the project task by task."""
    pending, outcome = list(items), Written()
    for attempt in range(1, attempts + 1):
        if not pending:
            return outcome
        try:
            outcome.written += sink.create_predictions(project, pending)
            return outcome
        except LabelStudioAPIError as error:
            if error.kind == "refused" and not error.outcome_unknown:
                apart = _refused_apart(sink, project, pending, model_version, error, backoff_s, sleep)
                if whole and len(pending) > 1 and len(apart.refused) == len(pending):
                    raise
                return outcome.add(apart)
            if error.outcome_unknown:
                done = already_written(sink, project, [item["task"] for item in pending], model_version)
                outcome.written += len(done)
                pending = [item for item in pending if item["task"] not in done]
                if not pending:
                    return outcome
            if attempt == attempts:
                raise
            logger.warning(
                "writing %d predictions failed (%s); %d of them still to send, again in %.0f s",
                len(items), error, len(pending), backoff_s * 2 ** (attempt - 1),
            )  # fmt: skip
            sleep(backoff_s * 2 ** (attempt - 1))
    return outcome


def _refused_apart(sink, project: int, items: list[dict], model_version: str, error: LabelStudioAPIError,
                   backoff_s: float, sleep: Callable[[float], None]) -> Written:  # fmt: skip
    """A refused write of ``items``: the tasks deleted meanwhile (the usual cause) are left out and the
    rest sent again; when none was, one task's prediction is refused, or the write is sent again in two
    halves, each as :func:`write_chunk` sends a chunk."""
    asked = [item["task"] for item in items]
    present = {task["id"] for task in sink.tasks(project, ids=asked, skip_missing=True)}
    if len(present) < len(asked):
        outcome = Written(gone={task for task in asked if task not in present})
        rest = [item for item in items if item["task"] in present]
        return outcome.add(
            write_chunk(sink, project, rest, model_version, backoff_s=backoff_s, sleep=sleep, whole=False)
        )
    if len(items) == 1:
        logger.warning("Label Studio refused the prediction of task %s: %s", asked[0], error)
        return Written(refused={asked[0]: f"Label Studio refused its prediction: {error}"})
    logger.warning(
        "Label Studio refused a write of %d predictions (%s); sending them in halves to find the tasks it "
        "refuses", len(items), error,
    )  # fmt: skip
    half = len(items) // 2
    outcome = Written()
    for part in (items[:half], items[half:]):
        outcome.add(
            write_chunk(sink, project, part, model_version, backoff_s=backoff_s, sleep=sleep, whole=False)
        )
    return outcome


def already_written(sink, project: int, task_ids: list[int], model_version: str) -> set[int]:
    """The tasks among ``task_ids`` that hold a non-empty prediction of ``model_version`` now."""
    tasks = sink.tasks(project, ids=task_ids, skip_missing=True)
    return {task["id"] for task in tasks if current_predictions(task, model_version)[0]}


def _unfinished(tasks: Iterable[dict], run: _Run) -> Iterator[dict]:
    """The tasks still to predict; tasks already done are finished as skipped (their stray empty
    predictions of this version deleted). Empty ones of tasks still to do go once they are written."""
    version = run.model_version
    for task in tasks:
        done, empty_ids = current_predictions(task, version)
        if done:
            for prediction_id in empty_ids:
                run.sink.delete_prediction(prediction_id)
            run.count(deleted_empty=len(empty_ids))
            run.finish(TaskResult(task_id(task), "skipped", f"already has a prediction of {version}"))
            continue
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


def format_summary(summary: dict, *, version: str) -> str:
    """The summary table (:meth:`Summary.to_dict`): predicted, skipped as already done, left to another
    writer, failed with reasons and task ids, and the rate."""
    lines = [f"pre-label with {version}:"]
    rows = [
        ("predicted", summary["predicted"]),
        ("skipped (already done)", summary["skipped"]),
        *([("left to another writer", summary["elsewhere"])] if summary["elsewhere"] else []),
        *([("deleted meanwhile", summary["gone"])] if summary.get("gone") else []),
        ("failed", summary["failed"]),
    ]
    lines += [f"  {name:<24}{count:>8}" for name, count in rows]
    lines.append(f"  {'regions':<24}{summary['regions']:>8}")
    lines.append(f"  {summary['seconds']:.1f} s, {summary['tasks_per_minute']:.1f} tasks/min")
    reasons: dict[str, list[str]] = {}
    for task, reason in summary["failures"].items():
        reasons.setdefault(reason, []).append(task)
    for reason, tasks in sorted(reasons.items(), key=lambda item: -len(item[1])):
        shown = ", ".join(tasks[:10]) + (f" (+{len(tasks) - 10})" if len(tasks) > 10 else "")
        lines.append(f"  failed: {reason}: tasks {shown}")
    return "\n".join(lines)
