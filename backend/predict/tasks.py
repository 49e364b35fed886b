"""Whole tasks in, Label Studio results out: one task with the annotator waiting (:func:`predict_task`),
or many at once (:class:`TaskPredictor`), which a batch ``/predict``, the deferred pre-label jobs and
``osprey-label prelabel`` all use.

A task that cannot be predicted says why and never fails the others: bad input (no image, an
unreadable region) gives its own message; our own errors give ``internal error <id>``, with the
traceback under that id in the log.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from backend.errors import InputError, internal_error
from backend.labelstudio.schema import ProjectSchema

from .answers import answer_tasks
from .options import PredictOptions
from .regions import find_regions
from .results import task_results

logger = logging.getLogger(__name__)

SessionFactory = Callable[[], contextlib.AbstractContextManager]


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


def task_id(task) -> int | None:
    """A task's Label Studio id, or None when it has none (or not an integer)."""
    value = task.get("id") if isinstance(task, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def predict_task(
    *,
    task: dict,
    rgb: np.ndarray,
    schema: ProjectSchema,
    context: dict | None,
    models,
    options: PredictOptions,
    head=None,
    session: SessionFactory = contextlib.nullcontext,
) -> tuple[list[dict], float]:
    """All result items for one task and the prediction's overall score (its least confident region's,
    :mod:`backend.predict.confidence`). The model work (regions, answers) runs inside ``session()``;
    building Label Studio's results does not."""
    with session():
        regions = find_regions(
            task=task, rgb=rgb, schema=schema, context=context, models=models, options=options
        )
        answers = answer_tasks(
            [(rgb, regions)], schema=schema, osprey=models.region_model, options=options, head=head
        )
    return task_results([(rgb, regions)], answers, schema=schema, options=options)[0]


class TaskPredictor:
    """Predicts tasks in batches across tasks: images fetched in parallel threads, each task's regions
    found with SAM, then every task's regions answered in the same forward passes and decoding loop.

    ``models``: Osprey, the SAM refiner and segment everything; ``loader``: an
    :class:`~backend.labelstudio.images.ImageLoader`; ``batch_tasks``: how many tasks share the model's
    forward passes; ``session``: a context manager factory entered around every model step (the
    scheduler at the caller's priority, with the project's adapter), so interactive requests run
    between steps; ``courtesy``: one entered around the work that needs no model (Label Studio's
    formats), which gives way to interactive requests at each region.
    """

    def __init__(
        self,
        *,
        models,
        loader,
        options: PredictOptions,
        batch_tasks: int = 4,
        session: SessionFactory = contextlib.nullcontext,
        courtesy: SessionFactory = contextlib.nullcontext,
        image_threads: int = 4,
    ) -> None:
        if batch_tasks < 1:
            raise ValueError(f"batch_tasks must be >= 1, got {batch_tasks}")
        self.models = models
        self.loader = loader
        self.options = options
        self.batch_tasks = int(batch_tasks)
        self.session = session
        self.courtesy = courtesy
        self.image_threads = max(1, int(image_threads))

    def predict(self, tasks: list[dict], schema: ProjectSchema, *, head=None) -> list[TaskResult]:
        """One :class:`TaskResult` per task, in order: :meth:`load`, :meth:`infer` and :meth:`build` in
        turn (the pipelined pre-label engine runs them in different threads, overlapping)."""
        return self.build(self.infer(self.load(tasks, schema), schema, head=head), schema)

    def load(self, tasks: list[dict], schema: ProjectSchema, *, pool: Executor | None = None) -> StagedBatch:
        """Stage 1, no model: every task's image fetched and decoded, in ``pool`` (or a pool of
        ``image_threads`` made for this call); a task whose image cannot be had is failed here."""
        batch = StagedBatch(tasks=list(tasks), results=[None] * len(tasks))
        if pool is None:
            with ThreadPoolExecutor(max_workers=min(self.image_threads, max(1, len(tasks)))) as own:
                batch.loaded = self._load_images(batch, schema, own)
        else:
            batch.loaded = self._load_images(batch, schema, pool)
        return batch

    def infer(self, batch: StagedBatch, schema: ProjectSchema, *, head=None) -> StagedBatch:
        """Stage 2, the model: each loaded task's regions (SAM), then every task's regions answered in
        forward passes shared by up to ``batch_tasks`` tasks; each step inside ``session()``."""
        for index, rgb in batch.loaded:
            regions = self._regions(batch.tasks[index], rgb, schema, batch.results, index)
            if regions is not None:
                batch.found.append((index, rgb, regions))
        batch.loaded = []  # the images now live in ``found`` only
        for start in range(0, len(batch.found), self.batch_tasks):
            group = batch.found[start : start + self.batch_tasks]
            items = [(rgb, regions) for _, rgb, regions in group]
            try:
                with self.session():
                    answers = answer_tasks(
                        items, schema=schema, osprey=self.models.region_model, options=self.options, head=head
                    )
            except Exception as error:  # every task of the group says so
                self._fail_group(batch, group, _failure_reason(error, len(group)))
                continue
            batch.answered.append((group, answers))
        batch.found = []
        return batch

    def build(self, batch: StagedBatch, schema: ProjectSchema) -> list[TaskResult]:
        """Stage 3, no model: Label Studio's results (masks to RLE, polygons) for every answered task;
        one :class:`TaskResult` per task of the batch, in order."""
        for group, answers in batch.answered:
            items = [(rgb, regions) for _, rgb, regions in group]
            try:
                with self.courtesy():  # no model needed; clicks go first
                    labelled = task_results(items, answers, schema=schema, options=self.options)
            except Exception as error:
                self._fail_group(batch, group, _failure_reason(error, len(group)))
                continue
            for (index, _, regions), (result, score) in zip(group, labelled, strict=True):
                identity = task_id(batch.tasks[index])
                if result:
                    batch.results[index] = TaskResult(
                        identity, "predicted", result=result, score=score, regions=len(regions)
                    )
                else:
                    batch.results[index] = TaskResult(
                        identity, "failed", "nothing to predict (nothing written)", retryable=False
                    )
        batch.answered = []
        return [r for r in batch.results if r is not None]

    @staticmethod
    def _fail_group(batch: StagedBatch, group: list, reason: str) -> None:
        for index, _, _ in group:
            batch.results[index] = TaskResult(task_id(batch.tasks[index]), "failed", reason)

    def _regions(self, task: dict, rgb, schema: ProjectSchema, results: list, index: int) -> list | None:
        try:
            with self.session():
                regions = find_regions(
                    task=task, rgb=rgb, schema=schema, context=None, models=self.models, options=self.options
                )
        except InputError as error:  # a stored region that cannot be read
            results[index] = TaskResult(task_id(task), "failed", f"regions: {error}", retryable=False)
            return None
        except Exception:
            error_id = internal_error(logger, f"finding the regions of task {task_id(task)}")
            results[index] = TaskResult(task_id(task), "failed", f"internal error {error_id}")
            return None
        if not regions and not any(not s.per_region for s in schema.fields):
            results[index] = TaskResult(
                task_id(task), "failed", "no regions found (nothing written)", retryable=False
            )
            return None
        return regions

    def _load_images(
        self, batch: StagedBatch, schema: ProjectSchema, pool: Executor
    ) -> list[tuple[int, np.ndarray]]:
        def load(task: dict) -> np.ndarray:
            return self.loader.load(schema.image_reference(task)).rgb

        tasks, results = batch.tasks, batch.results
        loaded = []
        futures = {index: pool.submit(load, task) for index, task in enumerate(tasks)}
        for index, future in futures.items():
            try:
                loaded.append((index, future.result()))
            except InputError as error:  # no image in the task, or one that cannot be loaded
                results[index] = TaskResult(task_id(tasks[index]), "failed", f"image: {error}")
            except Exception:
                error_id = internal_error(logger, f"loading the image of task {task_id(tasks[index])}")
                results[index] = TaskResult(task_id(tasks[index]), "failed", f"internal error {error_id}")
        return loaded


@dataclass
class StagedBatch:
    """Tasks on their way through :class:`TaskPredictor`'s stages: ``results`` (one slot per task, set
    when a task is failed or done), ``loaded`` [(index, rgb)] after :meth:`TaskPredictor.load`,
    ``answered`` [(group, answers)] after :meth:`TaskPredictor.infer`."""

    tasks: list[dict]
    results: list[TaskResult | None]
    loaded: list = field(default_factory=list)
    found: list = field(default_factory=list)
    answered: list = field(default_factory=list)


def _failure_reason(error: Exception, tasks: int) -> str:
    if _out_of_memory(error):
        logger.warning("a batch of %d tasks ran out of device memory", tasks)
        return "labelling: out of device memory"
    return f"internal error {internal_error(logger, f'labelling {tasks} tasks')}"


def _out_of_memory(error: Exception) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()
