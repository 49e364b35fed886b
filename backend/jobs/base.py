"""What every job queue shares: the ``Job`` record, the queue interface, its errors and the brief form
status pages show.

Semantics, whatever the back end: ``enqueue`` keeps at most one queued job per project and kind;
``claim`` hands out the oldest queued job of a project with no running job, leased for ``lease_s``
seconds; ``heartbeat`` extends the lease; ``complete``/``fail`` record the outcome only while the claim
still holds (else LeaseLostError); ``requeue_stale`` puts jobs whose worker died back in the queue, or
fails them after ``max_attempts`` claims.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

JOB_STATES = ("queued", "running", "done", "failed")


class LeaseLostError(RuntimeError):
    """A job was finished by a worker that no longer holds it (its lease expired and it was requeued)."""


class UnknownJobError(ValueError):
    """No job has this id."""


@dataclass(frozen=True)
class Job:
    """A queued, running or finished job. ``token`` identifies one claim: finishing a job with a stale
    token raises LeaseLostError. ``lease_until`` is the POSIX time after which a running job is stale."""

    job_id: str
    project_id: str
    kind: str
    payload: dict
    status: str
    attempts: int
    max_attempts: int
    created_at: float
    worker_id: str | None = None
    token: str | None = None
    lease_until: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    result: dict | None = None
    error: str | None = None


class JobQueue(Protocol):
    """What the worker and the service need from a job queue (see the module docstring)."""

    def enqueue(self, project_id: str, kind: str, payload: dict | None = None) -> str: ...
    def claim(self, worker_id: str, lease_s: float) -> Job | None: ...
    def heartbeat(self, job_id: str, *, token: str | None = None) -> bool: ...
    def complete(self, job_id: str, result: dict | None = None, *, token: str | None = None) -> None: ...
    def fail(self, job_id: str, error: str, *, token: str | None = None) -> None: ...
    def requeue_stale(self, *, now: float | None = None) -> dict: ...
    def job(self, job_id: str) -> Job: ...
    def jobs(self, project_id: str, *, limit: int = 50) -> list[Job]: ...
    def status(self) -> dict: ...


def job_brief(job: Job) -> dict:
    """A finished job as a small JSON object for status pages."""
    brief = {
        "job_id": job.job_id,
        "project_id": job.project_id,
        "kind": job.kind,
        "status": job.status,
        "attempts": job.attempts,
        "finished_at": job.finished_at,
    }
    if job.error:
        brief["error"] = job.error
    if job.result:
        brief["result"] = job.result
    return brief
