"""Job queues (SQLite and Redis + RQ) and the background worker: leases, restarts, failures.

The Redis tests start a real ``redis-server`` on 127.0.0.1 (a free port, a temporary directory, AOF on so
that jobs survive a restart) and stop it afterwards; they are skipped only where redis-server is not
installed (CI installs it).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
import uuid

import pytest

from backend.jobs import LeaseLostError, RedisJobQueue, SqliteJobQueue, make_queue
from backend.jobs.worker import Worker

requires_redis = pytest.mark.skipif(
    shutil.which("redis-server") is None,
    reason="redis-server is not installed (CI installs it with apt-get install -y redis-server)",
)


class RedisServer:
    """A throw-away redis-server with append-only persistence in ``folder``."""

    def __init__(self, folder) -> None:
        self.folder = folder
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        import redis

        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def client(self):
        import redis

        return redis.Redis(port=self.port)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=requires_redis)])
def make(request, tmp_path):
    """Builds a queue of the parametrised backend: ``make(max_attempts=3)``."""
    made = []

    def build(max_attempts: int = 3):
        if request.param == "sqlite":
            queue = SqliteJobQueue(tmp_path / f"q{len(made)}.db", max_attempts=max_attempts)
        else:
            server = request.getfixturevalue("redis_server")
            queue = RedisJobQueue(
                connection=server.client(), queue_name=f"t-{uuid.uuid4().hex[:8]}", max_attempts=max_attempts
            )
        made.append(queue)
        return queue

    yield build
    for queue in made:
        if isinstance(queue, SqliteJobQueue):
            queue.close()


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def test_make_queue_picks_the_backend(tmp_path):
    sqlite = make_queue(sqlite_path=tmp_path / "t.db")
    assert isinstance(sqlite, SqliteJobQueue) and sqlite.path == str(tmp_path / "t.db")
    assert isinstance(
        make_queue(sqlite_path=tmp_path / "t.db", redis_url="redis://127.0.0.1:1/0"), RedisJobQueue
    )
    sqlite.close()


def test_worker_runs_jobs_and_records_results(make):
    queue = make()
    calls = []

    def train(project_id, kind, payload):
        calls.append((project_id, kind, payload))
        return {"accuracy": 0.75}

    job_id = queue.enqueue("3.1748", "train", {"changes": 50})
    assert queue.enqueue("3", "train", {"changes": 60}) == job_id
    worker = Worker(queue=queue, train=train, lease_s=5, poll_s=0.02)
    worker.start()
    with pytest.raises(RuntimeError, match="already running"):
        worker.start()
    wait_for(lambda: queue.job(job_id).status == "done")
    assert worker.stop(timeout=5)
    assert calls == [("3", "train", {"changes": 60})]
    job = queue.job(job_id)
    assert job.result == {"accuracy": 0.75} and job.attempts == 1 and job.error is None
    status = queue.status()
    assert (status["queued"], status["running"], status["done"], status["failed"]) == (0, 0, 1, 0)
    assert status["last_finished"]["job_id"] == job_id and status["last_error"] is None
    assert [j.job_id for j in queue.jobs("3")] == [job_id]


def test_handler_errors_fail_the_job_and_the_worker_goes_on(make):
    queue = make()

    def train(project_id, kind, payload):
        if project_id == "3":
            raise RuntimeError("CUDA out of memory")
        return "not a dict" if project_id == "4" else {"ok": True}

    bad, odd, good = (queue.enqueue(p, "train", {}) for p in ("3", "4", "5"))
    worker = Worker(queue=queue, train=train, lease_s=5, poll_s=0.02)
    worker.start()
    wait_for(lambda: queue.job(good).status == "done")
    worker.stop()
    assert queue.job(bad).status == "failed" and queue.job(bad).error == "RuntimeError: CUDA out of memory"
    assert queue.job(odd).status == "failed" and "expected a dict" in queue.job(odd).error
    status = queue.status()
    assert status["failed"] == 2 and status["done"] == 1
    assert status["last_error"]["job_id"] in (bad, odd) and status["last_error"]["error"]


def test_one_running_job_per_project(make):
    queue = make()
    release = threading.Event()
    running: list[tuple[str, str]] = []

    def train(project_id, kind, payload):
        running.append((project_id, kind))
        if (project_id, kind) == ("3", "train"):
            release.wait(10)
        return {}

    blocked = queue.enqueue("3", "train", {})
    waiting = queue.enqueue("3", "lora", {})
    other = queue.enqueue("4", "train", {})
    workers = [Worker(queue=queue, train=train, lease_s=5, poll_s=0.02) for _ in range(2)]
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


def test_a_job_whose_worker_died_is_requeued_on_restart_and_completes(make):
    queue = make()
    job_id = queue.enqueue("3", "train", {"changes": 10})
    dead = queue.claim("worker-that-dies", 0.2)  # claimed, then the process is killed
    assert dead.job_id == job_id and queue.status()["running"] == 1
    time.sleep(0.3)
    worker = Worker(
        queue=queue, train=lambda p, k, payload: {"trained": payload["changes"]}, lease_s=5, poll_s=0.02
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
        job = queue.claim(f"dies-{attempt}", 0.05)
        assert job.attempts == attempt
        time.sleep(0.1)
        queue.requeue_stale()
    job = queue.job(job_id)
    assert job.status == "failed" and job.result is None and "attempt 2 of 2" in job.error
    assert queue.claim("w", 5) is None
    assert queue.status()["last_error"]["job_id"] == job_id


def test_a_worker_that_lost_its_lease_marks_nothing_complete(make, caplog):
    queue = make()
    job_id = queue.enqueue("3", "train", {})

    def train(project_id, kind, payload):
        queue.requeue_stale(now=time.time() + 3600)  # as if this worker stalled past its lease
        return {"half": "done"}

    worker = Worker(queue=queue, train=train, lease_s=5, poll_s=0.02)
    assert worker.run_once().job_id == job_id
    job = queue.job(job_id)
    assert job.status == "queued" and job.result is None
    assert any("not held by this claim" in message for message in caplog.messages)
    worker.train = lambda p, k, payload: {"full": "run"}
    worker.run_once()
    assert queue.job(job_id).status == "done" and queue.job(job_id).result == {"full": "run"}


def test_heartbeats_keep_a_long_job_alive(make):
    queue = make()
    job_id = queue.enqueue("3", "train", {})

    def train(project_id, kind, payload):
        time.sleep(0.5)  # longer than the lease: only heartbeats keep it
        assert queue.requeue_stale() == {"requeued": [], "failed": []}
        return {"ok": True}

    worker = Worker(queue=queue, train=train, lease_s=0.3, poll_s=0.02)
    worker.run_once()
    assert queue.job(job_id).status == "done"


@requires_redis
def test_redis_jobs_survive_a_server_restart(tmp_path):
    from rq import Queue
    from rq.registry import FailedJobRegistry

    server = RedisServer(tmp_path)
    server.start()
    try:
        queue = RedisJobQueue(connection=server.client(), queue_name="osprey-train")
        queued = queue.enqueue("3", "train", {"changes": 5})
        running = queue.enqueue("4", "train", {})
        assert queue.claim("w-before-restart", 0.2).job_id == queued
        assert Queue("osprey-train", connection=server.client()).count == 1  # RQ sees the queued one
        server.stop()
        server.start()
        queue = RedisJobQueue(connection=server.client(), queue_name="osprey-train")
        assert queue.job(queued).status == "running" and queue.job(running).status == "queued"
        time.sleep(0.25)

        def train(project_id, kind, payload):
            if project_id == "4":
                raise ValueError("no accepted regions yet")
            return {"ok": True}

        worker = Worker(queue=queue, train=train, lease_s=5, poll_s=0.02)
        worker.start()
        wait_for(lambda: queue.status()["done"] + queue.status()["failed"] == 2)
        worker.stop()
        assert queue.job(queued).status == "done" and queue.job(queued).attempts == 2
        assert queue.job(running).error == "ValueError: no accepted regions yet"
        assert running in FailedJobRegistry(queue=queue.queue).get_job_ids()
    finally:
        server.stop()


def test_concurrent_claims_hand_out_each_job_once(make):
    queue = make()
    ids = {queue.enqueue(f"p{n}", kind, {}) for n in range(6) for kind in ("train", "lora")}
    claimed: list[str] = []
    running: set[str] = set()  # projects with a job between claim and complete
    violations: list[str] = []
    lock = threading.Lock()

    def drain(worker_id: str) -> None:
        idle = 0
        while idle < 30:
            job = queue.claim(worker_id, 5)
            if job is None:
                idle += 1
                time.sleep(0.005)
                continue
            idle = 0
            with lock:
                if job.project_id in running:
                    violations.append(job.project_id)
                running.add(job.project_id)
                claimed.append(job.job_id)
            with lock:  # complete under the lock: the next claim of this project sees it finished
                queue.complete(job.job_id, {"by": worker_id}, token=job.token)
                running.discard(job.project_id)

    threads = [threading.Thread(target=drain, args=(f"w{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert violations == []
    assert sorted(claimed) == sorted(ids)
    assert queue.status()["done"] == 12
