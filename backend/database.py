"""The SQLite file the training store and the SQLite job queue share: its schema, its migrations, and
per-thread connections with one-transaction writes.

One file (stdlib ``sqlite3``) is shared by every thread and every process of the service (``serve``, a
training worker, ``osprey-label prelabel``) on one machine. WAL mode lets readers run beside one
writer; every write is one ``BEGIN IMMEDIATE`` transaction (writers queue on the file lock for up to
``busy_timeout_s``), so a call that returns has committed.
Each thread (and each process, after a fork) opens its own connection. The schema version lives in
``PRAGMA user_version`` and migrations run on open, inside a write transaction.

Tables (see ``_MIGRATIONS``): ``predicted_regions``, ``annotations``, ``regions``, ``field_outcomes``,
``tombstones``, ``project_counters`` and ``project_configs`` belong to
:class:`backend.learning.store.TrainingStore`; ``jobs`` to
:class:`backend.jobs.sqlite_queue.SqliteJobQueue`; ``webhook_inbox`` to
:class:`backend.learning.inbox.WebhookInbox`; ``prelabel_claims`` to
:class:`backend.prelabel.claims.PrelabelClaims`. All open the same file and run the same migrations, so
any can be opened first.

``jobs`` holds one row per job with its ``lane`` (``prelabel`` or ``training``, see
:mod:`backend.jobs.base`); two partial unique indexes keep at most one queued job per (project, kind)
and at most one running job per (project, lane).

Versions: 1 the tables above; 2 ``project_configs``; 3 the ``lane`` column of ``jobs``, with the
one-running index per (project, lane) instead of per project; 4 ``webhook_inbox``; 5 ``prelabel_claims``;
6 the ``auto_prelabel`` column of ``project_configs`` (a project's own choice, from Label Studio's
``extra_params``).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 6

_MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE predicted_regions (
            project_id TEXT NOT NULL, task_id INTEGER NOT NULL, region_id TEXT NOT NULL,
            model_version TEXT NOT NULL, source TEXT NOT NULL CHECK (source IN ('batch', 'interactive')),
            kind TEXT NOT NULL CHECK (kind IN ('region', 'task')), items_json TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (project_id, task_id, region_id, model_version))""",
        "CREATE INDEX predicted_regions_age ON predicted_regions (project_id, created_at)",
        """CREATE TABLE annotations (
            project_id TEXT NOT NULL, annotation_id INTEGER NOT NULL, task_id INTEGER,
            state TEXT NOT NULL CHECK (state IN ('accepted', 'cancelled', 'unparsed')),
            updated_ts REAL NOT NULL, content_hash TEXT NOT NULL, image_ref TEXT,
            task_fields_json TEXT NOT NULL DEFAULT '{}', completed_by INTEGER,
            ground_truth INTEGER NOT NULL DEFAULT 0, raw_json TEXT, received_at REAL NOT NULL,
            PRIMARY KEY (project_id, annotation_id))""",
        "CREATE INDEX annotations_task ON annotations (project_id, task_id)",
        """CREATE TABLE regions (
            project_id TEXT NOT NULL, annotation_id INTEGER NOT NULL, region_id TEXT NOT NULL,
            task_id INTEGER, image_ref TEXT, width INTEGER NOT NULL, height INTEGER NOT NULL,
            tool_type TEXT NOT NULL, labels_json TEXT NOT NULL, rle BLOB NOT NULL, area INTEGER NOT NULL,
            fields_json TEXT NOT NULL, model_version TEXT, predicted_region_id TEXT,
            match TEXT CHECK (match IN ('id', 'iou') OR match IS NULL), iou REAL,
            content_hash TEXT NOT NULL, updated_ts REAL NOT NULL, stored_at REAL NOT NULL,
            PRIMARY KEY (project_id, annotation_id, region_id))""",
        "CREATE INDEX regions_age ON regions (project_id, stored_at)",
        """CREATE TABLE field_outcomes (
            project_id TEXT NOT NULL, annotation_id INTEGER NOT NULL, region_id TEXT NOT NULL,
            field TEXT NOT NULL, outcome TEXT NOT NULL CHECK (outcome IN ('kept', 'edited', 'added', 'removed')),
            model_version TEXT,
            PRIMARY KEY (project_id, annotation_id, region_id, field))""",
        """CREATE TABLE tombstones (
            project_id TEXT NOT NULL, kind TEXT NOT NULL CHECK (kind IN ('annotation', 'task')),
            object_id INTEGER NOT NULL, deleted_at REAL NOT NULL,
            PRIMARY KEY (project_id, kind, object_id))""",
        "CREATE TABLE project_counters (project_id TEXT PRIMARY KEY, changes INTEGER NOT NULL DEFAULT 0)",
        """CREATE TABLE jobs (
            job_id INTEGER PRIMARY KEY AUTOINCREMENT, project_id TEXT NOT NULL, kind TEXT NOT NULL,
            payload_json TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed')),
            attempts INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL, worker_id TEXT,
            token TEXT, lease_s REAL, lease_until REAL, created_at REAL NOT NULL, started_at REAL,
            heartbeat_at REAL, finished_at REAL, result_json TEXT, error TEXT)""",
        "CREATE UNIQUE INDEX jobs_one_queued ON jobs (project_id, kind) WHERE status = 'queued'",
        "CREATE UNIQUE INDEX jobs_one_running ON jobs (project_id) WHERE status = 'running'",
        "CREATE INDEX jobs_status ON jobs (status, job_id)",
    ],
    2: [
        # the label config Label Studio last sent per project, so jobs and restarts never depend on memory
        """CREATE TABLE project_configs (
            project_id TEXT PRIMARY KEY, label_config TEXT NOT NULL, updated_at REAL NOT NULL)""",
    ],
    3: [
        # Job lanes: deferred pre-labels run beside a project's training job instead of behind it, so at
        # most one job runs per project *and lane*. GLOB, not LIKE: it is case-sensitive, as lane_for is.
        "ALTER TABLE jobs ADD COLUMN lane TEXT NOT NULL DEFAULT 'training'"
        " CHECK (lane IN ('prelabel', 'training'))",
        "UPDATE jobs SET lane = 'prelabel' WHERE kind = 'prelabel' OR kind GLOB 'prelabel-*'",
        "DROP INDEX jobs_one_running",
        "CREATE UNIQUE INDEX jobs_one_running ON jobs (project_id, lane) WHERE status = 'running'",
        "CREATE INDEX jobs_lane ON jobs (lane, status, job_id)",
    ],
    4: [
        # Webhooks are acknowledged once their body is here (one append), and parsed afterwards by the
        # intake thread: Label Studio never resends a webhook, so nothing may make it wait or refuse.
        """CREATE TABLE webhook_inbox (
            inbox_id INTEGER PRIMARY KEY AUTOINCREMENT, received_at REAL NOT NULL, action TEXT NOT NULL,
            project_id TEXT, source TEXT NOT NULL DEFAULT 'webhook' CHECK (source IN ('webhook', 'reconcile')),
            payload_json TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'new' CHECK (state IN ('new', 'done', 'failed')),
            outcome_json TEXT, error TEXT, done_at REAL)""",
        "CREATE INDEX webhook_inbox_state ON webhook_inbox (state, inbox_id)",
    ],
    5: [
        # One writer per (task, model version): whoever pre-labels a task holds its claim until the
        # prediction is written (or the lease runs out: a crashed writer's tasks are taken over).
        """CREATE TABLE prelabel_claims (
            project_id TEXT NOT NULL, task_id INTEGER NOT NULL, model_version TEXT NOT NULL,
            owner TEXT NOT NULL, claimed_at REAL NOT NULL, lease_until REAL NOT NULL,
            PRIMARY KEY (project_id, task_id, model_version))""",
        "CREATE INDEX prelabel_claims_lease ON prelabel_claims (lease_until)",
    ],
    6: [
        # A project's own choice of automatic pre-labelling (its ML backend connection's extra params):
        # 1 on, 0 off, NULL as OSPREY_AUTO_PRELABEL says.
        "ALTER TABLE project_configs ADD COLUMN auto_prelabel INTEGER CHECK (auto_prelabel IN (0, 1))",
    ],
}


class StoreVersionError(RuntimeError):
    """The database was written by a newer osprey-label (its schema version is unknown here)."""


class _Connection(sqlite3.Connection):
    """A connection that can be weakly referenced: a thread's connection closes when the thread ends."""


def dumps(value) -> str:
    """``value`` as compact JSON with sorted keys (equal values, equal text)."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


class SqliteDatabase:
    """Per-thread connections to one SQLite file with the schema above; the base of the training store
    and of the SQLite job queue. ``busy_timeout_s`` is how long a writer waits for another's transaction;
    ``synchronous`` is SQLite's durability level (FULL by default: a commit survives a power cut)."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0, synchronous: str = "FULL") -> None:
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous must be FULL, NORMAL or EXTRA, got {synchronous!r}")
        self.path = str(path)
        self.busy_timeout_s = float(busy_timeout_s)
        self._synchronous = synchronous.upper()
        self._local = threading.local()
        self._connections: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._lock = threading.Lock()
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._migrate()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout_s,
            isolation_level=None,
            check_same_thread=False,
            factory=_Connection,
        )
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        self._local.conn, self._local.pid = conn, os.getpid()
        conn.pid = os.getpid()
        with self._lock:
            self._connections.add(conn)
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE takes the write lock first, so it never deadlocks."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        """Close this process's connections (threads reopen on their next call)."""
        with self._lock:
            mine = [c for c in self._connections if c.pid == os.getpid()]
            for conn in mine:
                self._connections.discard(conn)
        for conn in mine:
            conn.close()
        self._local = threading.local()

    def _migrate(self) -> None:
        with self._write() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreVersionError(
                    f"{self.path} has schema version {version}, newer than this osprey-label knows "
                    f"({SCHEMA_VERSION}); upgrade osprey-label or point the store at another file"
                )
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[target]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {target}")
                logger.info("training store %s migrated to schema version %d", self.path, target)

    def schema_version(self) -> int:
        """The file's schema version (``PRAGMA user_version``); :data:`SCHEMA_VERSION` once opened."""
        return self._conn().execute("PRAGMA user_version").fetchone()[0]
