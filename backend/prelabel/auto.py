"""Automatic pre-labelling on import (``OSPREY_AUTO_PRELABEL=1``): new tasks get a prediction without
anyone clicking *Retrieve Predictions*.

Label Studio (1.23) creates a webhook to the backend's ``/webhook`` when the ML backend is connected,
with *send for all actions*, so ``TASKS_CREATED`` arrives with every import (the tasks' ids, possibly
in several webhooks of ``WEBHOOK_BATCH_SIZE`` tasks each). The webhook goes through the intake's inbox
like every other (stored, answered in milliseconds); the intake thread then calls
:meth:`AutoPrelabel.tasks_created`, which queues a ``prelabel-*`` job on the pre-label lane for exactly
those tasks (the same jobs a deferred batch queues, run by the same worker with the bulk engine).

Per project: the ML backend connection's *extra params* in Label Studio (``{"auto_prelabel": true}`` or
``false``), which Label Studio sends at ``/setup``, override ``OSPREY_AUTO_PRELABEL`` for that project
(:meth:`~backend.runtime.projects.Projects.auto_prelabel`), so one backend can pre-label the imports of
some projects and not of others. A project that is off has its ``TASKS_CREATED`` ignored and is left out
of the sweep.

A task someone has annotated (submitted or skipped) is left alone: the sweep does not read it (Label
Studio leaves it out of the listing), and a queued job leaves it if it was annotated by the time the job reads it (an import with annotations, an
annotator faster than the queue). After a promotion, only the tasks still to label get the new version.

A webhook can be lost (the backend down, a proxy). Every ``OSPREY_AUTO_PRELABEL_SWEEP_S`` the sweep
reads each known project's unannotated tasks through the API and queues a job for those without a non-empty
prediction of the current model version that no queued or running job holds already. Neither a
re-import nor a sweep writes a second prediction of a version: the engine skips tasks that have one,
and the claims (:mod:`.claims`) keep two writers off one task.

The sweep reads a project whole only when it must: the first time (after a start, which is when
webhooks were lost), when the project's model version changed (a promoted head: its tasks lack the new
version), and at least every :data:`~backend.jobs.periodic.FULL_READ_S`. In between it reads only the tasks whose id is above
the highest it has looked at (Label Studio filters and orders them), since a lost webhook's tasks are
new ones. So a project of a million tasks costs its new tasks every few minutes, not a million task
reads with their predictions. The full sweeps catch what the id order cannot: an import whose ids were
taken before a later, shorter import's and committed after it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from backend.jobs.periodic import GoneProjects, Periodic, whole_read_due
from backend.labelstudio.ids import project_key

from .engine import current_predictions

logger = logging.getLogger(__name__)

TASKS_CREATED = "TASKS_CREATED"
JOB_TASKS = 1000  # tasks per queued job (a sweep of a big project queues several)
FIRST_SWEEP_S = 30.0  # the first sweep, this long after the start


@dataclass(frozen=True)
class _Swept:
    """How far the sweep has looked at one project: every task with an id up to ``high`` was seen with
    ``version`` current (and queued when it lacked a prediction of it); ``full_at``: the last whole read."""

    version: str
    high: int
    full_at: float


class AutoPrelabel:
    """The ``TASKS_CREATED`` handler and the sweep (see the module docstring).

    Collaborators: ``deferrals`` (``waiting``, ``defer``: :class:`~.deferral.Deferrals`), ``client``
    (the Label Studio API), ``projects`` (``known``, ``label_config``, ``version``, ``auto_prelabel``),
    ``count(key, n)`` (``/metrics``); ``default`` is ``OSPREY_AUTO_PRELABEL`` (for projects without their
    own choice), ``interval_s`` the sweep's period (0: no sweep)."""

    def __init__(
        self,
        *,
        deferrals,
        client,
        projects,
        count: Callable[[str, int], None],
        interval_s: float,
        default: bool = True,
        thread_name: str = "osprey-autoprelabel",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.deferrals, self.client, self.projects, self.count = deferrals, client, projects, count
        self.clock = clock
        self._swept: dict[str, _Swept] = {}
        self._gone = GoneProjects("auto pre-label sweep")
        self.default = bool(default)
        self.interval_s = float(interval_s)
        self.thread_name = thread_name
        self.last_sweep: dict | str = "not yet"
        self._periodic = None
        if self.interval_s > 0:
            self._periodic = Periodic(
                self.sweep, interval_s=self.interval_s, first_s=FIRST_SWEEP_S, thread_name=thread_name,
                what="sweeping for tasks to pre-label", on_error=self._failed,
            )  # fmt: skip

    def enabled(self, project: str) -> bool:
        """Whether ``project``'s new tasks are pre-labelled: its own choice, else ``OSPREY_AUTO_PRELABEL``."""
        choice = self.projects.auto_prelabel(project)
        return self.default if choice is None else choice

    # ---- the webhook (in the intake thread) ----
    def tasks_created(self, payload: dict) -> dict:
        """Queue a pre-label job for the tasks of one ``TASKS_CREATED`` webhook; its outcome."""
        project_info = payload.get("project") if isinstance(payload.get("project"), dict) else {}
        if project_info.get("id") is None:
            return {"status": "ignored", "reason": "no project id in the webhook"}
        project = project_key(project_info["id"])
        if not self.enabled(project):
            return {"status": "ignored", "reason": f"automatic pre-labelling is off for project {project}"}
        ids = [
            t["id"]
            for t in payload.get("tasks") or []
            if isinstance(t, dict) and isinstance(t.get("id"), int)
        ]
        ids += [t for t in payload.get("tasks") or [] if isinstance(t, int) and not isinstance(t, bool)]
        return self.queue(project, ids, reason="imported")

    def queue(self, project: str, task_ids: list[int], *, reason: str) -> dict:
        """Queue jobs of at most :data:`JOB_TASKS` for ``task_ids`` (less those a job holds already)."""
        label_config = self.projects.label_config(project)
        if label_config is None:
            return {"status": "ignored", "reason": f"project {project}'s label config is not known yet"}
        waiting = self.deferrals.waiting(project)
        todo = [t for t in dict.fromkeys(task_ids) if t not in waiting]
        version = self.projects.version(project)
        jobs = []
        for start in range(0, len(todo), JOB_TASKS):
            chunk = [{"id": t} for t in todo[start : start + JOB_TASKS]]
            job = self.deferrals.defer(
                project, chunk, label_config=label_config, model_version=version, leave_annotated=True
            )
            if job is None:
                return {"status": "ignored", "reason": "no Label Studio API access"}
            jobs.append(job)
        if todo:
            self.count(f"auto pre-label tasks queued ({reason})", len(todo))
            logger.info(
                "project %s: %d %s tasks queued for pre-labelling with %s (jobs %s)",
                project, len(todo), reason, version, ", ".join(str(j) for j in jobs),
            )  # fmt: skip
        return {
            "status": "queued",
            "tasks": len(todo),
            "already_queued": len(task_ids) - len(todo),
            "jobs": jobs,
        }

    # ---- the sweep ----
    def sweep(self) -> dict:
        """One pass over every known project: queue the tasks without a prediction of the current
        version (the whole project, or only its tasks above the ids already looked at: see the module
        docstring); what was found, per project."""
        found = {}
        for project in self.projects.known():
            if self._periodic is not None and self._periodic.stopping:
                break
            if not self.enabled(project):
                continue
            if self._gone.skip(project, self.clock()):
                found[project] = {"status": "gone"}
                continue
            try:
                found[project] = self._sweep(project)
                self._gone.swept(project)
            except Exception as error:  # Label Studio down, a project deleted: the others are still swept
                found[project] = {
                    "status": self._gone.failed(project, error, self.clock()),
                    "error": str(error),
                }
        self.last_sweep = {"at": round(time.time(), 1), "projects": found}
        return found

    def _sweep(self, project: str) -> dict:
        version, now = self.projects.version(project), self.clock()
        swept = self._swept.get(project)
        whole = whole_read_due(swept.full_at if swept else None, now) or swept.version != version
        after = None if whole else swept.high
        high, listed, missing = after or 0, 0, []
        for task in self.client.tasks(int(project), after=after, unannotated=True):  # annotated: left alone
            listed += 1
            high = max(high, task["id"])
            if not task.get("annotations") and not current_predictions(task, version)[0]:
                missing.append(task["id"])
        outcome = self.queue(project, missing, reason="found by the sweep") if missing else {"tasks": 0}
        if outcome.get("status") != "ignored":  # queued (or nothing to queue): these ids are covered
            self._swept[project] = _Swept(version, high, now if whole else swept.full_at)
        return {**outcome, "read": "all" if whole else f"ids above {after}", "listed": listed}

    def start(self) -> None:
        if self._periodic is not None:
            self._periodic.start()

    def stop(self, timeout_s: float = 30.0) -> bool:
        return self._periodic.stop(timeout_s) if self._periodic is not None else True

    def _failed(self, error: Exception) -> None:
        self.last_sweep = {"at": round(time.time(), 1), "error": str(error)}

    def metrics(self) -> dict:
        """``/metrics`` → ``prelabel`` → ``auto``: tasks waiting in pre-label jobs per known project, and
        the last sweep."""
        waiting = {}
        for project in self.projects.known():
            if not self.enabled(project):
                continue
            try:
                waiting[project] = len(self.deferrals.waiting(project))
            except Exception as error:  # the queue's database away must not break /metrics
                waiting[project] = str(error)
        return {
            "enabled": self.default,
            "projects": {project: self.enabled(project) for project in self.projects.known()},
            "sweep_s": self.interval_s,
            "waiting_tasks": waiting,
            "last_sweep": self.last_sweep,
        }
