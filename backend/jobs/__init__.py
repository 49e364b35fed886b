"""The durable job queue: one interface, two back ends side by side (SQLite, the default; Redis + RQ
at scale), chosen by :func:`make_queue`.

May import ``backend.labelstudio`` (project ids), ``backend.database`` and third-party libraries.
"""

from __future__ import annotations

from pathlib import Path

from .base import JOB_STATES, Job, JobQueue, LeaseLostError, UnknownJobError, job_brief
from .redis_queue import RedisJobQueue
from .sqlite_queue import SqliteJobQueue

__all__ = [
    "JOB_STATES",
    "Job",
    "JobQueue",
    "LeaseLostError",
    "RedisJobQueue",
    "SqliteJobQueue",
    "UnknownJobError",
    "job_brief",
    "make_queue",
]


def make_queue(*, sqlite_path: str | Path, redis_url: str | None = None, max_attempts: int = 3) -> JobQueue:
    """The Redis queue when ``redis_url`` is set (``REDIS_URL``), else the SQLite queue in the training
    store's file ``sqlite_path``."""
    if redis_url:
        return RedisJobQueue.from_url(redis_url, max_attempts=max_attempts)
    return SqliteJobQueue(sqlite_path, max_attempts=max_attempts)
