"""Job lanes on both back ends: a project's deferred pre-labels run while its training job runs, each
worker claims its own lane only, and counts and stale requeues stay per lane."""

from __future__ import annotations

import time

import pytest

from backend.jobs import LANES, PRELABEL_LANE, TRAINING_LANE, Worker, lane_for


def test_lane_for_files_prelabel_kinds_apart_from_training():
    assert LANES == ("prelabel", "training")
    assert lane_for("prelabel") == lane_for("prelabel-3f2a9c") == PRELABEL_LANE
    assert lane_for("train") == lane_for("lora") == lane_for("prelabeling") == TRAINING_LANE


def test_a_prelabel_job_runs_while_the_same_projects_training_job_runs(queue, wait_for):
    # Two workers with real threads, as the service runs them: the LoRA handler holds project 7's
    # training lane until project 7's deferred pre-labels are done, which one lane could never do.
    lora = queue.enqueue("7", "lora", {"epochs": 1})
    prelabel = queue.enqueue("7.1731000000", "prelabel-0a1b2c", {"task_ids": [11, 12]})
    seen: dict[str, object] = {}

    def train(project_id, kind, payload):
        seen["prelabel done while lora ran"] = _within(10, lambda: queue.job(prelabel).status == "done")
        return {"status": "promoted"}

    def label(project_id, kind, payload):
        seen["lora status while prelabel ran"] = queue.job(lora).status
        return {"written": len(payload["task_ids"])}

    training = Worker(queue=queue, handler=train, lane=TRAINING_LANE, lease_s=5, poll_s=0.02)
    prelabels = Worker(queue=queue, handler=label, lane=PRELABEL_LANE, lease_s=5, poll_s=0.02)
    training.start()
    wait_for(lambda: queue.job(lora).status == "running")
    prelabels.start()
    try:
        wait_for(lambda: queue.job(lora).status == "done", timeout=20)
    finally:
        assert training.stop(timeout=15) and prelabels.stop(timeout=5)
    assert seen == {"prelabel done while lora ran": True, "lora status while prelabel ran": "running"}
    assert queue.job(prelabel).result == {"written": 2} and queue.job(prelabel).lane == PRELABEL_LANE
    assert queue.job(lora).result == {"status": "promoted"} and queue.job(lora).lane == TRAINING_LANE
    assert (training.processed, prelabels.processed) == (1, 1)


def test_a_worker_never_claims_the_other_lanes_jobs(queue):
    deferred = [queue.enqueue("7", f"prelabel-{n}", {"n": n}) for n in range(3)]
    ran: list[str] = []
    training = Worker(queue=queue, handler=lambda *job: ran.append(job[1]) or {}, lane=TRAINING_LANE,
                      lease_s=5, poll_s=0.02)  # fmt: skip
    assert training.run_once() is None
    training.start()
    time.sleep(0.2)  # several polls
    training.stop()
    assert ran == [] and [queue.job(i).status for i in deferred] == ["queued"] * 3
    assert queue.claim("w", 5, lane=TRAINING_LANE) is None

    train = queue.enqueue("7", "train", {})
    prelabels = Worker(queue=queue, handler=lambda *job: ran.append(job[1]) or {}, lane=PRELABEL_LANE,
                       lease_s=5, poll_s=0.02)  # fmt: skip
    while prelabels.run_once() is not None:
        pass
    assert ran == ["prelabel-0", "prelabel-1", "prelabel-2"]  # oldest first, and one at a time per project
    assert queue.job(train).status == "queued" and queue.claim("w", 5, lane=TRAINING_LANE).job_id == train


def test_lanes_are_checked_and_an_explicit_lane_is_kept(queue):
    with pytest.raises(ValueError, match="lane must be one of"):
        queue.claim("w", 5, lane="gpu")
    with pytest.raises(ValueError, match="lane must be one of"):
        queue.enqueue("3", "train", {}, lane="fast")
    with pytest.raises(ValueError, match="lane must be one of"):
        Worker(queue=queue, handler=lambda *job: {}, lane="both")
    warmup = queue.enqueue("3", "warmup", {"n": 1}, lane=PRELABEL_LANE)
    assert queue.job(warmup).lane == PRELABEL_LANE
    assert queue.enqueue("3", "warmup", {"n": 2}) == warmup  # no lane named: it joins the queued job
    with pytest.raises(ValueError, match="queued in lane 'prelabel'"):
        queue.enqueue("3", "warmup", {"n": 3}, lane=TRAINING_LANE)
    assert queue.job(warmup).payload == {"n": 2}
    assert queue.claim("w", 5, lane=TRAINING_LANE) is None
    assert queue.claim("w", 5, lane=PRELABEL_LANE).job_id == warmup


def test_status_counts_jobs_per_lane(queue):
    train = queue.enqueue("3", "train", {})
    queue.enqueue("4", "lora", {})
    queue.enqueue("3", "prelabel-a", {})
    queue.enqueue("3", "prelabel-b", {})
    status = queue.status()
    assert status["lanes"] == {
        PRELABEL_LANE: {"queued": 2, "running": 0, "done": 0, "failed": 0},
        TRAINING_LANE: {"queued": 2, "running": 0, "done": 0, "failed": 0},
    }
    labelling = queue.claim("w1", 30, lane=PRELABEL_LANE)
    training = queue.claim("w2", 30, lane=TRAINING_LANE)
    assert training.job_id == train and labelling.project_id == training.project_id == "3"
    assert queue.status()["lanes"][PRELABEL_LANE] == {"queued": 1, "running": 1, "done": 0, "failed": 0}
    queue.complete(training.job_id, {"ok": True}, token=training.token)
    queue.fail(labelling.job_id, "Label Studio answered 401", token=labelling.token)
    status = queue.status()
    assert status["lanes"] == {
        PRELABEL_LANE: {"queued": 1, "running": 0, "done": 0, "failed": 1},
        TRAINING_LANE: {"queued": 1, "running": 0, "done": 1, "failed": 0},
    }
    assert (status["queued"], status["running"], status["done"], status["failed"]) == (2, 0, 1, 1)
    assert status["last_error"]["lane"] == PRELABEL_LANE and status["last_finished"]["lane"] == PRELABEL_LANE


def test_stale_jobs_are_requeued_into_their_own_lane(queue):
    train = queue.enqueue("3", "train", {})
    first = queue.enqueue("3", "prelabel-a", {})
    second = queue.enqueue("3", "prelabel-b", {})
    dead = queue.claim("dies", 0.01, lane=TRAINING_LANE)
    alive = queue.claim("lives", 3600, lane=PRELABEL_LANE)
    assert (dead.job_id, alive.job_id) == (train, first)
    # only the training lane's lease ran out: the pre-label job keeps running, its lane stays busy
    assert queue.requeue_stale(now=dead.lease_until + 1) == {"requeued": [train], "failed": []}
    assert queue.job(first).status == "running" and queue.claim("w", 5, lane=PRELABEL_LANE) is None
    again = queue.claim("w2", 0.01, lane=TRAINING_LANE)
    assert again.job_id == train and again.attempts == 2
    # both leases out: each job goes back to its own lane, the pre-label one to the front of it
    assert queue.requeue_stale(now=alive.lease_until + 1) == {"requeued": [train, first], "failed": []}
    assert queue.status()["lanes"][PRELABEL_LANE] == {"queued": 2, "running": 0, "done": 0, "failed": 0}
    assert queue.claim("w3", 5, lane=TRAINING_LANE).job_id == train
    assert queue.claim("w4", 5, lane=PRELABEL_LANE).job_id == first
    assert queue.job(second).status == "queued"


def _within(timeout: float, condition) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
