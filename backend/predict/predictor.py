"""``/predict``: one request of Label Studio's, interactive (an annotator's click, one task) or a batch
(*Retrieve Predictions*, any number of tasks), answered with exactly one result per task.

Project ids arrive normalised (``"7"``). The label config is the request's, else the one Label Studio
sent at ``/setup``; the ``model_version`` is the project's current one, and so is the head blended into
the answers.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

from backend.errors import NotReadyError, RequestError
from backend.labelstudio.ids import bad_task_ids
from backend.labelstudio.images import ImageLoadError

from .batch import BatchPredictor
from .options import PredictOptions
from .tasks import predict_task, task_id

logger = logging.getLogger(__name__)


class Predictor:
    """Answers ``/predict`` bodies.

    Collaborators: ``projects`` (``schema_for``, ``label_config``, ``remember``, ``version``, ``head``),
    ``models`` (Osprey and SAM), ``loader`` (task images), ``options``, ``session(project)`` (the model
    at interactive priority, with the project's adapter), ``batch`` (a :class:`BatchPredictor`),
    ``record`` and ``count`` (see :class:`BatchPredictor`), and ``slots``: how many predictions may
    run at once (``THREADS`` - 2, so ``/health`` and ``/setup`` always find a thread)."""

    def __init__(
        self,
        *,
        projects,
        models,
        loader,
        options: PredictOptions,
        session: Callable[[str | None], contextlib.AbstractContextManager],
        batch: BatchPredictor,
        record: Callable[..., None],
        count: Callable[[str, int], None],
        slots: int,
    ) -> None:
        self.projects = projects
        self.models = models
        self.loader = loader
        self.options = options
        self.session = session
        self.batch = batch
        self.record = record
        self.count = count
        self._slots = threading.BoundedSemaphore(max(1, slots))

    def predict(
        self,
        *,
        tasks: list,
        project: str | None,
        label_config: str | None,
        context: dict | None,
        disconnected: Callable[[], bool] | None = None,
    ) -> dict:
        """``{"results": [...]}`` (and ``errors``) for the tasks; NotReadyError (503) when every slot is
        taken, RequestError (400) for a malformed request. ``disconnected`` says whether the client has
        gone (a batch then defers its tasks instead of answering)."""
        if not self._slots.acquire(timeout=0.05):
            self.count("refused busy", 1)
            raise NotReadyError("the backend is busy with other predictions; retry in a moment")
        try:
            return self._predict(
                tasks=tasks,
                project=project,
                label_config=label_config,
                context=context,
                disconnected=disconnected,
            )
        finally:
            self._slots.release()

    def _predict(
        self,
        *,
        tasks: list,
        project: str | None,
        label_config: str | None,
        context: dict | None,
        disconnected=None,
    ) -> dict:
        if label_config is None:
            label_config = self.projects.label_config(project) if project else None
            if label_config is None:
                raise RequestError("'label_config' is missing and /setup was not called for this project")
        schema = self.projects.schema_for(label_config)
        self.projects.remember(project, label_config)
        version = self.projects.version(project)
        head = self.projects.head(project)
        if context is not None and len(tasks) != 1:
            raise RequestError(
                f"an interactive request (params.context) must carry one task, got {len(tasks)}"
            )
        if context is None:
            return self._batch(tasks, schema, label_config, project, version, head, disconnected)
        bad = bad_task_ids(tasks)
        if bad:
            raise RequestError(bad[0])
        self.options.limits.check_context(context)  # 413 before the image is loaded or the model waited for
        task = tasks[0]
        try:
            image = self._load(schema.image_reference(task))
            items, score = predict_task(
                task=task, rgb=image.rgb, schema=schema, context=context, models=self.models,
                options=self.options, head=head, session=lambda: self.session(project),
            )  # fmt: skip
        except Exception:
            self.count("tasks failed", 1)  # the annotator is waiting on this one task: the error says why
            raise
        self.record(project, task_id(task), version, items, interactive=True)
        self.count("tasks ok", 1)
        return {"results": [{"result": items, "score": score, "model_version": version}]}

    def _load(self, reference: str):
        try:
            return self.loader.load(reference)
        except ImageLoadError as error:
            raise RequestError(f"cannot load the task image: {error}") from None

    def _batch(
        self,
        tasks: list,
        schema,
        label_config: str,
        project: str | None,
        version: str,
        head,
        disconnected=None,
    ) -> dict:
        """Exactly one result per task, in order. A task whose id is not a Label Studio id gets the answer
        without ``result`` (Label Studio stores nothing for it) and an error naming the field; the others
        are predicted by the :class:`BatchPredictor`."""
        bad = bad_task_ids(tasks)
        good = [index for index in range(len(tasks)) if index not in bad]
        out = self.batch.predict(
            [tasks[index] for index in good], schema=schema, label_config=label_config, project=project,
            version=version, head=head, disconnected=disconnected,
        )  # fmt: skip
        if not bad:
            return out
        self.count("tasks failed", len(bad))
        results: list[dict] = [{"score": 0.0, "model_version": version} for _ in tasks]
        for index, result in zip(good, out["results"], strict=True):
            results[index] = result
        errors = [{**error, "index": good[error["index"]]} for error in out.get("errors", [])]
        errors += [{"index": index, "task": None, "error": reason} for index, reason in bad.items()]
        return {**out, "results": results, "errors": sorted(errors, key=lambda error: error["index"])}
