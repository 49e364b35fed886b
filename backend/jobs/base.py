"""What every job queue shares: the ``Job`` record, the lanes, the queue interface, its errors and the
brief form status pages show.

Lanes: every job belongs to one lane, :data:`PRELABEL_LANE` for ``prelabel`` / ``prelabel-*`` kinds (the
deferred part of a Retrieve Predictions batch, which a user is waiting for) and :data:`TRAINING_LANE`
for everything else (``train``, ``lora``: minutes to an hour). Each lane has its own worker, so deferred
pre-labels never wait behind a LoRA job.

Semantics, whatever the back end: ``enqueue`` files a job in ``lane_for(kind)`` and keeps at most one
queued job per project and kind (a second enqueue replaces the payload and returns the same id);
``claim(lane=...)`` hands out the oldest queued job of that lane whose project has no running job *in
that lane*, leased for ``lease_s`` seconds; ``heartbeat`` extends the lease; ``complete``/``fail``
record the outcome only while the claim still holds (else LeaseLostError); ``requeue_stale`` puts jobs
whose worker died back in their lane's queue, or fails them after ``max_attempts`` claims.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

JOB_STATES = ("queued", "running", "done", "failed")

TRAINING_LANE = "training"
PRELABEL_LANE = "prelabel"
LANES = (PRELABEL_LANE, TRAINING_LANE)

# The kind prefix of deferred pre-label jobs (``prelabel-<hex>``, one per deferral); the lane rule lives
# here, below backend.prelabel, because the queue files jobs by it.
_PRELABEL_KIND = "prelabel"


def lane_for(kind: str) -> str:
    """The lane a job of ``kind`` runs in: ``prelabel`` for ``prelabel`` and ``prelabel-*``, else
    ``training``."""
    if kind == _PRELABEL_KIND or kind.startswith(f"{_PRELABEL_KIND}-"):
        return PRELABEL_LANE
    return TRAINING_LANE


def check_kind(kind) -> str:
    """``kind`` if it is a non-empty string, else ValueError."""
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind must be a non-empty string such as 'train', got {kind!r}")
    return kind


def check_lane(lane) -> str:
    """``lane`` if it is one of :data:`LANES`, else ValueError."""
    if lane not in LANES:
        raise ValueError(
            f"lane must be one of {LANES}, got {lane!r}; jobs are filed by lane_for(kind), and each worker "
            f"claims one lane"
        )
    return lane


def lost_lease_message(job_id: str, status: str, attempts: int) -> str:
    """The LeaseLostError text both back ends raise."""
    return (
        f"job {job_id} is {status} (attempt {attempts}), not held by this claim; its lease expired and it "
        f"was requeued or finished elsewhere, so this outcome was not recorded"
    )


def lane_conflict_message(job_id: str, kind: str, queued_lane: str, lane: str) -> str:
    """The ValueError text for an enqueue whose lane differs from the queued job it would merge into."""
    return (
        f"job {job_id} of kind {kind!r} is queued in lane {queued_lane!r}, and a project keeps one queued "
        f"job per kind, so it cannot also be queued in lane {lane!r}; leave lane= out (lane_for(kind) "
        f"picks it) or wait until job {job_id} runs"
    )


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
    lane: str
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
    """What the workers and the service need from a job queue (see the module docstring)."""

    def enqueue(
        self, project_id: str, kind: str, payload: dict | None = None, *, lane: str | None = None
    ) -> str: ...
    def claim(self, worker_id: str, lease_s: float, *, lane: str) -> Job | None: ...
    def heartbeat(self, job_id: str, *, token: str | None = None) -> bool: ...
    def complete(self, job_id: str, result: dict | None = None, *, token: str | None = None) -> None: ...
    def fail(self, job_id: str, error: str, *, token: str | None = None) -> None: ...
    def requeue_stale(self, *, now: float | None = None) -> dict: ...
    def job(self, job_id: str) -> Job: ...
    def jobs(self, project_id: str, *, limit: int = 50) -> list[Job]: ...
    def active(self, project_id: str, *, lane: str) -> list[Job]: ...
    def status(self) -> dict: ...


def job_brief(job: Job) -> dict:
    """A finished job as a small JSON object for status pages."""
    brief = {
        "job_id": job.job_id,
        "project_id": job.project_id,
        "kind": job.kind,
        "lane": job.lane,
        "status": job.status,
        "attempts": job.attempts,
        "finished_at": job.finished_at,
    }
    if job.error:
        brief["error"] = job.error
    if job.result:
        brief["result"] = job.result
    return brief


def status_counts(rows) -> dict:
    """``{state: n, ..., "lanes": {lane: {state: n}}}`` from ``(lane, state, n)`` rows, every lane and
    state present (zeros included): the counting part of ``status()`` for both back ends."""
    lanes = {lane: dict.fromkeys(JOB_STATES, 0) for lane in LANES}
    for lane, state, n in rows:
        if lane in lanes and state in lanes[lane]:
            lanes[lane][state] += int(n)
    totals = {state: sum(counts[state] for counts in lanes.values()) for state in JOB_STATES}
    return {**totals, "lanes": lanes}
