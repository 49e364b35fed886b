"""The Redis job queue alone, on a real redis-server: key prefixes, expiry of finished jobs, both client
decodings, and atomic claims under many threads. Shared semantics are in test_queue_semantics.py."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from backend.jobs import PRELABEL_LANE, TRAINING_LANE, RedisJobQueue, UnknownJobError


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def test_two_prefixes_on_one_redis_do_not_see_each_other(redis_server, prefix):
    blue = RedisJobQueue(connection=redis_server.client(), prefix=f"{prefix}-blue")
    green = RedisJobQueue(connection=redis_server.client(), prefix=f"{prefix}-green")
    job_id = blue.enqueue("3", "train", {"deployment": "blue"})
    assert green.claim("w", 30, lane=TRAINING_LANE) is None
    assert green.status()["queued"] == 0 and green.jobs("3") == []
    with pytest.raises(UnknownJobError):
        green.job(job_id)
    assert green.enqueue("3", "train", {}) == job_id  # the same id, yet another job: ids are per prefix
    assert blue.job(job_id).payload == {"deployment": "blue"}
    keys = {k.decode() for k in redis_server.client().keys(f"{prefix}-*")}
    assert keys and all(k.startswith((f"{prefix}-blue:jobs:", f"{prefix}-green:jobs:")) for k in keys)


def test_finished_jobs_expire_and_leave_the_project_list(redis_server, prefix):
    client = redis_server.client()
    queue = RedisJobQueue(connection=client, prefix=prefix, keep_s=120)
    old = queue.enqueue("3", "train", {})
    job = queue.claim("w", 30, lane=TRAINING_LANE)
    assert client.ttl(f"{prefix}:jobs:job:{old}") == -1  # queued and running jobs never expire
    queue.complete(old, {"ok": True}, token=job.token)
    assert 0 < client.ttl(f"{prefix}:jobs:job:{old}") <= 120
    newer = queue.enqueue("3", "lora", {})
    client.delete(f"{prefix}:jobs:job:{old}")  # what the expiry does after keep_s
    assert [j.job_id for j in queue.jobs("3")] == [newer]
    assert client.zrange(f"{prefix}:jobs:project:3", 0, -1) == [newer.encode()]
    status = queue.status()
    assert status["done"] == 1 and status["last_finished"] is None  # counted, no longer readable
    with pytest.raises(ValueError, match="keep_s"):
        RedisJobQueue(connection=client, keep_s=0)
    with pytest.raises(ValueError, match="prefix"):
        RedisJobQueue(connection=client, prefix="two words")


def test_a_client_that_decodes_responses_works_the_same(redis_server, prefix):
    import redis

    queue = RedisJobQueue.from_url(f"redis://127.0.0.1:{redis_server.port}/0?decode_responses=True",
                                   prefix=prefix)  # fmt: skip
    job_id = queue.enqueue("5", "prelabel-aa", {"task_ids": [1]})
    assert isinstance(queue.redis, redis.Redis) and queue.redis.get_encoder().decode_responses
    job = queue.claim("w", 30, lane=PRELABEL_LANE)
    assert job.job_id == job_id and job.payload == {"task_ids": [1]} and queue.heartbeat(job_id)
    queue.fail(job_id, "Label Studio answered 403", token=job.token)
    assert queue.requeue_stale() == {"requeued": [], "failed": []}
    assert queue.status()["last_error"]["error"] == "Label Studio answered 403"


def test_claims_from_many_connections_are_atomic(redis_server, prefix):
    # each thread its own client, as separate processes would have: the scripts are the only guard
    setup = RedisJobQueue(connection=redis_server.client(), prefix=prefix)
    ids = {setup.enqueue(str(n % 5), f"prelabel-{n:04x}", {}) for n in range(40)}
    claimed: list[str] = []
    overlaps: list[str] = []
    holding: set[str] = set()  # projects with a pre-label job between claim and complete
    lock = threading.Lock()

    def drain() -> None:
        queue = RedisJobQueue(connection=redis_server.client(), prefix=prefix)
        while setup.status()["queued"] or holding:
            job = queue.claim("w", 30, lane=PRELABEL_LANE)
            if job is None:
                time.sleep(0.002)
                continue
            with lock:
                if job.project_id in holding:
                    overlaps.append(job.project_id)
                holding.add(job.project_id)
                claimed.append(job.job_id)
            with lock:  # complete under the lock: the next claim of this project sees it finished
                queue.complete(job.job_id, {}, token=job.token)
                holding.discard(job.project_id)

    threads = [threading.Thread(target=drain) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps == [] and sorted(claimed) == sorted(ids)
    assert setup.status()["lanes"][PRELABEL_LANE] == {"queued": 0, "running": 0, "done": 40, "failed": 0}
