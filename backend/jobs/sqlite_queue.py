"""The job queue in the training store's SQLite file (the default back end).

Jobs are rows of the ``jobs`` table (see :mod:`backend.database`), each in a lane: at most one queued
job per project and kind, at most one running job per project and lane (both enforced by unique
indexes, so two processes on one file cannot break them), leases kept as POSIX times, finished jobs
pruned to ``keep_finished_jobs`` per project.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

from backend.database import SqliteDatabase, dumps
from backend.labelstudio.ids import project_key

from .base import (
    Job,
    LeaseLostError,
    UnknownJobError,
    check_kind,
    check_lane,
    job_brief,
    lane_conflict_message,
    lane_for,
    lost_lease_message,
    status_counts,
)

logger = logging.getLogger(__name__)


class SqliteJobQueue(SqliteDatabase):
    """The job queue on SQLite (see :mod:`backend.jobs.base` for the semantics).

    ``max_attempts`` is how often a job whose worker died is claimed before it fails; ``keep_finished_jobs``
    bounds the finished jobs kept per project; ``busy_timeout_s`` and ``synchronous`` as for the store.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_attempts: int = 3,
        keep_finished_jobs: int = 200,
        busy_timeout_s: float = 30.0,
        synchronous: str = "FULL",
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.max_attempts = int(max_attempts)
        self.keep_finished_jobs = int(keep_finished_jobs)
        super().__init__(path, busy_timeout_s=busy_timeout_s, synchronous=synchronous)

    def enqueue(
        self, project_id: str, kind: str, payload: dict | None = None, *, lane: str | None = None
    ) -> str:
        """Queue a job in ``lane`` (default ``lane_for(kind)``); returns its id. While a job of this project
        and kind is queued, that job is returned instead, with its payload replaced by this one (the
        newest request wins); ValueError when ``lane`` is named and that job waits in another lane."""
        project, payload_json = project_key(project_id), dumps(payload or {})
        check_kind(kind)
        named = lane is not None
        lane = check_lane(lane) if named else lane_for(kind)
        with self._write() as conn:
            row = conn.execute(
                "SELECT job_id, lane FROM jobs WHERE project_id = ? AND kind = ? AND status = 'queued'",
                (project, kind),
            ).fetchone()
            if row is not None:
                if named and row["lane"] != lane:
                    raise ValueError(lane_conflict_message(str(row["job_id"]), kind, row["lane"], lane))
                conn.execute("UPDATE jobs SET payload_json = ? WHERE job_id = ?", (payload_json, row[0]))
                return str(row[0])
            cursor = conn.execute(
                "INSERT INTO jobs (project_id, kind, lane, payload_json, status, max_attempts, created_at)"
                " VALUES (?, ?, ?, ?, 'queued', ?, ?)",
                (project, kind, lane, payload_json, self.max_attempts, time.time()),
            )
            return str(cursor.lastrowid)

    def claim(self, worker_id: str, lease_s: float, *, lane: str) -> Job | None:
        """Atomically take the oldest queued job of ``lane`` whose project has no running job in that lane,
        or None.

        The job becomes ``running`` for ``worker_id`` until ``now + lease_s`` (``heartbeat`` extends it).
        """
        check_lane(lane)
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0 seconds, got {lease_s}")
        now, token = time.time(), uuid.uuid4().hex
        with self._write() as conn:
            row = conn.execute(
                "SELECT job_id FROM jobs q WHERE lane = ? AND status = 'queued' AND NOT EXISTS (SELECT 1"
                " FROM jobs r WHERE r.project_id = q.project_id AND r.lane = q.lane AND r.status = 'running')"
                " ORDER BY job_id LIMIT 1",
                (lane,),
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1, worker_id = ?, token = ?,"
                " lease_s = ?, lease_until = ?, started_at = ?, heartbeat_at = ? WHERE job_id = ?",
                (worker_id, token, float(lease_s), now + lease_s, now, now, row[0]),
            )
            return self._job(conn, row[0])

    def heartbeat(self, job_id: str, *, token: str | None = None) -> bool:
        """Extend a running job's lease by its ``lease_s``; False when the job is no longer held."""
        try:
            row_id = _row_id(job_id)
        except UnknownJobError:
            return False
        now = time.time()
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET lease_until = ? + lease_s, heartbeat_at = ? WHERE job_id = ?"
                " AND status = 'running' AND (? IS NULL OR token = ?)",
                (now, now, row_id, token, token),
            )
            return cursor.rowcount == 1

    def complete(self, job_id: str, result: dict | None = None, *, token: str | None = None) -> None:
        """Mark a running job done with its ``result`` (a JSON object). Raises LeaseLostError when the
        job is not running (or, with ``token``, no longer held by that claim): nothing is marked."""
        self._finish(job_id, "done", result_json=dumps(result or {}), error=None, token=token)

    def fail(self, job_id: str, error: str, *, token: str | None = None) -> None:
        """Mark a running job failed, keeping ``error``; LeaseLostError as for ``complete``."""
        self._finish(job_id, "failed", result_json=None, error=str(error)[:4000], token=token)

    def _finish(self, job_id, status: str, *, result_json, error, token: str | None) -> None:
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET status = ?, result_json = ?, error = ?, finished_at = ?, lease_until = NULL"
                " WHERE job_id = ? AND status = 'running' AND (? IS NULL OR token = ?)",
                (status, result_json, error, time.time(), _row_id(job_id), token, token),
            )
            if cursor.rowcount != 1:
                job = self._job(conn, _row_id(job_id))
                raise LeaseLostError(lost_lease_message(job.job_id, job.status, job.attempts))
            project = conn.execute(
                "SELECT project_id FROM jobs WHERE job_id = ?", (_row_id(job_id),)
            ).fetchone()[0]
            conn.execute(
                "DELETE FROM jobs WHERE project_id = ? AND status IN ('done', 'failed') AND job_id NOT IN"
                " (SELECT job_id FROM jobs WHERE project_id = ? AND status IN ('done', 'failed')"
                " ORDER BY job_id DESC LIMIT ?)",
                (project, project, self.keep_finished_jobs),
            )

    def requeue_stale(self, *, now: float | None = None) -> dict:
        """Running jobs whose lease expired (their worker died): back to ``queued``, or ``failed`` once
        ``max_attempts`` claims were spent. A stale job whose project and kind already has a queued job
        is failed as superseded by it. Returns ``{"requeued": [ids], "failed": [ids]}``."""
        now = time.time() if now is None else now
        out: dict[str, list[str]] = {"requeued": [], "failed": []}
        with self._write() as conn:
            stale = conn.execute(
                "SELECT job_id, project_id, kind, attempts, max_attempts FROM jobs"
                " WHERE status = 'running' AND lease_until < ?",
                (now,),
            ).fetchall()
            for job_id, project, kind, attempts, max_attempts in stale:
                queued = conn.execute(
                    "SELECT job_id FROM jobs WHERE project_id = ? AND kind = ? AND status = 'queued'",
                    (project, kind),
                ).fetchone()
                if attempts >= max_attempts or queued is not None:
                    why = (
                        f"worker lost (lease expired) on attempt {attempts} of {max_attempts}"
                        if queued is None
                        else f"worker lost (lease expired); superseded by queued job {queued[0]}"
                    )
                    conn.execute(
                        "UPDATE jobs SET status = 'failed', error = ?, finished_at = ?, lease_until = NULL,"
                        " token = NULL WHERE job_id = ?",
                        (why, now, job_id),
                    )
                    out["failed"].append(str(job_id))
                else:
                    conn.execute(
                        "UPDATE jobs SET status = 'queued', worker_id = NULL, token = NULL, lease_until = NULL"
                        " WHERE job_id = ?",
                        (job_id,),
                    )
                    out["requeued"].append(str(job_id))
        if stale:
            logger.warning("stale jobs: requeued %s, failed %s", out["requeued"], out["failed"])
        return out

    def job(self, job_id: str) -> Job:
        """One job by id; UnknownJobError when there is none."""
        return self._job(self._conn(), _row_id(job_id))

    def jobs(self, project_id: str, *, limit: int = 50) -> list[Job]:
        """The project's jobs, newest first."""
        rows = self._conn().execute(
            "SELECT * FROM jobs WHERE project_id = ? ORDER BY job_id DESC LIMIT ?",
            (project_key(project_id), limit),
        )
        return [self._job_from_row(r) for r in rows]

    def active(self, project_id: str, *, lane: str) -> list[Job]:
        """Every queued or running job of the project in ``lane``, oldest first (however many)."""
        rows = self._conn().execute(
            "SELECT * FROM jobs WHERE lane = ? AND status IN ('queued', 'running') AND project_id = ? "
            "ORDER BY job_id",
            (check_lane(lane), project_key(project_id)),
        )
        return [self._job_from_row(r) for r in rows]

    def status(self) -> dict:
        """Job counts per state (``queued``, ``running``, ``done``, ``failed``) in all and per lane
        (``"lanes": {lane: {state: n}}``), the last error and the last finished job (/health, /metrics)."""
        conn = self._conn()
        counts = status_counts(conn.execute("SELECT lane, status, count(*) FROM jobs GROUP BY lane, status"))
        last_failed = conn.execute(
            "SELECT * FROM jobs WHERE status = 'failed' ORDER BY finished_at DESC LIMIT 1"
        ).fetchone()
        last = conn.execute(
            "SELECT * FROM jobs WHERE status IN ('done', 'failed') ORDER BY finished_at DESC LIMIT 1"
        ).fetchone()
        return {
            "backend": "sqlite",
            **counts,
            "last_error": job_brief(self._job_from_row(last_failed)) if last_failed else None,
            "last_finished": job_brief(self._job_from_row(last)) if last else None,
        }

    def _job(self, conn, job_id: int) -> Job:
        row = conn.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise UnknownJobError(f"no job has id {job_id}; list them with jobs(project_id)")
        return self._job_from_row(row)

    @staticmethod
    def _job_from_row(r) -> Job:
        return Job(
            job_id=str(r["job_id"]),
            project_id=r["project_id"],
            kind=r["kind"],
            lane=r["lane"],
            payload=json.loads(r["payload_json"]),
            status=r["status"],
            attempts=r["attempts"],
            max_attempts=r["max_attempts"],
            created_at=r["created_at"],
            worker_id=r["worker_id"],
            token=r["token"],
            lease_until=r["lease_until"],
            started_at=r["started_at"],
            finished_at=r["finished_at"],
            result=json.loads(r["result_json"]) if r["result_json"] else None,
            error=r["error"],
        )


def _row_id(job_id) -> int:
    """A job id as the table's integer key; UnknownJobError for ids this back end never hands out."""
    try:
        return int(job_id)
    except (TypeError, ValueError):
        raise UnknownJobError(
            f"no job has id {job_id!r}; SQLite job ids are integers such as '12' (list them with "
            f"jobs(project_id))"
        ) from None
