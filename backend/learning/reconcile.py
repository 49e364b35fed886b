"""The sweep that finds what webhooks missed: Label Studio sends each webhook once and never again (a
backend that was down, a proxy that dropped it), so every ``OSPREY_RECONCILE_S`` the project's annotated
tasks are read through the API and compared with the training store.

An annotation the store has not seen, or has seen in an older version (by ``updated_at``), goes into the
webhook inbox as the ``ANNOTATION_UPDATED`` event Label Studio would have sent; an annotation the store
holds for a task that Label Studio no longer lists under it goes in as ``ANNOTATIONS_DELETED``. From
there the intake parses them like any webhook, so a sweep and a late webhook never store one annotation
twice (versions are ordered, repeats are duplicates).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from backend.jobs.periodic import Periodic
from backend.labelstudio.ids import project_key
from backend.labelstudio.results import annotation_timestamp

logger = logging.getLogger(__name__)

FIRST_SWEEP_S = 30.0  # after start: what was missed while the backend was down comes in soon


class Reconciler:
    """Sweeps the ``projects()`` (ids) every ``interval_s`` seconds in a thread of its own.

    Collaborators: ``client`` (the Label Studio API client), ``store`` (``annotation_state``,
    ``task_annotation_ids``), ``inbox`` (``append``) and ``arrived()`` (the intake parses now)."""

    def __init__(
        self,
        *,
        client,
        store,
        inbox,
        projects: Callable[[], list[str]],
        arrived: Callable[[], None],
        interval_s: float,
        thread_name: str = "osprey-reconcile",
        first_sweep_s: float = FIRST_SWEEP_S,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0 seconds, got {interval_s}")
        self.client, self.store, self.inbox = client, store, inbox
        self.projects, self.arrived = projects, arrived
        self.interval_s = float(interval_s)
        self.first_sweep_s = min(float(first_sweep_s), self.interval_s)
        self.last: dict = {}  # what the last sweep found, for /metrics
        self._periodic = Periodic(
            self.sweep, interval_s=self.interval_s, first_s=self.first_sweep_s, thread_name=thread_name,
            what="reconciling annotations with Label Studio",
        )  # fmt: skip

    def start(self) -> None:
        self._periodic.start()

    def stop(self, timeout_s: float = 30.0) -> bool:
        return self._periodic.stop(timeout_s)

    def sweep(self) -> dict[str, int]:
        """One pass over every project; per project, how many events it put in the inbox."""
        found: dict[str, int] = {}
        for project in self.projects():
            if self._periodic.stopping:
                break
            try:
                found[project] = self.sweep_project(project)
            except Exception as error:  # Label Studio down, a project gone: the others are still swept
                logger.warning("project %s: reconciliation failed, tried again in %.0f s: %s", project,
                               self.interval_s, error)  # fmt: skip
        if any(found.values()):
            self.arrived()
        self.last = {"found": found}
        return found

    def sweep_project(self, project: str) -> int:
        """Compare ``project``'s annotated tasks in Label Studio with the store; events appended."""
        appended = 0
        page: list[dict] = []
        for task in self.client.tasks(int(project), only_annotated=True):
            page.append(task)
            if len(page) >= 100:
                appended += self._compare(project, page)
                page = []
        return appended + (self._compare(project, page) if page else 0)

    def _compare(self, project: str, tasks: list[dict]) -> int:
        stored = self.store.task_annotation_ids(project, [t["id"] for t in tasks])
        appended = 0
        for task in tasks:
            annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict) and a.get("id")]
            for annotation in annotations:
                seen = self.store.annotation_state(project, annotation["id"], task["id"])
                if seen is not None and (seen[0] == "deleted" or annotation_timestamp(annotation) <= seen[1]):
                    continue
                self.inbox.append(
                    "ANNOTATION_UPDATED", project, _event(project, task, annotation), source="reconcile"
                )
                appended += 1
            gone = stored[task["id"]] - {int(a["id"]) for a in annotations}
            if gone:
                event = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": i} for i in sorted(gone)],
                         "project": {"id": int(project_key(project))}}  # fmt: skip
                self.inbox.append("ANNOTATIONS_DELETED", project, event, source="reconcile")
                appended += 1
        if appended:
            logger.info(
                "project %s: reconciliation found %d annotation events the webhooks missed", project, appended
            )
        return appended


def _event(project: str, task: dict, annotation: dict) -> dict:
    """The webhook Label Studio would have sent for ``annotation`` of ``task``."""
    return {
        "action": "ANNOTATION_UPDATED",
        "annotation": {**annotation, "task": task["id"]},
        "task": {"id": task["id"], "data": task.get("data") or {}},
        "project": {"id": int(project_key(project))},
    }
