"""The SQLite training store: schema versions, predictions, concurrent writers (with the job queue
in the same file)."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading

import pytest
from webhook_payloads import box_mask, claim_all, predicted, write_annotations

from backend.database import StoreVersionError
from backend.jobs import TRAINING_LANE, SqliteJobQueue
from backend.labelstudio.ids import project_key
from backend.learning.store import TrainingStore, compare_versions


@pytest.fixture
def store(tmp_path):
    store = TrainingStore(tmp_path / "train.db")
    yield store
    store.close()


@pytest.fixture
def queue(store):
    """The SQLite job queue in the store's own file."""
    queue = SqliteJobQueue(store.path)
    yield queue
    queue.close()


# ---- schema ----


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


# ---- concurrency ----


def test_threads_share_the_store_without_losing_writes(store, queue):
    errors = []

    def work(n: int) -> None:
        try:
            for i in range(20):
                queue.enqueue(f"p{n}", f"k{i % 3}", {"i": i})
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
    assert queue.status()["queued"] == 8 * 3
    assert sum(len(store.predicted_regions(n, 7)) for n in range(8)) == 8

    claimed: list[str] = []
    lock = threading.Lock()

    def drain(worker: str) -> None:
        while (job := queue.claim(worker, 30, lane=TRAINING_LANE)) is not None:
            with lock:
                claimed.append(job.job_id)
            queue.complete(job.job_id, {}, token=job.token)

    threads = [threading.Thread(target=drain, args=(f"w{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(claimed) == len(set(claimed)) == 24
    assert queue.status()["done"] == 24


def test_two_processes_write_and_claim_on_the_same_file(tmp_path):
    path = str(tmp_path / "shared.db")
    TrainingStore(path).close()
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        stored = pool.starmap(write_annotations, [(path, 1000, 15), (path, 2000, 15)])
    assert stored == [15, 15]
    store = TrainingStore(path)
    assert store.count_accepted(3) == 30 and store.change_counter(3) == 30
    queue = SqliteJobQueue(path)
    for n in range(12):
        queue.enqueue(f"p{n}", "train", {})
    with context.Pool(2) as pool:
        ran = pool.starmap(claim_all, [(path, "proc-a"), (path, "proc-b")])
    all_ids = ran[0] + ran[1]
    assert len(all_ids) == len(set(all_ids)) == 12
    assert queue.status()["done"] == 12
    store.close()
    queue.close()
