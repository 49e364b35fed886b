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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

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
    """All result items for one task and the prediction's overall score (mean region score). The model
    work (regions, answers) runs inside ``session()``; building Label Studio's results does not."""
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
        """One :class:`TaskResult` per task, in order."""
        results: list[TaskResult | None] = [None] * len(tasks)
        found: list[tuple[int, np.ndarray, list]] = []
        for index, rgb in self._load_images(tasks, schema, results):
            regions = self._regions(tasks[index], rgb, schema, results, index)
            if regions is not None:
                found.append((index, rgb, regions))
        for start in range(0, len(found), self.batch_tasks):
            self._answer(found[start : start + self.batch_tasks], tasks, schema, head, results)
        return [r for r in results if r is not None]

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

    def _answer(self, batch: list, tasks: list[dict], schema: ProjectSchema, head, results: list) -> None:
        items = [(rgb, regions) for _, rgb, regions in batch]
        try:
            with self.session():
                answers = answer_tasks(
                    items, schema=schema, osprey=self.models.region_model, options=self.options, head=head
                )
            with self.courtesy():  # no model needed; clicks go first
                labelled = task_results(items, answers, schema=schema, options=self.options)
        except Exception as error:  # every task of the batch says so
            if _out_of_memory(error):
                reason = "labelling: out of device memory"
                logger.warning("a batch of %d tasks ran out of device memory", len(batch))
            else:
                reason = f"internal error {internal_error(logger, f'labelling {len(batch)} tasks')}"
            for index, _, _ in batch:
                results[index] = TaskResult(task_id(tasks[index]), "failed", reason)
            return
        for (index, _, regions), (items, score) in zip(batch, labelled, strict=True):
            if items:
                results[index] = TaskResult(
                    task_id(tasks[index]), "predicted", result=items, score=score, regions=len(regions)
                )
            else:
                results[index] = TaskResult(
                    task_id(tasks[index]), "failed", "nothing to predict (nothing written)", retryable=False
                )

    def _load_images(
        self, tasks: list[dict], schema: ProjectSchema, results: list
    ) -> list[tuple[int, np.ndarray]]:
        def load(task: dict) -> np.ndarray:
            return self.loader.load(schema.image_reference(task)).rgb

        loaded = []
        with ThreadPoolExecutor(max_workers=min(self.image_threads, max(1, len(tasks)))) as pool:
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


def _out_of_memory(error: Exception) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()
