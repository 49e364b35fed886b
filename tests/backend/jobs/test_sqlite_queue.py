"""The SQLite job queue alone: the file it shares with the training store, its schema migrations (v2, one
running job per project, to v3, one per project and lane) and its integer ids. The semantics both back
ends share are tested in test_queue_semantics.py."""

from __future__ import annotations

import sqlite3
import time

import pytest

from backend.database import _MIGRATIONS, SCHEMA_VERSION
from backend.jobs import PRELABEL_LANE, TRAINING_LANE, SqliteJobQueue, UnknownJobError


def test_schema_is_created_in_wal_mode_and_reopening_keeps_data(tmp_path):
    path = tmp_path / "nested" / "train.db"
    first = SqliteJobQueue(path)
    assert first.schema_version() == SCHEMA_VERSION == 6
    job_id = first.enqueue("3", "train", {"n": 1})
    first.close()
    again = SqliteJobQueue(path)
    assert again.job(job_id).payload == {"n": 1} and again.job(job_id).lane == TRAINING_LANE
    assert again._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again.close()


def write_version_2_file(path) -> tuple[int, int, str]:
    """A store file as osprey-label wrote it at schema version 2: a queued train job and a running
    pre-label job of project 7. Returns (train id, prelabel id, the prelabel claim's token)."""
    conn = sqlite3.connect(path, isolation_level=None)
    for target in (1, 2):
        for statement in _MIGRATIONS[target]:
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 2")
    now = time.time()
    insert = (
        "INSERT INTO jobs (project_id, kind, payload_json, status, attempts, max_attempts, worker_id, token,"
        " lease_s, lease_until, created_at, started_at) VALUES (?, ?, ?, ?, ?, 3, ?, ?, ?, ?, ?, ?)"
    )
    prelabel = conn.execute(
        insert, ("7", "prelabel-0a1b2c", '{"task_ids":[1]}', "running", 1, "w-old", "t0k", 600.0,
                 now + 600, now - 5, now - 1),
    ).lastrowid  # fmt: skip
    train = conn.execute(
        insert, ("7", "train", '{"changes":3}', "queued", 0, None, None, None, None, now, None)
    ).lastrowid
    # v2 allowed one running job per project: the queued train job could not start here
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("UPDATE jobs SET status = 'running' WHERE job_id = ?", (train,))
    conn.close()
    return train, prelabel, "t0k"


def test_a_version_2_file_is_migrated_to_lanes(tmp_path):
    path = tmp_path / "training.sqlite3"
    train, prelabel, token = write_version_2_file(path)
    queue = SqliteJobQueue(path)
    assert queue.schema_version() == SCHEMA_VERSION
    assert queue.job(str(prelabel)).lane == PRELABEL_LANE and queue.job(str(prelabel)).status == "running"
    assert queue.job(str(train)).lane == TRAINING_LANE and queue.job(str(train)).payload == {"changes": 3}
    assert queue.claim("w", 30, lane=PRELABEL_LANE) is None
    claimed = queue.claim("w", 30, lane=TRAINING_LANE)  # the second lane runs beside the first
    assert claimed.job_id == str(train) and claimed.attempts == 1
    assert queue.status()["lanes"][PRELABEL_LANE]["running"] == 1
    assert queue.status()["lanes"][TRAINING_LANE]["running"] == 1
    queue.complete(str(prelabel), {"written": 1}, token=token)  # the pre-migration claim still holds
    queue.complete(claimed.job_id, {}, token=claimed.token)
    assert queue.status()["done"] == 2
    index = queue._conn().execute("SELECT sql FROM sqlite_master WHERE name = 'jobs_one_running'").fetchone()
    assert "(project_id, lane)" in index[0]
    queue.close()


def test_lane_column_matches_prelabel_kinds_exactly(tmp_path):
    path = tmp_path / "t.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for target in (1, 2):
        for statement in _MIGRATIONS[target]:
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 2")
    for kind in ("prelabel", "prelabel-ff", "Prelabel-ff", "prelabeling", "lora"):
        conn.execute(
            "INSERT INTO jobs (project_id, kind, payload_json, status, max_attempts, created_at)"
            " VALUES ('1', ?, '{}', 'done', 3, 0)",
            (kind,),
        )
    conn.close()
    queue = SqliteJobQueue(path)
    lanes = {job.kind: job.lane for job in queue.jobs("1")}
    assert lanes == {"prelabel": "prelabel", "prelabel-ff": "prelabel", "Prelabel-ff": "training",
                     "prelabeling": "training", "lora": "training"}  # fmt: skip
    queue.close()


def test_a_newer_file_is_refused(tmp_path):
    path = tmp_path / "t.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(RuntimeError, match="newer than this osprey-label knows"):
        SqliteJobQueue(path)


def test_ids_are_integers_in_text(tmp_path):
    queue = SqliteJobQueue(tmp_path / "t.db")
    job_id = queue.enqueue("3", "train", {})
    assert job_id == "1"
    with pytest.raises(UnknownJobError, match="SQLite job ids are integers"):
        queue.job("osprey-3f2a")
    assert queue.heartbeat("osprey-3f2a") is False
    queue.close()
