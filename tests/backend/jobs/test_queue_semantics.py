"""The queue semantics both back ends share, call by call (backend/jobs/base.py): one queued job per
project and kind, one running job per project and lane, leases, retries, outcomes and status."""

from __future__ import annotations

import pytest

from backend.jobs import PRELABEL_LANE, TRAINING_LANE, LeaseLostError, UnknownJobError


def test_enqueue_keeps_one_queued_job_per_project_and_kind(queue):
    first = queue.enqueue("3", "train", {"changes": 10})
    assert queue.enqueue("3.99", "train", {"changes": 20}) == first
    assert queue.job(first).payload == {"changes": 20}
    other_kind = queue.enqueue("3", "lora", {})
    other_project = queue.enqueue("4", "train", {})
    deferrals = {queue.enqueue("3", f"prelabel-{n:012x}", {"task_ids": [n]}) for n in range(3)}
    assert len({first, other_kind, other_project} | deferrals) == 6  # each prelabel-<hex> kind is its own
    assert all(isinstance(job_id, str) for job_id in deferrals)
    assert [j.job_id for j in queue.jobs("3")][:3] == sorted(deferrals, key=int, reverse=True)
    assert len(queue.jobs("3", limit=2)) == 2 and len(queue.jobs("3")) == 5
    with pytest.raises(ValueError, match="kind"):
        queue.enqueue("3", "", {})
    with pytest.raises(UnknownJobError, match="no job has id 999"):
        queue.job("999")
    with pytest.raises(UnknownJobError, match="no job has id"):
        queue.job("not-an-id")


def test_one_running_job_per_project_in_a_lane(queue):
    train = queue.enqueue("3", "train", {})
    lora = queue.enqueue("3", "lora", {})
    elsewhere = queue.enqueue("4", "train", {})
    first = queue.claim("w1", 30, lane=TRAINING_LANE)
    assert first.job_id == train and first.status == "running" and first.attempts == 1
    assert first.worker_id == "w1" and first.lease_until > first.started_at
    second = queue.claim("w2", 30, lane=TRAINING_LANE)
    assert second.job_id == elsewhere  # project 3 is busy in this lane, so its lora job waits
    assert queue.claim("w3", 30, lane=TRAINING_LANE) is None
    again = queue.enqueue("3", "train", {"more": True})  # a new request while the first one runs
    assert again != train
    queue.complete(train, {"accuracy": 0.9}, token=first.token)
    assert queue.claim("w3", 30, lane=TRAINING_LANE).job_id == lora
    assert queue.job(train).result == {"accuracy": 0.9} and queue.job(train).status == "done"


def test_active_gives_every_queued_and_running_job_of_a_project_in_a_lane(queue):
    """However many there are: a sweep of a big project queues hundreds of pre-label jobs, and the
    tasks of every one of them must count as waiting (a newest-N listing missed the older ones)."""
    queued = [queue.enqueue("3", f"prelabel-{n:012x}", {"task_ids": [n]}) for n in range(260)]
    queue.enqueue("4", "prelabel-000000000999", {"task_ids": [999]})  # another project
    queue.enqueue("3", "train", {})  # another lane
    running = queue.claim("w1", 30, lane=PRELABEL_LANE)
    assert running.job_id == queued[0]
    finished = queue.claim("w2", 30, lane=PRELABEL_LANE)  # project 4's: 3 already runs one in the lane
    queue.complete(finished.job_id, {}, token=finished.token)
    active = queue.active("3", lane=PRELABEL_LANE)
    assert [j.job_id for j in active] == queued
    assert [j.status for j in active[:2]] == ["running", "queued"]
    assert {t for j in active for t in j.payload["task_ids"]} == set(range(260))
    queue.complete(running.job_id, {}, token=running.token)
    assert [j.job_id for j in queue.active("3.1700000000", lane=PRELABEL_LANE)] == queued[1:]
    assert queue.active("4", lane=PRELABEL_LANE) == []
    assert [j.kind for j in queue.active("3", lane=TRAINING_LANE)] == ["train"]
    with pytest.raises(ValueError, match="lane"):
        queue.active("3", lane="gpu")


def test_failed_job_keeps_its_error_and_status_reports_it(queue):
    job_id = queue.enqueue("3", "train", {})
    job = queue.claim("w1", 30, lane=TRAINING_LANE)
    queue.fail(job_id, "CUDA out of memory", token=job.token)
    status = queue.status()
    assert status["failed"] == 1 and status["running"] == 0
    assert status["last_error"]["error"] == "CUDA out of memory" and status["last_error"]["job_id"] == job_id
    assert status["last_finished"]["status"] == "failed"
    assert queue.jobs("3")[0].error == "CUDA out of memory"
    with pytest.raises(LeaseLostError, match="not held"):
        queue.complete(job_id, {})
    with pytest.raises(UnknownJobError):
        queue.complete("424242", {})


def test_an_expired_lease_is_requeued_then_failed_after_max_attempts(make):
    queue = make(max_attempts=2)
    job_id = queue.enqueue("3", "train", {})
    dead = queue.claim("dies", 0.01, lane=TRAINING_LANE)
    assert queue.requeue_stale(now=dead.lease_until + 1) == {"requeued": [job_id], "failed": []}
    assert queue.job(job_id).status == "queued" and queue.job(job_id).token is None
    with pytest.raises(LeaseLostError):  # the dead worker wakes up: its outcome is not recorded
        queue.complete(job_id, {"half": "done"}, token=dead.token)
    second = queue.claim("dies-too", 0.01, lane=TRAINING_LANE)
    assert second.attempts == 2 and second.token != dead.token
    assert queue.requeue_stale(now=second.lease_until + 1) == {"requeued": [], "failed": [job_id]}
    failed = queue.job(job_id)
    assert failed.status == "failed" and "lease expired" in failed.error and failed.result is None
    assert queue.status()["last_error"]["job_id"] == job_id
    assert queue.status()["running"] == 0 and queue.claim("w", 5, lane=TRAINING_LANE) is None


def test_heartbeat_extends_the_lease(queue):
    queue.enqueue("3", "train", {})
    job = queue.claim("w1", 0.5, lane=TRAINING_LANE)
    assert queue.heartbeat(job.job_id, token=job.token)
    assert queue.job(job.job_id).lease_until > job.lease_until
    assert not queue.heartbeat(job.job_id, token="someone else")
    assert not queue.heartbeat("424242")
    assert queue.requeue_stale(now=job.lease_until) == {"requeued": [], "failed": []}
    queue.complete(job.job_id, {}, token=job.token)
    assert not queue.heartbeat(job.job_id, token=job.token)  # finished: nothing to keep alive


def test_a_stale_job_is_superseded_by_a_newer_queued_one(queue):
    old = queue.enqueue("3", "train", {"changes": 1})
    job = queue.claim("dies", 0.01, lane=TRAINING_LANE)
    newer = queue.enqueue("3", "train", {"changes": 2})
    assert queue.requeue_stale(now=job.lease_until + 1) == {"requeued": [], "failed": [old]}
    assert "superseded by queued job" in queue.job(old).error
    assert queue.claim("w2", 30, lane=TRAINING_LANE).job_id == newer


def test_a_job_keeps_its_fields_through_claim_and_completion(queue):
    job_id = queue.enqueue("12.1731000000", "prelabel-beef", {"task_ids": [5], "label_config": "<View/>"})
    queued = queue.job(job_id)
    assert (queued.project_id, queued.kind, queued.lane, queued.status) == ("12", "prelabel-beef",
                                                                            PRELABEL_LANE, "queued")  # fmt: skip
    assert queued.attempts == 0 and queued.max_attempts == 3 and queued.created_at > 0
    assert queued.worker_id is None and queued.started_at is None and queued.result is None
    claimed = queue.claim("w", 30, lane=PRELABEL_LANE)
    assert claimed.payload == queued.payload and claimed.token and claimed.started_at >= queued.created_at
    queue.complete(job_id, {"written": 1, "nested": {"ok": [1, 2]}}, token=claimed.token)
    done = queue.job(job_id)
    assert done.status == "done" and done.result == {"written": 1, "nested": {"ok": [1, 2]}}
    assert done.finished_at >= done.started_at and done.lease_until is None and done.error is None
