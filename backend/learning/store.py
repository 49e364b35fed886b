"""The training store: what the backend predicted, what annotators accepted, and the training job queue.

One SQLite file (stdlib ``sqlite3``) shared by every thread and every process (gunicorn workers) of the
service. WAL mode lets readers run beside one writer; every write is one ``BEGIN IMMEDIATE`` transaction
(writers queue on the file lock for up to ``busy_timeout_s``), so a webhook that returns has committed.
Each thread (and each process, after a fork) opens its own connection. The schema version lives in
``PRAGMA user_version`` and migrations run on open, inside a write transaction.

Tables (see ``_MIGRATIONS``):

- ``predicted_regions``: each region the backend returned, with its result items (the region item first,
  then the per-region Choices/TextArea items carrying its ``id``), per project, task and model version;
  whole-task items are kept as one row of kind ``task``.
- ``annotations``: one row per accepted (or cancelled, or not yet parsed) annotation, with Label
  Studio's ``updated_at`` and a content hash (idempotency and ordering).
- ``regions``: the regions of accepted annotations: image reference, size, mask as brush RLE bytes,
  field values, tool labels, and the prediction they came from (model version, match, mask IoU).
- ``field_outcomes``: per annotation, region and field whether the pre-label was kept, edited, added
  or removed.
- ``tombstones``: deleted annotations and tasks; later events for them are refused.
- ``project_counters``: per project, how many region labels were stored or changed (``new_since``).
- ``jobs``: the durable job queue (at most one queued job per project and kind, one running per project).

Timestamps are POSIX seconds (float). Project ids are strings: Label Studio's ``"12.1699999999"`` from
``/setup`` and ``/predict`` is reduced to ``"12"`` everywhere (``project_key``).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
OUTCOMES = ("kept", "edited", "added", "removed")
JOB_STATES = ("queued", "running", "done", "failed")
_REGION_TYPES = ("brushlabels", "polygonlabels", "rectanglelabels", "brush", "polygon", "rectangle")

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
}


class StoreVersionError(RuntimeError):
    """The database was written by a newer osprey-label (its schema version is unknown here)."""


class LeaseLostError(RuntimeError):
    """A job was finished by a worker that no longer holds it (its lease expired and it was requeued)."""


class UnknownJobError(ValueError):
    """No job has this id."""


def project_key(project) -> str:
    """Label Studio project reference (``12``, ``"12"``, ``"12.1699999999"``) as the store's key ``"12"``."""
    if isinstance(project, bool) or project is None:
        raise ValueError(f"expected a Label Studio project id (int or str), got {project!r}")
    text = str(project).strip().split(".", 1)[0]
    if not text:
        raise ValueError(f"expected a non-empty Label Studio project id, got {project!r}")
    return text


@dataclass(frozen=True)
class PredictedRegion:
    """A region (``kind="region"``) or the whole-task fields (``kind="task"``) of a recorded prediction.

    ``items`` are the Label Studio result items that carry ``region_id``; a region's own item is first.
    """

    region_id: str
    model_version: str
    source: str
    kind: str
    items: list[dict]
    created_at: float


def prediction_regions(
    result: list[dict], *, model_version: str, created_at: float = 0.0, source: str = "batch"
) -> list[PredictedRegion]:
    """A prediction's result items grouped as ``TrainingStore.record_prediction`` records them: one
    ``PredictedRegion`` per ``id``, a region item (brush/polygon/rectangle) first with its per-region
    items, and groups without a region item as whole-task rows (``kind="task"``)."""
    groups: dict[str, list[dict]] = {}
    for item in result:
        if isinstance(item, dict) and item.get("id") is not None:
            groups.setdefault(str(item["id"]), []).append(item)
    out = []
    for region_id, items in groups.items():
        items.sort(key=lambda i: str(i.get("type", "")).lower() not in _REGION_TYPES)
        kind = "region" if str(items[0].get("type", "")).lower() in _REGION_TYPES else "task"
        out.append(PredictedRegion(region_id, str(model_version), source, kind, items, created_at))
    return out


@dataclass(frozen=True)
class RegionRecord:
    """One accepted region as intake hands it to ``write_annotation``.

    ``rle`` is Label Studio brush RLE (list of ints 0..255) of a ``height x width`` mask; ``fields`` maps
    field names (``category``, ``part``: str; ``attributes``: list[str]; ``caption``, ``description``: str)
    to values; ``labels`` are the region tool's own labels; ``match`` is ``"id"``, ``"iou"`` or None.
    """

    region_id: str
    tool_type: str
    labels: list[str]
    rle: list[int]
    width: int
    height: int
    area: int
    fields: dict
    content_hash: str
    model_version: str | None = None
    predicted_region_id: str | None = None
    match: str | None = None
    iou: float | None = None


@dataclass(frozen=True)
class FieldOutcome:
    """Whether a pre-label survived: ``region_id`` is ``""`` for whole-task fields and the predicted
    region's id for removed regions; ``field`` is a field name or ``"region"`` (the mask itself)."""

    region_id: str
    field: str
    outcome: str
    model_version: str | None = None


@dataclass
class AnnotationRecord:
    """An annotation ready to store. ``state`` is ``accepted``, ``cancelled`` or ``unparsed`` (kept raw in
    ``raw`` until its project's label config is known). ``updated_ts`` orders versions of one annotation."""

    project_id: str
    annotation_id: int
    task_id: int | None
    state: str
    updated_ts: float
    content_hash: str
    image_ref: str | None = None
    task_fields: dict = field(default_factory=dict)
    completed_by: int | None = None
    ground_truth: bool = False
    regions: list[RegionRecord] = field(default_factory=list)
    outcomes: list[FieldOutcome] = field(default_factory=list)
    raw: dict | None = None


@dataclass(frozen=True)
class WriteOutcome:
    """What ``write_annotation`` did. ``status``: ``stored``, ``duplicate`` (same version seen),
    ``stale`` (a newer version is stored) or ``tombstoned`` (the annotation or its task was deleted).
    ``changes_before``/``changes_after`` are the project's change counter around this write."""

    status: str
    regions: int
    new_labels: int
    changes_before: int
    changes_after: int


@dataclass(frozen=True)
class AcceptedRegion:
    """An accepted region for training. ``rle`` is brush RLE of a ``height x width`` mask (``mask()``
    decodes it to ``(H, W)`` bool); ``fields`` maps field names to values, ``task_fields`` the whole-task
    ones; ``updated_at`` is Label Studio's ``updated_at`` in POSIX seconds."""

    project_id: str
    annotation_id: int
    region_id: str
    task_id: int | None
    image_ref: str | None
    width: int
    height: int
    rle: list[int]
    fields: dict
    task_fields: dict
    labels: list[str]
    tool_type: str
    model_version: str | None
    iou: float | None
    ground_truth: bool
    updated_at: float

    def mask(self) -> np.ndarray:
        from backend.labelstudio.results import decode_brush_rle

        return decode_brush_rle(self.rle, self.width, self.height)


@dataclass(frozen=True)
class Job:
    """A queued, running or finished job. ``token`` identifies one claim: finishing a job with a stale
    token raises LeaseLostError. ``lease_until`` is the POSIX time after which a running job is stale."""

    job_id: str
    project_id: str
    kind: str
    payload: dict
    status: str
    attempts: int
    max_attempts: int
    created_at: float
    worker_id: str | None = None
    token: str | None = None
    lease_until: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    result: dict | None = None
    error: str | None = None


def compare_versions(ts: float, content_hash: str, other_ts: float, other_hash: str) -> int:
    """1 when version (ts, hash) supersedes the other, 0 when they are the same, -1 when it is older.

    Equal timestamps with different content are ordered by hash, so deliveries in any order converge.
    """
    mine, other = (float(ts), content_hash), (float(other_ts), other_hash)
    return (mine > other) - (mine < other)


class _Connection(sqlite3.Connection):
    """A connection that can be weakly referenced: a thread's connection closes when the thread ends."""


def _dumps(value) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


class TrainingStore:
    """Predictions, accepted regions and the job queue in one SQLite file (see the module docstring).

    ``busy_timeout_s`` is how long a writer waits for another's transaction; ``max_predicted_regions`` bounds
    the predicted regions kept per project (oldest dropped); ``max_attempts`` is how often a job whose worker
    died is retried; ``keep_finished_jobs`` bounds the finished jobs kept per project.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout_s: float = 30.0,
        max_predicted_regions: int = 50_000,
        max_attempts: int = 3,
        keep_finished_jobs: int = 200,
        synchronous: str = "FULL",
    ) -> None:
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous must be FULL, NORMAL or EXTRA, got {synchronous!r}")
        if max_attempts < 1 or max_predicted_regions < 1:
            raise ValueError("max_attempts and max_predicted_regions must be >= 1")
        self.path = str(path)
        self.busy_timeout_s = float(busy_timeout_s)
        self.max_predicted_regions = int(max_predicted_regions)
        self.max_attempts = int(max_attempts)
        self.keep_finished_jobs = int(keep_finished_jobs)
        self._synchronous = synchronous.upper()
        self._local = threading.local()
        self._connections: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._predictions_recorded = 0
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._migrate()

    # ---- connections and transactions ----
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
        return self._conn().execute("PRAGMA user_version").fetchone()[0]

    # ---- predictions ----
    def record_prediction(
        self,
        *,
        project_id: str,
        task_id: int | None,
        model_version: str,
        result: list[dict],
        interactive: bool = False,
    ) -> int:
        """Remember the result items ``/predict`` returned for a task; returns how many rows were kept.

        A batch prediction replaces the previous batch one of the same task and model version; an
        interactive one (``params.context`` was set) adds its region. Predictions without a project or task
        id are not recorded (nothing could be matched to them). Items are grouped by ``id`` as
        ``prediction_regions`` groups them: a region item (brush/polygon/rectangle) with its per-region
        items, and the rest as whole-task rows.
        """
        if task_id is None or project_id is None or not isinstance(result, list):
            return 0
        project, now = project_key(project_id), time.time()
        source = "interactive" if interactive else "batch"
        regions = prediction_regions(result, model_version=model_version, created_at=now, source=source)
        rows = [
            (project, int(task_id), r.region_id, r.model_version, source, r.kind, _dumps(r.items), now)
            for r in regions
        ]
        with self._write() as conn:
            if not interactive:
                conn.execute(
                    "DELETE FROM predicted_regions WHERE project_id = ? AND task_id = ? AND model_version = ?"
                    " AND source = 'batch'",
                    (project, int(task_id), str(model_version)),
                )
            conn.executemany("INSERT OR REPLACE INTO predicted_regions VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self._predictions_recorded += 1
            if self._predictions_recorded % 128 == 1:
                conn.execute(
                    "DELETE FROM predicted_regions WHERE rowid IN (SELECT rowid FROM predicted_regions"
                    " WHERE project_id = ? ORDER BY created_at DESC LIMIT -1 OFFSET ?)",
                    (project, self.max_predicted_regions),
                )
        return len(rows)

    def predicted_regions(self, project_id: str, task_id: int) -> list[PredictedRegion]:
        """Every recorded predicted region and whole-task row of a task, newest first."""
        rows = (
            self._conn()
            .execute(
                "SELECT * FROM predicted_regions WHERE project_id = ? AND task_id = ?"
                " ORDER BY created_at DESC, rowid DESC",
                (project_key(project_id), int(task_id)),
            )
            .fetchall()
        )
        return [
            PredictedRegion(
                region_id=r["region_id"],
                model_version=r["model_version"],
                source=r["source"],
                kind=r["kind"],
                items=json.loads(r["items_json"]),
                created_at=r["created_at"],
            )
            for r in rows
        ]

    # ---- annotations ----
    def annotation_state(self, project_id: str, annotation_id: int, task_id: int | None = None):
        """``("deleted", None, None)`` for a tombstoned annotation or task, ``(state, updated_ts,
        content_hash)`` for a stored one, None when unseen."""
        conn, project = self._conn(), project_key(project_id)
        if self._tombstoned(conn, project, int(annotation_id), task_id):
            return ("deleted", None, None)
        row = conn.execute(
            "SELECT state, updated_ts, content_hash FROM annotations WHERE project_id = ? AND annotation_id = ?",
            (project, int(annotation_id)),
        ).fetchone()
        return tuple(row) if row else None

    @staticmethod
    def _tombstoned(conn, project: str, annotation_id: int, task_id: int | None) -> bool:
        row = conn.execute(
            "SELECT 1 FROM tombstones WHERE project_id IN (?, '') AND ((kind = 'annotation' AND object_id = ?)"
            " OR (kind = 'task' AND object_id = ?))",
            (project, annotation_id, -1 if task_id is None else int(task_id)),
        ).fetchone()
        return row is not None

    def write_annotation(self, record: AnnotationRecord) -> WriteOutcome:
        """Store one annotation version atomically, replacing all regions of an older version.

        Ordering: a version whose ``updated_ts`` is older than the stored one is ``stale``; an equal
        timestamp with the same content hash is a ``duplicate``; with another hash the larger hash wins
        (so deliveries in any order converge). A tombstoned annotation or task is never written again.
        """
        if record.state not in ("accepted", "cancelled", "unparsed"):
            raise ValueError(f"state must be accepted, cancelled or unparsed, got {record.state!r}")
        project, now = project_key(record.project_id), time.time()
        with self._write() as conn:
            before = self._changes(conn, project)
            if self._tombstoned(conn, project, record.annotation_id, record.task_id):
                return WriteOutcome("tombstoned", 0, 0, before, before)
            row = conn.execute(
                "SELECT state, updated_ts, content_hash FROM annotations WHERE project_id = ? AND annotation_id = ?",
                (project, record.annotation_id),
            ).fetchone()
            if row is not None:
                order = compare_versions(
                    record.updated_ts, record.content_hash, row["updated_ts"], row["content_hash"]
                )
                parsed_now = row["state"] == "unparsed" and record.state != "unparsed" and order == 0
                if order < 0 or (order == 0 and not parsed_now):
                    return WriteOutcome("duplicate" if order == 0 else "stale", 0, 0, before, before)
            old = dict(
                conn.execute(
                    "SELECT region_id, content_hash FROM regions WHERE project_id = ? AND annotation_id = ?",
                    (project, record.annotation_id),
                ).fetchall()
            )
            self._delete_annotation_rows(conn, project, record.annotation_id)
            conn.execute(
                "INSERT INTO annotations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (project, record.annotation_id, record.task_id, record.state, record.updated_ts,
                 record.content_hash, record.image_ref, _dumps(record.task_fields), record.completed_by,
                 int(bool(record.ground_truth)), _dumps(record.raw) if record.raw is not None else None, now),
            )  # fmt: skip
            regions = record.regions if record.state == "accepted" else []
            conn.executemany(
                "INSERT INTO regions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (project, record.annotation_id, r.region_id, record.task_id, record.image_ref, r.width,
                     r.height, r.tool_type, _dumps(r.labels), bytes(r.rle), r.area, _dumps(r.fields),
                     r.model_version, r.predicted_region_id, r.match, r.iou, r.content_hash,
                     record.updated_ts, now)
                    for r in regions
                ],
            )  # fmt: skip
            conn.executemany(
                "INSERT OR REPLACE INTO field_outcomes VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (project, record.annotation_id, o.region_id, o.field, o.outcome, o.model_version)
                    for o in (record.outcomes if record.state == "accepted" else [])
                ],
            )
            new_labels = sum(1 for r in regions if old.get(r.region_id) != r.content_hash)
            after = self._bump(conn, project, new_labels)
        return WriteOutcome("stored", len(regions), new_labels, before, after)

    @staticmethod
    def _delete_annotation_rows(conn, project: str, annotation_id: int) -> int:
        removed = conn.execute(
            "DELETE FROM regions WHERE project_id = ? AND annotation_id = ?", (project, annotation_id)
        ).rowcount
        conn.execute(
            "DELETE FROM field_outcomes WHERE project_id = ? AND annotation_id = ?", (project, annotation_id)
        )
        conn.execute(
            "DELETE FROM annotations WHERE project_id = ? AND annotation_id = ?", (project, annotation_id)
        )
        return removed

    @staticmethod
    def _changes(conn, project: str) -> int:
        row = conn.execute("SELECT changes FROM project_counters WHERE project_id = ?", (project,)).fetchone()
        return int(row[0]) if row else 0

    def _bump(self, conn, project: str, n: int) -> int:
        conn.execute(
            "INSERT INTO project_counters VALUES (?, ?) ON CONFLICT (project_id) DO UPDATE"
            " SET changes = changes + excluded.changes",
            (project, int(n)),
        )
        return self._changes(conn, project)

    def delete_annotations(self, project_id: str | None, annotation_ids: list[int]) -> int:
        """Remove annotations and their regions and leave tombstones; returns the regions removed.

        ``project_id`` None (the event named no project) matches the ids in every project: Label Studio
        annotation ids are unique per instance.
        """
        project = project_key(project_id) if project_id is not None else ""
        removed, now = 0, time.time()
        with self._write() as conn:
            for annotation_id in annotation_ids:
                projects = (
                    [project]
                    if project
                    else [r[0] for r in conn.execute(
                        "SELECT project_id FROM annotations WHERE annotation_id = ?", (int(annotation_id),)
                    )]
                )  # fmt: skip
                for key in projects:
                    removed += self._delete_annotation_rows(conn, key, int(annotation_id))
                conn.execute(
                    "INSERT OR IGNORE INTO tombstones VALUES (?, 'annotation', ?, ?)",
                    (project, int(annotation_id), now),
                )
        return removed

    def delete_tasks(self, project_id: str, task_ids: list[int]) -> int:
        """Remove every annotation of these tasks and tombstone the tasks; returns the regions removed."""
        project, removed, now = project_key(project_id), 0, time.time()
        with self._write() as conn:
            for task_id in task_ids:
                ids = [
                    r[0]
                    for r in conn.execute(
                        "SELECT annotation_id FROM annotations WHERE project_id = ? AND task_id = ?",
                        (project, int(task_id)),
                    )
                ]
                for annotation_id in ids:
                    removed += self._delete_annotation_rows(conn, project, annotation_id)
                conn.execute(
                    "DELETE FROM predicted_regions WHERE project_id = ? AND task_id = ?",
                    (project, int(task_id)),
                )
                conn.execute(
                    "INSERT OR IGNORE INTO tombstones VALUES (?, 'task', ?, ?)", (project, int(task_id), now)
                )
        return removed

    def count_unparsed(self, project_id: str) -> int:
        """How many annotations of the project wait for its label config (see ``unparsed_annotations``)."""
        row = self._conn().execute(
            "SELECT count(*) FROM annotations WHERE project_id = ? AND state = 'unparsed'",
            (project_key(project_id),),
        )
        return int(row.fetchone()[0])

    def unparsed_annotations(self, project_id: str) -> list[dict]:
        """Raw payloads stored while the project's label config was unknown (oldest first)."""
        rows = self._conn().execute(
            "SELECT raw_json FROM annotations WHERE project_id = ? AND state = 'unparsed' ORDER BY received_at",
            (project_key(project_id),),
        )
        return [json.loads(r[0]) for r in rows if r[0]]

    # ---- queries for training ----
    def accepted_regions(self, project_id: str, *, limit: int | None = None) -> list[AcceptedRegion]:
        """Accepted regions of a project, oldest first; ``limit`` keeps the newest ``limit`` of them."""
        sql = (
            "SELECT r.*, a.task_fields_json, a.ground_truth FROM regions r JOIN annotations a"
            " ON a.project_id = r.project_id AND a.annotation_id = r.annotation_id WHERE r.project_id = ?"
            " ORDER BY r.stored_at DESC, r.rowid DESC"
        )
        params: tuple = (project_key(project_id),)
        if limit is not None:
            sql, params = sql + " LIMIT ?", (*params, int(limit))
        rows = self._conn().execute(sql, params).fetchall()
        return [
            AcceptedRegion(
                project_id=r["project_id"],
                annotation_id=r["annotation_id"],
                region_id=r["region_id"],
                task_id=r["task_id"],
                image_ref=r["image_ref"],
                width=r["width"],
                height=r["height"],
                rle=list(r["rle"]),
                fields=json.loads(r["fields_json"]),
                task_fields=json.loads(r["task_fields_json"]),
                labels=json.loads(r["labels_json"]),
                tool_type=r["tool_type"],
                model_version=r["model_version"],
                iou=r["iou"],
                ground_truth=bool(r["ground_truth"]),
                updated_at=r["updated_ts"],
            )
            for r in reversed(rows)
        ]

    def count_accepted(self, project_id: str) -> int:
        """How many accepted regions the project has now."""
        row = self._conn().execute(
            "SELECT count(*) FROM regions WHERE project_id = ?", (project_key(project_id),)
        )
        return int(row.fetchone()[0])

    def change_counter(self, project_id: str) -> int:
        """Monotonic count of region labels stored or changed in the project (a marker for ``new_since``)."""
        return self._changes(self._conn(), project_key(project_id))

    def new_since(self, project_id: str, marker: int) -> int:
        """How many region labels were stored or changed since ``change_counter`` returned ``marker``."""
        return self.change_counter(project_id) - int(marker)

    def acceptance_summary(self, project_id: str) -> dict:
        """Per field: ``{kept, edited, added, removed, acceptance_rate}``; the same per model version.

        ``acceptance_rate`` is kept / (kept + edited + removed): the share of pre-labels the annotators
        left unchanged (None without pre-labels). The pseudo-field ``region`` counts masks (kept: mask
        IoU >= 0.99 with the predicted one). ``matches`` counts accepted regions by how they were matched
        to a prediction (``id``, ``iou``, ``none``) with their mean mask IoU.
        """
        project, conn = project_key(project_id), self._conn()
        fields: dict[str, dict] = {}
        versions: dict[str, dict[str, dict]] = {}
        for name, outcome, version, n in conn.execute(
            "SELECT field, outcome, model_version, count(*) FROM field_outcomes WHERE project_id = ?"
            " GROUP BY field, outcome, model_version",
            (project,),
        ):
            for table in (fields, versions.setdefault(version or "none", {})):
                counts = table.setdefault(name, dict.fromkeys(OUTCOMES, 0))
                counts[outcome] += n
        for table in (fields, *versions.values()):
            for counts in table.values():
                judged = counts["kept"] + counts["edited"] + counts["removed"]
                counts["acceptance_rate"] = round(counts["kept"] / judged, 4) if judged else None
        matches = {
            (match or "none"): {"regions": n, "mean_iou": round(iou, 4) if iou is not None else None}
            for match, n, iou in conn.execute(
                "SELECT match, count(*), avg(iou) FROM regions WHERE project_id = ? GROUP BY match",
                (project,),
            )
        }
        return {"fields": fields, "by_model_version": versions, "matches": matches}

    # ---- the job queue ----
    def enqueue(self, project_id: str, kind: str, payload: dict | None = None) -> str:
        """Queue a job; returns its id. While a job of this project and kind is queued, that job is
        returned instead, with its payload replaced by this one (the newest request wins)."""
        project, payload_json = project_key(project_id), _dumps(payload or {})
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"kind must be a non-empty string such as 'train', got {kind!r}")
        with self._write() as conn:
            row = conn.execute(
                "SELECT job_id FROM jobs WHERE project_id = ? AND kind = ? AND status = 'queued'",
                (project, kind),
            ).fetchone()
            if row is not None:
                conn.execute("UPDATE jobs SET payload_json = ? WHERE job_id = ?", (payload_json, row[0]))
                return str(row[0])
            cursor = conn.execute(
                "INSERT INTO jobs (project_id, kind, payload_json, status, max_attempts, created_at)"
                " VALUES (?, ?, ?, 'queued', ?, ?)",
                (project, kind, payload_json, self.max_attempts, time.time()),
            )
            return str(cursor.lastrowid)

    def claim(self, worker_id: str, lease_s: float) -> Job | None:
        """Atomically take the oldest queued job of a project that has no running job, or None.

        The job becomes ``running`` for ``worker_id`` until ``now + lease_s`` (``heartbeat`` extends it).
        """
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0 seconds, got {lease_s}")
        now, token = time.time(), uuid.uuid4().hex
        with self._write() as conn:
            row = conn.execute(
                "SELECT job_id FROM jobs q WHERE status = 'queued' AND NOT EXISTS (SELECT 1 FROM jobs r"
                " WHERE r.project_id = q.project_id AND r.status = 'running') ORDER BY job_id LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1, worker_id = ?, token = ?,"
                " lease_s = ?, lease_until = ?, started_at = ?, heartbeat_at = ? WHERE job_id = ?",
                (worker_id, token, float(lease_s), now + lease_s, now, now, row[0]),
            )
            return self._job(conn, row[0])

    def heartbeat(self, job_id: str, *, token: str | None = None) -> bool:
        """Extend a running job's lease by its ``lease_s``; False when the job is no longer held."""
        now = time.time()
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET lease_until = ? + lease_s, heartbeat_at = ? WHERE job_id = ?"
                " AND status = 'running' AND (? IS NULL OR token = ?)",
                (now, now, int(job_id), token, token),
            )
            return cursor.rowcount == 1

    def complete(self, job_id: str, result: dict | None = None, *, token: str | None = None) -> None:
        """Mark a running job done with its ``result`` (a JSON object). Raises LeaseLostError when the
        job is not running (or, with ``token``, no longer held by that claim): nothing is marked."""
        self._finish(job_id, "done", result_json=_dumps(result or {}), error=None, token=token)

    def fail(self, job_id: str, error: str, *, token: str | None = None) -> None:
        """Mark a running job failed, keeping ``error``; LeaseLostError as for ``complete``."""
        self._finish(job_id, "failed", result_json=None, error=str(error)[:4000], token=token)

    def _finish(self, job_id, status: str, *, result_json, error, token: str | None) -> None:
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET status = ?, result_json = ?, error = ?, finished_at = ?, lease_until = NULL"
                " WHERE job_id = ? AND status = 'running' AND (? IS NULL OR token = ?)",
                (status, result_json, error, time.time(), int(job_id), token, token),
            )
            if cursor.rowcount != 1:
                job = self._job(conn, int(job_id))
                raise LeaseLostError(
                    f"job {job_id} is {job.status} (attempt {job.attempts}), not held by this claim; its lease "
                    f"expired and it was requeued or finished elsewhere, so this outcome was not recorded"
                )
            project = conn.execute("SELECT project_id FROM jobs WHERE job_id = ?", (int(job_id),)).fetchone()[
                0
            ]
            conn.execute(
                "DELETE FROM jobs WHERE project_id = ? AND status IN ('done', 'failed') AND job_id NOT IN"
                " (SELECT job_id FROM jobs WHERE project_id = ? AND status IN ('done', 'failed')"
                " ORDER BY job_id DESC LIMIT ?)",
                (project, project, self.keep_finished_jobs),
            )

    def requeue_stale(self, *, now: float | None = None) -> dict:
        """Running jobs whose lease expired (their worker died): back to ``queued``, or ``failed`` once
        ``max_attempts`` claims were spent. A stale job whose project and kind already has a queued job
        is failed as superseded by it. Returns ``{"requeued": [ids], "failed": [ids]}``."""
        now = time.time() if now is None else now
        out: dict[str, list[str]] = {"requeued": [], "failed": []}
        with self._write() as conn:
            stale = conn.execute(
                "SELECT job_id, project_id, kind, attempts, max_attempts FROM jobs"
                " WHERE status = 'running' AND lease_until < ?",
                (now,),
            ).fetchall()
            for job_id, project, kind, attempts, max_attempts in stale:
                queued = conn.execute(
                    "SELECT job_id FROM jobs WHERE project_id = ? AND kind = ? AND status = 'queued'",
                    (project, kind),
                ).fetchone()
                if attempts >= max_attempts or queued is not None:
                    why = (
                        f"worker lost (lease expired) on attempt {attempts} of {max_attempts}"
                        if queued is None
                        else f"worker lost (lease expired); superseded by queued job {queued[0]}"
                    )
                    conn.execute(
                        "UPDATE jobs SET status = 'failed', error = ?, finished_at = ?, lease_until = NULL,"
                        " token = NULL WHERE job_id = ?",
                        (why, now, job_id),
                    )
                    out["failed"].append(str(job_id))
                else:
                    conn.execute(
                        "UPDATE jobs SET status = 'queued', worker_id = NULL, token = NULL, lease_until = NULL"
                        " WHERE job_id = ?",
                        (job_id,),
                    )
                    out["requeued"].append(str(job_id))
        if stale:
            logger.warning("stale jobs: requeued %s, failed %s", out["requeued"], out["failed"])
        return out

    def job(self, job_id: str) -> Job:
        """One job by id; UnknownJobError when there is none."""
        return self._job(self._conn(), int(job_id))

    def jobs(self, project_id: str, *, limit: int = 50) -> list[Job]:
        """The project's jobs, newest first."""
        rows = self._conn().execute(
            "SELECT * FROM jobs WHERE project_id = ? ORDER BY job_id DESC LIMIT ?",
            (project_key(project_id), limit),
        )
        return [self._job_from_row(r) for r in rows]

    def status(self) -> dict:
        """Job counts per state, the last error and the last finished job (for /health and /metrics)."""
        conn = self._conn()
        counts = dict.fromkeys(JOB_STATES, 0)
        counts.update(dict(conn.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall()))
        last_failed = conn.execute(
            "SELECT * FROM jobs WHERE status = 'failed' ORDER BY finished_at DESC LIMIT 1"
        ).fetchone()
        last = conn.execute(
            "SELECT * FROM jobs WHERE status IN ('done', 'failed') ORDER BY finished_at DESC LIMIT 1"
        ).fetchone()
        return {
            "backend": "sqlite",
            **counts,
            "last_error": job_brief(self._job_from_row(last_failed)) if last_failed else None,
            "last_finished": job_brief(self._job_from_row(last)) if last else None,
        }

    def _job(self, conn, job_id: int) -> Job:
        row = conn.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise UnknownJobError(f"no job has id {job_id}; list them with jobs(project_id)")
        return self._job_from_row(row)

    @staticmethod
    def _job_from_row(r) -> Job:
        return Job(
            job_id=str(r["job_id"]),
            project_id=r["project_id"],
            kind=r["kind"],
            payload=json.loads(r["payload_json"]),
            status=r["status"],
            attempts=r["attempts"],
            max_attempts=r["max_attempts"],
            created_at=r["created_at"],
            worker_id=r["worker_id"],
            token=r["token"],
            lease_until=r["lease_until"],
            started_at=r["started_at"],
            finished_at=r["finished_at"],
            result=json.loads(r["result_json"]) if r["result_json"] else None,
            error=r["error"],
        )


def job_brief(job: Job) -> dict:
    """A finished job as a small JSON object for status pages."""
    brief = {
        "job_id": job.job_id,
        "project_id": job.project_id,
        "kind": job.kind,
        "status": job.status,
        "attempts": job.attempts,
        "finished_at": job.finished_at,
    }
    if job.error:
        brief["error"] = job.error
    if job.result:
        brief["result"] = job.result
    return brief
