"""The sweep that finds what webhooks missed: Label Studio sends each webhook once and never again (a
backend that was down, a proxy that dropped it), so every ``OSPREY_RECONCILE_S`` the project's annotated
tasks are read through the API and compared with the training store.

An annotation the store has not seen, or has seen in an older version (by ``updated_at``), goes into the
webhook inbox as the ``ANNOTATION_UPDATED`` event Label Studio would have sent; an annotation the store
holds for a task that Label Studio no longer lists under it goes in as ``ANNOTATIONS_DELETED``. From
there the intake parses them like any webhook, so a sweep and a late webhook never store one annotation
twice (versions are ordered, repeats are duplicates).

Only what can have changed is read. A project's first sweep (after a start: when webhooks were lost)
and one at least every :data:`~backend.jobs.periodic.FULL_READ_S` read its annotated tasks (submitted or skipped; Label
Studio selects them). The sweeps between read only the tasks Label Studio changed since the newest
change the sweep has seen, less :data:`OVERLAP_S` (saves commit out of order): Label Studio touches a
task's ``updated_at`` whenever one of its annotations is saved or deleted. So a project of a million
annotated tasks costs what changed every few minutes, not a million task reads; and a task whose every
annotation was deleted is read too, so that deletion is found without its webhook. A whole read lists
no such task, so it also reads (by id) the tasks the store holds annotations for that it did not list:
their annotations that are gone, or whose task is gone, go in as deleted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from backend.jobs.periodic import GoneProjects, Periodic, whole_read_due
from backend.labelstudio.ids import project_key
from backend.labelstudio.results import annotation_timestamp

logger = logging.getLogger(__name__)

FIRST_SWEEP_S = 30.0  # after start: what was missed while the backend was down comes in soon
OVERLAP_S = 900.0  # a sweep re-reads the tasks changed this long before the newest change it saw


@dataclass(frozen=True)
class _Seen:
    """How far the sweep has read one project: ``newest``, the latest ``updated_at`` among the tasks it
    read (Label Studio's clock, so no skew), and ``full_at`` (this process's clock), its last whole read."""

    newest: datetime
    full_at: float


class Reconciler:
    """Sweeps the ``projects()`` (ids) every ``interval_s`` seconds in a thread of its own.

    Collaborators: ``client`` (the Label Studio API client), ``store`` (``annotation_state``,
    ``task_annotation_ids``, ``annotated_task_ids``), ``inbox`` (``append``) and ``arrived()`` (the
    intake parses now)."""

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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0 seconds, got {interval_s}")
        self.client, self.store, self.inbox = client, store, inbox
        self.projects, self.arrived = projects, arrived
        self.interval_s = float(interval_s)
        self.first_sweep_s = min(float(first_sweep_s), self.interval_s)
        self.last: dict = {}  # what the last sweep found, for /metrics
        self.clock = clock
        self._seen: dict[str, _Seen] = {}
        self._reads: dict[str, str] = {}  # what each project's last sweep read, for /metrics
        self._gone = GoneProjects("reconciliation")
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
            if self._gone.skip(project, self.clock()):
                continue
            try:
                found[project] = self.sweep_project(project)
                self._gone.swept(project)
            except Exception as error:  # Label Studio down, a project deleted: the others are still swept
                self._gone.failed(project, error, self.clock())
        if any(found.values()):
            self.arrived()
        self.last = {"found": found, "read": {p: self._reads[p] for p in found if p in self._reads},
                     "gone": self._gone.gone()}  # fmt: skip
        return found

    def sweep_project(self, project: str) -> int:
        """Compare ``project``'s annotated tasks in Label Studio (all of them, or those changed since
        the last sweep: see the module docstring) with the store; events appended."""
        seen, now = self._seen.get(project), self.clock()
        whole = whole_read_due(seen.full_at if seen else None, now)
        if whole:
            listing = self.client.tasks(int(project), annotated=True)
            self._reads[project] = "annotated tasks"
        else:
            since = seen.newest - timedelta(seconds=OVERLAP_S)
            listing = self.client.tasks(int(project), updated_after=since)
            self._reads[project] = f"tasks changed after {since.isoformat()}"
        newest = None if whole else seen.newest
        appended = 0
        page: list[dict] = []
        listed: set[int] = set()
        for task in listing:
            page.append(task)
            listed.add(task["id"])
            changed = _when(task.get("updated_at"))
            if changed is not None and (newest is None or changed > newest):
                newest = changed
            if len(page) >= 100:
                appended += self._compare(project, page)
                page = []
        appended += self._compare(project, page) if page else 0
        if whole:  # tasks the store has annotations for that Label Studio no longer lists as annotated
            appended += self._orphans(project, self.store.annotated_task_ids(project) - listed)
        if newest is not None:  # without a time from Label Studio, the next sweep reads the whole again
            self._seen[project] = _Seen(newest, now if whole else seen.full_at)
        return appended

    def _orphans(self, project: str, task_ids: set[int]) -> int:
        """Compare the tasks the store holds annotations for and a whole read did not list: each
        annotation of theirs that is gone (deleted, or with its task) goes in as deleted."""
        if not task_ids:
            return 0
        wanted = sorted(task_ids)
        found = {t["id"]: t for t in self.client.tasks(int(project), ids=wanted, skip_missing=True)}
        return self._compare(project, [found.get(i) or {"id": i, "annotations": []} for i in wanted])

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


def _when(value) -> datetime | None:
    """A task's ``updated_at`` as Label Studio writes it (ISO 8601, UTC), or None."""
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)  # Label Studio's is UTC
