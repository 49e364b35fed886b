"""The SQLite training store: schema versions, predictions, the job queue, concurrent writers."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading

import pytest
from webhook_payloads import box_mask, claim_all, predicted, write_annotations

from backend.learning.store import (
    LeaseLostError,
    StoreVersionError,
    TrainingStore,
    UnknownJobError,
    compare_versions,
    project_key,
)


@pytest.fixture
def store(tmp_path):
    store = TrainingStore(tmp_path / "train.db")
    yield store
    store.close()


# ---- schema ----


def test_schema_is_created_in_wal_mode_and_reopening_keeps_data(tmp_path):
    path = tmp_path / "nested" / "train.db"
    first = TrainingStore(path)
    assert first.schema_version() == 1
    job_id = first.enqueue("3", "train", {"n": 1})
    first.close()
    again = TrainingStore(path)
    assert again.job(job_id).payload == {"n": 1}
    assert again._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again.close()


def test_a_database_from_a_newer_version_is_refused(tmp_path):
    path = tmp_path / "train.db"
    TrainingStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreVersionError, match="schema version 99.*upgrade osprey-label"):
        TrainingStore(path)


def test_project_keys_and_version_order():
    assert project_key("3.1717171717") == project_key(3) == "3"
    with pytest.raises(ValueError, match="project id"):
        project_key(None)
    assert compare_versions(2.0, "a", 1.0, "z") == 1
    assert compare_versions(1.0, "a", 1.0, "a") == 0
    assert compare_versions(1.0, "a", 1.0, "b") == -1


# ---- predictions ----


def test_batch_predictions_replace_and_interactive_ones_add(store):
    mask = box_mask(2, 10, 2, 10)
    store.record_prediction(
        project_id="3.17", task_id=5, model_version="v1", result=predicted("a", mask, category="dog")
    )
    store.record_prediction(
        project_id="3.17", task_id=5, model_version="v1", result=predicted("b", mask, category="cat")
    )
    assert [p.region_id for p in store.predicted_regions("3", 5)] == ["b"]
    store.record_prediction(
        project_id=3, task_id=5, model_version="v1", result=predicted("c", mask), interactive=True
    )
    store.record_prediction(project_id=3, task_id=5, model_version="v2", result=predicted("d", mask))
    regions = store.predicted_regions(3, 5)
    assert [p.region_id for p in regions] == ["d", "c", "b"]
    assert regions[2].items[0]["type"] == "brushlabels" and regions[2].items[1]["value"]["choices"] == ["cat"]
    assert {p.source for p in regions} == {"batch", "interactive"}
    assert (
        store.record_prediction(project_id=3, task_id=None, model_version="v1", result=predicted("e", mask))
        == 0
    )


def test_predicted_regions_are_bounded_per_project(tmp_path):
    store = TrainingStore(tmp_path / "t.db", max_predicted_regions=5)
    mask = box_mask(2, 10, 2, 10)
    for task_id in range(130):
        store.record_prediction(
            project_id=3, task_id=task_id, model_version="v1", result=predicted(f"r{task_id}", mask)
        )
    kept = store._conn().execute("SELECT count(*) FROM predicted_regions").fetchone()[0]
    assert kept <= 5 + 1  # pruned every 128 calls
    assert store.predicted_regions(3, 129)  # the newest survive
    store.close()


# ---- the job queue ----


def test_enqueue_keeps_one_queued_job_per_project_and_kind(store):
    first = store.enqueue("3", "train", {"changes": 10})
    assert store.enqueue("3.99", "train", {"changes": 20}) == first
    assert store.job(first).payload == {"changes": 20}
    other_kind = store.enqueue("3", "lora", {})
    other_project = store.enqueue("4", "train", {})
    assert len({first, other_kind, other_project}) == 3
    with pytest.raises(ValueError, match="kind"):
        store.enqueue("3", "", {})
    with pytest.raises(UnknownJobError, match="no job has id 999"):
        store.job("999")


def test_one_running_job_per_project(store):
    train = store.enqueue("3", "train", {})
    lora = store.enqueue("3", "lora", {})
    elsewhere = store.enqueue("4", "train", {})
    first = store.claim("w1", 30)
    assert first.job_id == train and first.status == "running" and first.attempts == 1
    second = store.claim("w2", 30)
    assert second.job_id == elsewhere  # project 3 is busy, so its lora job waits
    assert store.claim("w3", 30) is None
    again = store.enqueue("3", "train", {"more": True})  # a new request while the first one runs
    assert again != train
    store.complete(train, {"accuracy": 0.9}, token=first.token)
    assert store.claim("w3", 30).job_id == lora
    assert store.job(train).result == {"accuracy": 0.9} and store.job(train).status == "done"


def test_failed_job_keeps_its_error_and_status_reports_it(store):
    job_id = store.enqueue("3", "train", {})
    job = store.claim("w1", 30)
    store.fail(job_id, "CUDA out of memory", token=job.token)
    status = store.status()
    assert status["failed"] == 1 and status["running"] == 0
    assert status["last_error"]["error"] == "CUDA out of memory" and status["last_error"]["job_id"] == job_id
    assert status["last_finished"]["status"] == "failed"
    assert store.jobs("3")[0].error == "CUDA out of memory"
    with pytest.raises(LeaseLostError, match="not held"):
        store.complete(job_id, {})


def test_an_expired_lease_is_requeued_then_failed_after_max_attempts(tmp_path):
    store = TrainingStore(tmp_path / "t.db", max_attempts=2)
    job_id = store.enqueue("3", "train", {})
    dead = store.claim("dies", 0.01)
    assert store.requeue_stale(now=dead.lease_until + 1) == {"requeued": [job_id], "failed": []}
    assert store.job(job_id).status == "queued"
    with pytest.raises(LeaseLostError):  # the dead worker wakes up: its outcome is not recorded
        store.complete(job_id, {"half": "done"}, token=dead.token)
    second = store.claim("dies-too", 0.01)
    assert second.attempts == 2 and second.token != dead.token
    assert store.requeue_stale(now=second.lease_until + 1) == {"requeued": [], "failed": [job_id]}
    failed = store.job(job_id)
    assert failed.status == "failed" and "lease expired" in failed.error and failed.result is None
    assert store.status()["last_error"]["job_id"] == job_id
    store.close()


def test_heartbeat_extends_the_lease(store):
    store.enqueue("3", "train", {})
    job = store.claim("w1", 0.5)
    assert store.heartbeat(job.job_id, token=job.token)
    assert store.job(job.job_id).lease_until > job.lease_until
    assert not store.heartbeat(job.job_id, token="someone else")
    assert store.requeue_stale(now=job.lease_until) == {"requeued": [], "failed": []}


def test_a_stale_job_is_superseded_by_a_newer_queued_one(store):
    old = store.enqueue("3", "train", {"changes": 1})
    job = store.claim("dies", 0.01)
    newer = store.enqueue("3", "train", {"changes": 2})
    assert store.requeue_stale(now=job.lease_until + 1) == {"requeued": [], "failed": [old]}
    assert "superseded by queued job" in store.job(old).error
    assert store.claim("w2", 30).job_id == newer


# ---- concurrency ----


def test_threads_share_the_store_without_losing_writes(store):
    errors = []

    def work(n: int) -> None:
        try:
            for i in range(20):
                store.enqueue(f"p{n}", f"k{i % 3}", {"i": i})
                store.record_prediction(
                    project_id=n,
                    task_id=i,
                    model_version="v1",
                    result=predicted(f"r{n}-{i}", box_mask(1, 5, 1, 5)),
                )
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert store.status()["queued"] == 8 * 3
    assert sum(len(store.predicted_regions(n, 7)) for n in range(8)) == 8

    claimed: list[str] = []
    lock = threading.Lock()

    def drain(worker: str) -> None:
        while (job := store.claim(worker, 30)) is not None:
            with lock:
                claimed.append(job.job_id)
            store.complete(job.job_id, {}, token=job.token)

    threads = [threading.Thread(target=drain, args=(f"w{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(claimed) == len(set(claimed)) == 24
    assert store.status()["done"] == 24


def test_two_processes_write_and_claim_on_the_same_file(tmp_path):
    path = str(tmp_path / "shared.db")
    TrainingStore(path).close()
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        stored = pool.starmap(write_annotations, [(path, 1000, 15), (path, 2000, 15)])
    assert stored == [15, 15]
    store = TrainingStore(path)
    assert store.count_accepted(3) == 30 and store.change_counter(3) == 30
    for n in range(12):
        store.enqueue(f"p{n}", "train", {})
    with context.Pool(2) as pool:
        ran = pool.starmap(claim_all, [(path, "proc-a"), (path, "proc-b")])
    all_ids = ran[0] + ran[1]
    assert len(all_ids) == len(set(all_ids)) == 12
    assert store.status()["done"] == 12
    store.close()
