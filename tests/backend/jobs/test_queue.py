"""Job queues (SQLite and Redis) and the background worker: leases, restarts, failures, concurrency.

Every test with ``make``/``queue`` runs on both back ends (see conftest.py); lane-specific behaviour is in
test_lanes.py.
"""

from __future__ import annotations

import threading
import time

import pytest

from backend.jobs import (
    LANES,
    PRELABEL_LANE,
    TRAINING_LANE,
    LeaseLostError,
    RedisJobQueue,
    SqliteJobQueue,
    Worker,
    lane_for,
    make_queue,
)


def test_make_queue_picks_the_backend(tmp_path):
    sqlite = make_queue(sqlite_path=tmp_path / "t.db")
    assert isinstance(sqlite, SqliteJobQueue) and sqlite.path == str(tmp_path / "t.db")
    remote = make_queue(sqlite_path=tmp_path / "t.db", redis_url="redis://127.0.0.1:1/0", redis_prefix="blue")
    assert isinstance(remote, RedisJobQueue) and remote.prefix == "blue"  # nothing connects until used
    sqlite.close()


def test_worker_runs_jobs_and_records_results(make, wait_for):
    queue = make()
    calls = []

    def handler(project_id, kind, payload):
        calls.append((project_id, kind, payload))
        return {"accuracy": 0.75}

    job_id = queue.enqueue("3.1748", "train", {"changes": 50})
    assert queue.enqueue("3", "train", {"changes": 60}) == job_id
    worker = Worker(queue=queue, handler=handler, lane=TRAINING_LANE, lease_s=5, poll_s=0.02)
    assert not worker.is_alive()
    worker.start()
    assert worker.is_alive()
    with pytest.raises(RuntimeError, match="already running"):
        worker.start()
    wait_for(lambda: queue.job(job_id).status == "done")
    assert worker.stop(timeout=5) and not worker.is_alive()
    assert calls == [("3", "train", {"changes": 60})] and worker.processed == 1 and worker.current is None
    job = queue.job(job_id)
    assert job.result == {"accuracy": 0.75} and job.attempts == 1 and job.error is None
    assert job.lane == TRAINING_LANE
    status = queue.status()
    assert (status["queued"], status["running"], status["done"], status["failed"]) == (0, 0, 1, 0)
    assert status["last_finished"]["job_id"] == job_id and status["last_error"] is None
    assert [j.job_id for j in queue.jobs("3")] == [job_id]


def test_handler_errors_fail_the_job_and_the_worker_goes_on(make, wait_for):
    queue = make()

    def handler(project_id, kind, payload):
        if project_id == "3":
            raise RuntimeError("CUDA out of memory")
        return "not a dict" if project_id == "4" else {"ok": True}

    bad, odd, good = (queue.enqueue(p, "train", {}) for p in ("3", "4", "5"))
    worker = Worker(queue=queue, handler=handler, lane=TRAINING_LANE, lease_s=5, poll_s=0.02)
    worker.start()
    wait_for(lambda: queue.job(good).status == "done")
    worker.stop()
    assert queue.job(bad).status == "failed" and queue.job(bad).error == "RuntimeError: CUDA out of memory"
    assert queue.job(odd).status == "failed" and "expected a dict" in queue.job(odd).error
    status = queue.status()
    assert status["failed"] == 2 and status["done"] == 1
    assert status["last_error"]["job_id"] in (bad, odd) and status["last_error"]["error"]


def test_one_running_job_per_project_and_lane(make, wait_for):
    queue = make()
    release = threading.Event()
    running: list[tuple[str, str]] = []

    def handler(project_id, kind, payload):
        running.append((project_id, kind))
        if (project_id, kind) == ("3", "train"):
            release.wait(10)
        return {}

    blocked = queue.enqueue("3", "train", {})
    waiting = queue.enqueue("3", "lora", {})  # the same lane as train: it waits
    other = queue.enqueue("4", "train", {})
    workers = [
        Worker(queue=queue, handler=handler, lane=TRAINING_LANE, lease_s=5, poll_s=0.02) for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    wait_for(lambda: queue.job(other).status == "done")
    time.sleep(0.2)  # both workers have polled again meanwhile
    assert queue.job(waiting).status == "queued" and queue.job(blocked).status == "running"
    release.set()
    wait_for(lambda: queue.job(waiting).status == "done")
    for worker in workers:
        worker.stop()
    assert running.index(("3", "lora")) > running.index(("3", "train"))


def test_a_job_whose_worker_died_is_requeued_on_restart_and_completes(make, wait_for):
    queue = make()
    job_id = queue.enqueue("3", "train", {"changes": 10})
    dead = queue.claim("worker-that-dies", 0.2, lane=TRAINING_LANE)  # claimed, then the process is killed
    assert dead.job_id == job_id and queue.status()["running"] == 1
    time.sleep(0.3)
    worker = Worker(
        queue=queue,
        handler=lambda p, k, payload: {"trained": payload["changes"]},
        lane=TRAINING_LANE,
        lease_s=5,
        poll_s=0.02,
    )
    worker.start()  # the restarted service requeues stale jobs first
    wait_for(lambda: queue.job(job_id).status == "done")
    worker.stop()
    job = queue.job(job_id)
    assert job.attempts == 2 and job.result == {"trained": 10}
    with pytest.raises(LeaseLostError):  # the dead worker's late outcome is refused
        queue.complete(job_id, {"half": "done"}, token=dead.token)
    assert queue.job(job_id).result == {"trained": 10}


def test_a_job_that_keeps_killing_its_worker_fails_after_max_attempts(make):
    queue = make(max_attempts=2)
    job_id = queue.enqueue("3", "train", {})
    for attempt in (1, 2):
        job = queue.claim(f"dies-{attempt}", 0.05, lane=TRAINING_LANE)
        assert job.attempts == attempt
        time.sleep(0.1)
        queue.requeue_stale()
    job = queue.job(job_id)
    assert job.status == "failed" and job.result is None and "attempt 2 of 2" in job.error
    assert queue.claim("w", 5, lane=TRAINING_LANE) is None
    assert queue.status()["last_error"]["job_id"] == job_id


def test_a_worker_that_lost_its_lease_marks_nothing_complete(make, caplog):
    queue = make()
    job_id = queue.enqueue("3", "train", {})

    def handler(project_id, kind, payload):
        queue.requeue_stale(now=time.time() + 3600)  # as if this worker stalled past its lease
        return {"half": "done"}

    worker = Worker(queue=queue, handler=handler, lane=TRAINING_LANE, lease_s=5, poll_s=0.02)
    assert worker.run_once().job_id == job_id
    job = queue.job(job_id)
    assert job.status == "queued" and job.result is None
    assert any("not held by this claim" in message for message in caplog.messages)
    worker.handler = lambda p, k, payload: {"full": "run"}
    worker.run_once()
    assert queue.job(job_id).status == "done" and queue.job(job_id).result == {"full": "run"}


def test_heartbeats_keep_a_long_job_alive(make):
    queue = make()
    job_id = queue.enqueue("3", "train", {})

    def handler(project_id, kind, payload):
        time.sleep(0.5)  # longer than the lease: only heartbeats keep it
        assert queue.requeue_stale() == {"requeued": [], "failed": []}
        return {"ok": True}

    worker = Worker(queue=queue, handler=handler, lane=TRAINING_LANE, lease_s=0.3, poll_s=0.02)
    worker.run_once()
    assert queue.job(job_id).status == "done"


def test_redis_jobs_survive_a_server_restart(restartable_redis, wait_for):
    server = restartable_redis
    queue = RedisJobQueue(connection=server.client())
    queued = queue.enqueue("3", "train", {"changes": 5})
    running = queue.enqueue("4", "train", {})
    deferred = queue.enqueue("4", "prelabel-0a1b", {"task_ids": [1, 2]})
    assert queue.claim("w-before-restart", 0.2, lane=TRAINING_LANE).job_id == queued
    assert server.client().llen("osprey:jobs:queue:training") == 1  # the default prefix, as documented
    server.stop()
    server.start()
    queue = RedisJobQueue(connection=server.client())  # a new process: scripts are loaded again
    assert queue.job(queued).status == "running" and queue.job(running).status == "queued"
    assert queue.job(deferred).payload == {"task_ids": [1, 2]} and queue.job(deferred).lane == PRELABEL_LANE
    time.sleep(0.25)

    def handler(project_id, kind, payload):
        if kind == "train" and project_id == "4":
            raise ValueError("no accepted regions yet")
        return {"ok": True}

    workers = [Worker(queue=queue, handler=handler, lane=lane, lease_s=5, poll_s=0.02) for lane in LANES]
    for worker in workers:
        worker.start()
    wait_for(lambda: queue.status()["done"] + queue.status()["failed"] == 3)
    for worker in workers:
        worker.stop()
    assert queue.job(queued).status == "done" and queue.job(queued).attempts == 2
    assert queue.job(running).error == "ValueError: no accepted regions yet"
    assert queue.job(deferred).status == "done"
    assert queue.status()["last_error"]["job_id"] == running


def test_concurrent_claims_hand_out_each_job_once(make):
    queue = make()
    kinds = ("train", "lora", "prelabel-a", "prelabel-b")
    ids = {queue.enqueue(f"p{n}", kind, {}) for n in range(6) for kind in kinds}
    claimed: list[str] = []
    running: set[tuple[str, str]] = set()  # (project, lane) with a job between claim and complete
    violations: list[tuple[str, str]] = []
    lock = threading.Lock()

    def drain(worker_id: str, lane: str) -> None:
        idle = 0
        while idle < 30:
            job = queue.claim(worker_id, 5, lane=lane)
            if job is None:
                idle += 1
                time.sleep(0.005)
                continue
            idle = 0
            with lock:
                if (job.project_id, job.lane) in running or job.lane != lane or lane_for(job.kind) != lane:
                    violations.append((job.project_id, job.lane))
                running.add((job.project_id, job.lane))
                claimed.append(job.job_id)
            with lock:  # complete under the lock: the next claim of this project sees it finished
                queue.complete(job.job_id, {"by": worker_id}, token=job.token)
                running.discard((job.project_id, job.lane))

    threads = [threading.Thread(target=drain, args=(f"w{n}", LANES[n % 2])) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert violations == []
    assert sorted(claimed) == sorted(ids)
    status = queue.status()
    assert status["done"] == 24 and status["lanes"][PRELABEL_LANE]["done"] == 12
