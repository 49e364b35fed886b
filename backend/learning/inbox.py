"""Webhooks as they arrived, stored before they are answered: the intake's durable inbox.

Label Studio sends each webhook once, with a 1 s timeout, and never again; an annotation refused or lost
is lost for training for good. So ``/webhook`` does the least that makes it durable (one row appended
to the ``webhook_inbox`` table of the training store's SQLite file, one transaction) and answers; the
intake thread (:class:`backend.learning.intake.Intake`) parses the rows in arrival order and marks
each ``done`` (with the outcome) or ``failed`` (with why). Rows the reconciliation finds missing are
appended the same way (``source='reconcile'``). Finished rows are kept for ``keep_s`` (a week), then
pruned.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from backend.database import SqliteDatabase, dumps

KEEP_S = 7 * 86400


@dataclass(frozen=True)
class InboxItem:
    """One received event: its row id, the webhook's ``action``, the project it names (or None), and
    the whole body as Label Studio sent it."""

    inbox_id: int
    action: str
    project_id: str | None
    payload: dict
    source: str
    received_at: float


class WebhookInbox(SqliteDatabase):
    """The inbox on the training store's SQLite file (see the module docstring)."""

    def __init__(self, path: str | Path, *, keep_s: float = KEEP_S, busy_timeout_s: float = 30.0) -> None:
        self.keep_s = float(keep_s)
        super().__init__(path, busy_timeout_s=busy_timeout_s)

    def append(self, action: str, project_id: str | None, payload: dict, *, source: str = "webhook") -> int:
        """Store one event (committed when this returns); its inbox id."""
        with self._write() as conn:
            cursor = conn.execute(
                "INSERT INTO webhook_inbox (received_at, action, project_id, source, payload_json)"
                " VALUES (?, ?, ?, ?, ?)",
                (time.time(), action, project_id, source, dumps(payload)),
            )
            return int(cursor.lastrowid)

    def pending(self, limit: int = 50) -> list[InboxItem]:
        """The oldest events not parsed yet, in arrival order."""
        rows = (
            self._conn()
            .execute(
                "SELECT * FROM webhook_inbox WHERE state = 'new' ORDER BY inbox_id LIMIT ?", (int(limit),)
            )
            .fetchall()
        )
        return [
            InboxItem(
                r["inbox_id"],
                r["action"],
                r["project_id"],
                json.loads(r["payload_json"]),
                r["source"],
                r["received_at"],
            )  # fmt: skip
            for r in rows
        ]

    def finish(self, inbox_id: int, *, outcome: dict | None = None, error: str | None = None) -> None:
        """Mark an event parsed: ``done`` with its outcome, or ``failed`` with why."""
        state = "failed" if error is not None else "done"
        with self._write() as conn:
            conn.execute(
                "UPDATE webhook_inbox SET state = ?, outcome_json = ?, error = ?, done_at = ? WHERE inbox_id = ?",
                (state, dumps(outcome) if outcome is not None else None, error, time.time(), int(inbox_id)),
            )

    def result(self, inbox_id: int) -> dict | None:
        """A parsed event's outcome (``{"status": "failed", "error"}`` for a failed one); None while it
        waits or when there is no such event."""
        row = (
            self._conn()
            .execute(
                "SELECT state, outcome_json, error FROM webhook_inbox WHERE inbox_id = ?", (int(inbox_id),)
            )
            .fetchone()
        )
        if row is None or row["state"] == "new":
            return None
        if row["state"] == "failed":
            return {"status": "failed", "error": row["error"]}
        return json.loads(row["outcome_json"]) if row["outcome_json"] else {}

    def counts(self) -> dict:
        """Events per state, the age of the oldest unparsed one, and the last failure (``/metrics``)."""
        conn = self._conn()
        counts = {"new": 0, "done": 0, "failed": 0}
        counts.update(
            dict(conn.execute("SELECT state, count(*) FROM webhook_inbox GROUP BY state").fetchall())
        )
        oldest = conn.execute("SELECT min(received_at) FROM webhook_inbox WHERE state = 'new'").fetchone()[0]
        failed = conn.execute(
            "SELECT inbox_id, action, project_id, error FROM webhook_inbox WHERE state = 'failed'"
            " ORDER BY inbox_id DESC LIMIT 1"
        ).fetchone()
        return {
            **counts,
            "oldest_waiting_s": round(time.time() - oldest, 3) if oldest is not None else None,
            "last_failure": dict(failed) if failed is not None else None,
        }

    def prune(self, *, now: float | None = None) -> int:
        """Delete finished events older than ``keep_s``; how many."""
        cutoff = (time.time() if now is None else now) - self.keep_s
        with self._write() as conn:
            cursor = conn.execute("DELETE FROM webhook_inbox WHERE state != 'new' AND done_at < ?", (cutoff,))
            return cursor.rowcount
