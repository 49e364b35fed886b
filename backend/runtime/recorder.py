"""What the backend predicted, written to the training store behind the answer (acceptance tracking).

An annotation is later compared with the prediction it started from, so every prediction the backend
makes (interactive, batch, deferred, bulk) is recorded. Writing waits for SQLite's lock, so it happens
on one background thread, in order, after the answer has gone; whatever reads predictions (webhooks,
``/metrics``) calls :meth:`PredictionRecorder.flush` first. A busy store never fails a prediction.
"""

from __future__ import annotations

import concurrent.futures
import logging
import sqlite3

logger = logging.getLogger(__name__)


class PredictionRecorder:
    """Records predictions into ``store`` (``record_prediction``) on its own thread; :meth:`close` drains
    the queue and stops the thread."""

    def __init__(self, *, store, thread_name: str = "osprey-record") -> None:
        self.store = store
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._closed = False

    def record(
        self, project: str | None, task_id, version: str, items: list, *, interactive: bool = False
    ) -> None:
        """Queue one task's predicted ``items`` (Label Studio result items) for the store."""
        if not project or task_id is None or self._closed:
            return
        self._pool.submit(self._write, project, task_id, version, items, interactive)

    def flush(self, timeout_s: float = 5.0) -> None:
        """Wait (at most ``timeout_s``) until every prediction recorded so far is in the store."""
        if self._closed:
            return
        try:
            self._pool.submit(lambda: None).result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            logger.warning(
                "predictions are still being written after %.1f s; reading the store anyway", timeout_s
            )

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        self._closed = True
        self._pool.shutdown(wait=True)

    def _write(self, project: str, task_id, version: str, items: list, interactive: bool) -> None:
        try:
            self.store.record_prediction(
                project_id=project,
                task_id=task_id,
                model_version=version,
                result=items,
                interactive=interactive,
            )
        except (sqlite3.Error, ValueError) as error:
            logger.warning(
                "project %s: could not record the prediction of task %s: %s", project, task_id, error
            )
