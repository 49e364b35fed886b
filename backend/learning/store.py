"""The training store: what the backend predicted and what annotators accepted, per project.

Kept in the SQLite file of :mod:`backend.database` (WAL, one transaction per write, so a webhook
that returns has committed). Its tables:

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

The job queue shares the file but not this class (:mod:`backend.jobs.sqlite_queue`).
Timestamps are POSIX seconds (float). Project ids are strings: Label Studio's ``"12.1699999999"`` from
``/setup`` and ``/predict`` is reduced to ``"12"`` everywhere (``project_key``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from backend.acceptance.comparison import FieldOutcome
from backend.database import SqliteDatabase, dumps
from backend.labelstudio.ids import project_key
from backend.labelstudio.results import PredictedRegion, prediction_regions

logger = logging.getLogger(__name__)


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
        from backend.labelstudio.rle import decode_brush_rle

        return decode_brush_rle(self.rle, self.width, self.height)


def compare_versions(ts: float, content_hash: str, other_ts: float, other_hash: str) -> int:
    """1 when version (ts, hash) supersedes the other, 0 when they are the same, -1 when it is older.

    Equal timestamps with different content are ordered by hash, so deliveries in any order converge.
    """
    mine, other = (float(ts), content_hash), (float(other_ts), other_hash)
    return (mine > other) - (mine < other)


class TrainingStore(SqliteDatabase):
    """Predictions and accepted regions in the service's SQLite file (see the module docstring).

    ``max_predicted_regions`` bounds the predicted regions kept per project (oldest dropped);
    ``busy_timeout_s`` and ``synchronous`` are those of :class:`~backend.database.SqliteDatabase`.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout_s: float = 30.0,
        max_predicted_regions: int = 50_000,
        synchronous: str = "FULL",
    ) -> None:
        if max_predicted_regions < 1:
            raise ValueError(f"max_predicted_regions must be >= 1, got {max_predicted_regions}")
        self.max_predicted_regions = int(max_predicted_regions)
        self._predictions_recorded = 0
        super().__init__(path, busy_timeout_s=busy_timeout_s, synchronous=synchronous)

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
            (project, int(task_id), r.region_id, r.model_version, source, r.kind, dumps(r.items), now)
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

    # ---- label configs ----
    def remember_label_config(self, project_id: str, label_config: str) -> None:
        """Keep the project's label config (what Label Studio sent last) across restarts."""
        if not isinstance(label_config, str) or not label_config.strip():
            raise ValueError("label_config must be a non-empty XML string")
        with self._write() as conn:
            conn.execute(
                "INSERT INTO project_configs (project_id, label_config, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (project_id) DO UPDATE"
                " SET label_config = excluded.label_config, updated_at = excluded.updated_at"
                " WHERE label_config != excluded.label_config",
                (project_key(project_id), label_config, time.time()),
            )

    def label_config(self, project_id: str) -> str | None:
        """The project's last known label config, or None."""
        row = (
            self._conn()
            .execute(
                "SELECT label_config FROM project_configs WHERE project_id = ?", (project_key(project_id),)
            )
            .fetchone()
        )
        return row[0] if row else None

    def remember_auto_prelabel(self, project_id: str, choice: bool | None) -> None:
        """Keep the project's own choice of automatic pre-labelling (None: as OSPREY_AUTO_PRELABEL says);
        the project's label config must be known (it arrives in the same ``/setup``)."""
        with self._write() as conn:
            conn.execute(
                "UPDATE project_configs SET auto_prelabel = ? WHERE project_id = ?",
                (None if choice is None else int(bool(choice)), project_key(project_id)),
            )

    def auto_prelabel(self, project_id: str) -> bool | None:
        """The project's own choice of automatic pre-labelling, or None when it made none."""
        row = (
            self._conn()
            .execute(
                "SELECT auto_prelabel FROM project_configs WHERE project_id = ?", (project_key(project_id),)
            )
            .fetchone()
        )
        return None if row is None or row[0] is None else bool(row[0])

    def known_projects(self) -> list[str]:
        """Projects whose label config is known, in id order."""
        rows = self._conn().execute("SELECT project_id FROM project_configs").fetchall()
        return sorted((r[0] for r in rows), key=lambda p: (len(p), p))

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

    def annotated_task_ids(self, project_id: str) -> set[int]:
        """The tasks of the project that the store holds an annotation for (any state)."""
        rows = self._conn().execute(
            "SELECT DISTINCT task_id FROM annotations WHERE project_id = ? AND task_id IS NOT NULL",
            (project_key(project_id),),
        )
        return {int(row[0]) for row in rows}

    def task_annotation_ids(self, project_id: str, task_ids: list[int]) -> dict[int, set[int]]:
        """Per task (of ``task_ids``), the ids of the annotations stored for it (any state)."""
        out: dict[int, set[int]] = {int(t): set() for t in task_ids}
        conn, project = self._conn(), project_key(project_id)
        for start in range(0, len(task_ids), 500):
            chunk = [int(t) for t in task_ids[start : start + 500]]
            rows = conn.execute(
                f"SELECT task_id, annotation_id FROM annotations WHERE project_id = ? AND task_id IN"
                f" ({','.join('?' * len(chunk))})",
                (project, *chunk),
            ).fetchall()
            for task_id, annotation_id in rows:
                out[int(task_id)].add(int(annotation_id))
        return out

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
                 record.content_hash, record.image_ref, dumps(record.task_fields), record.completed_by,
                 int(bool(record.ground_truth)), dumps(record.raw) if record.raw is not None else None, now),
            )  # fmt: skip
            regions = record.regions if record.state == "accepted" else []
            conn.executemany(
                "INSERT INTO regions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (project, record.annotation_id, r.region_id, record.task_id, record.image_ref, r.width,
                     r.height, r.tool_type, dumps(r.labels), bytes(r.rle), r.area, dumps(r.fields),
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

    def outcome_counts(self, project_id: str) -> list[tuple[str, str, str | None, int]]:
        """``(field, outcome, model_version, n)`` over the project's field outcomes (see
        :func:`backend.acceptance.report.acceptance_summary`)."""
        rows = self._conn().execute(
            "SELECT field, outcome, model_version, count(*) FROM field_outcomes WHERE project_id = ?"
            " GROUP BY field, outcome, model_version",
            (project_key(project_id),),
        )
        return [tuple(r) for r in rows]

    def region_matches(self, project_id: str) -> list[tuple[str | None, float | None]]:
        """``(match, mask IoU)`` of each accepted region of the project: how it was matched to a
        prediction (``id``, ``iou`` or None) and the IoU with it."""
        rows = self._conn().execute(
            "SELECT match, iou FROM regions WHERE project_id = ?", (project_key(project_id),)
        )
        return [tuple(r) for r in rows]
