"""The SQLite job queue: one queued job per project and kind, one running job per project, leases,
retries and the file it shares with the training store."""

from __future__ import annotations

import pytest

from backend.database import SCHEMA_VERSION
from backend.jobs import LeaseLostError, SqliteJobQueue, UnknownJobError


@pytest.fixture
def queue(tmp_path):
    queue = SqliteJobQueue(tmp_path / "train.db")
    yield queue
    queue.close()


def test_schema_is_created_in_wal_mode_and_reopening_keeps_data(tmp_path):
    path = tmp_path / "nested" / "train.db"
    first = SqliteJobQueue(path)
    assert first.schema_version() == SCHEMA_VERSION == 2
    job_id = first.enqueue("3", "train", {"n": 1})
    first.close()
    again = SqliteJobQueue(path)
    assert again.job(job_id).payload == {"n": 1}
    assert again._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again.close()


def test_enqueue_keeps_one_queued_job_per_project_and_kind(queue):
    first = queue.enqueue("3", "train", {"changes": 10})
    assert queue.enqueue("3.99", "train", {"changes": 20}) == first
    assert queue.job(first).payload == {"changes": 20}
    other_kind = queue.enqueue("3", "lora", {})
    other_project = queue.enqueue("4", "train", {})
    assert len({first, other_kind, other_project}) == 3
    with pytest.raises(ValueError, match="kind"):
        queue.enqueue("3", "", {})
    with pytest.raises(UnknownJobError, match="no job has id 999"):
        queue.job("999")


def test_one_running_job_per_project(queue):
    train = queue.enqueue("3", "train", {})
    lora = queue.enqueue("3", "lora", {})
    elsewhere = queue.enqueue("4", "train", {})
    first = queue.claim("w1", 30)
    assert first.job_id == train and first.status == "running" and first.attempts == 1
    second = queue.claim("w2", 30)
    assert second.job_id == elsewhere  # project 3 is busy, so its lora job waits
    assert queue.claim("w3", 30) is None
    again = queue.enqueue("3", "train", {"more": True})  # a new request while the first one runs
    assert again != train
    queue.complete(train, {"accuracy": 0.9}, token=first.token)
    assert queue.claim("w3", 30).job_id == lora
    assert queue.job(train).result == {"accuracy": 0.9} and queue.job(train).status == "done"


def test_failed_job_keeps_its_error_and_status_reports_it(queue):
    job_id = queue.enqueue("3", "train", {})
    job = queue.claim("w1", 30)
    queue.fail(job_id, "CUDA out of memory", token=job.token)
    status = queue.status()
    assert status["failed"] == 1 and status["running"] == 0
    assert status["last_error"]["error"] == "CUDA out of memory" and status["last_error"]["job_id"] == job_id
    assert status["last_finished"]["status"] == "failed"
    assert queue.jobs("3")[0].error == "CUDA out of memory"
    with pytest.raises(LeaseLostError, match="not held"):
        queue.complete(job_id, {})


def test_an_expired_lease_is_requeued_then_failed_after_max_attempts(tmp_path):
    queue = SqliteJobQueue(tmp_path / "t.db", max_attempts=2)
    job_id = queue.enqueue("3", "train", {})
    dead = queue.claim("dies", 0.01)
    assert queue.requeue_stale(now=dead.lease_until + 1) == {"requeued": [job_id], "failed": []}
    assert queue.job(job_id).status == "queued"
    with pytest.raises(LeaseLostError):  # the dead worker wakes up: its outcome is not recorded
        queue.complete(job_id, {"half": "done"}, token=dead.token)
    second = queue.claim("dies-too", 0.01)
    assert second.attempts == 2 and second.token != dead.token
    assert queue.requeue_stale(now=second.lease_until + 1) == {"requeued": [], "failed": [job_id]}
    failed = queue.job(job_id)
    assert failed.status == "failed" and "lease expired" in failed.error and failed.result is None
    assert queue.status()["last_error"]["job_id"] == job_id
    queue.close()


def test_heartbeat_extends_the_lease(queue):
    queue.enqueue("3", "train", {})
    job = queue.claim("w1", 0.5)
    assert queue.heartbeat(job.job_id, token=job.token)
    assert queue.job(job.job_id).lease_until > job.lease_until
    assert not queue.heartbeat(job.job_id, token="someone else")
    assert queue.requeue_stale(now=job.lease_until) == {"requeued": [], "failed": []}


def test_a_stale_job_is_superseded_by_a_newer_queued_one(queue):
    old = queue.enqueue("3", "train", {"changes": 1})
    job = queue.claim("dies", 0.01)
    newer = queue.enqueue("3", "train", {"changes": 2})
    assert queue.requeue_stale(now=job.lease_until + 1) == {"requeued": [], "failed": [old]}
    assert "superseded by queued job" in queue.job(old).error
    assert queue.claim("w2", 30).job_id == newer
