"""The durable job queue, in lanes (training, prelabel): one interface, two back ends side by side
(SQLite, the default; plain Redis at scale), chosen by :func:`make_queue`, and the per-lane workers.

May import ``backend.labelstudio`` (project ids), ``backend.database`` and third-party libraries.
"""

from __future__ import annotations

from pathlib import Path

from .base import (
    JOB_STATES,
    LANES,
    PRELABEL_LANE,
    TRAINING_LANE,
    Job,
    JobQueue,
    LeaseLostError,
    UnknownJobError,
    job_brief,
    lane_for,
)
from .redis_queue import RedisJobQueue
from .sqlite_queue import SqliteJobQueue
from .worker import JobHandler, Worker

__all__ = [
    "JOB_STATES",
    "LANES",
    "PRELABEL_LANE",
    "TRAINING_LANE",
    "Job",
    "JobHandler",
    "JobQueue",
    "LeaseLostError",
    "RedisJobQueue",
    "SqliteJobQueue",
    "UnknownJobError",
    "Worker",
    "job_brief",
    "lane_for",
    "make_queue",
]


def make_queue(
    *,
    sqlite_path: str | Path,
    redis_url: str | None = None,
    max_attempts: int = 3,
    redis_prefix: str = "osprey",
) -> JobQueue:
    """The Redis queue when ``redis_url`` is set (``REDIS_URL``; its keys start with ``redis_prefix``), else
    the SQLite queue in the training store's file ``sqlite_path``."""
    if redis_url:
        return RedisJobQueue.from_url(redis_url, max_attempts=max_attempts, prefix=redis_prefix)
    return SqliteJobQueue(sqlite_path, max_attempts=max_attempts)
