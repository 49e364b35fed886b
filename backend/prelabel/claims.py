"""Exactly one writer per (task, model version): claims with a lease, and the rule that makes writers
who cannot see each other's claims converge.

Every writer of pre-labels (a deferred *Retrieve Predictions* job, ``osprey-label prelabel``, automatic
pre-labelling, a batch ``/predict`` whose answer Label Studio stores) claims a task for the current
model version before predicting it, in the ``prelabel_claims`` table of the training store's SQLite
file (shared by every process of one ``MODEL_DIR``). A claim is held until the prediction is written,
given back when the task fails, and otherwise ends with its lease (``OSPREY_PRELABEL_CLAIM_LEASE_S``):
the tasks of a writer that crashed are taken over once it runs out, or at once when the writer was a
process of this host that no longer exists (a killed command). A claim is one transaction over a
batch of tasks; the tasks another writer holds are left to it.

A claim is not the proof that a task is done: Label Studio is. So after claiming, a writer reads the
claimed tasks back and leaves those that meanwhile got a prediction of the version (another writer
finished them between our task listing and our claim).

Writers that do not share the file (``prelabel`` run on another machine, a second replica with its own
``MODEL_DIR``) cannot see each other's claims. For them, :func:`converge` is the rule: after writing, a
writer reads the tasks back and deletes every non-empty prediction of the version but the one with the
lowest id. Every writer applies it, and the later of two writers always sees both predictions, so a
task ends with exactly one whatever the interleaving (for a moment it may hold two).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from backend.database import SqliteDatabase

logger = logging.getLogger(__name__)

DEFAULT_LEASE_S = 900.0


def writer_id(what: str) -> str:
    """A name unique to this writer: host, process, what it is, and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{what}:{uuid.uuid4().hex[:8]}"


BATCH_WRITER = "batch"  # the writer name of a batch /predict: Label Studio itself stores what it answers


def _what(owner: str) -> str:
    """The kind of writer a :func:`writer_id` names (``batch``, a job, the command...)."""
    return owner.split(":")[2] if owner.count(":") >= 3 else ""


def _alive(owner: str) -> bool:
    """False when ``owner`` (a :func:`writer_id`) is a process of this host that has ended (a killed
    command: its claims are taken over at once instead of after the lease); True otherwise."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


class PrelabelClaims(SqliteDatabase):
    """The ``prelabel_claims`` table (see the module docstring). Task ids are Label Studio's integers;
    ``project`` and ``version`` are strings."""

    def claim(
        self, project: str, version: str, task_ids: Iterable[int], *, owner: str, lease_s: float
    ) -> set[int]:
        """Claim the tasks for ``owner`` until ``lease_s`` from now; the ids claimed (free, expired, or
        already ``owner``'s: a retry renews its own claim). One transaction for all of them.

        A batch ``/predict`` is never kept from a task by another batch ``/predict``'s claim: Label Studio
        asked for both answers and stores them itself (asking again for a task it was just answered is
        *Retrieve Predictions* run twice, or a task reopened), so holding it back would only answer
        nothing. Its claims still keep the other writers away."""
        now, claimed = time.time(), set()
        with self._write() as conn:
            for task in dict.fromkeys(int(t) for t in task_ids):
                row = conn.execute(
                    "SELECT owner, lease_until FROM prelabel_claims WHERE project_id = ? AND task_id = ?"
                    " AND model_version = ?",
                    (str(project), task, version),
                ).fetchone()
                if (
                    row is not None
                    and row["owner"] != owner
                    and row["lease_until"] > now
                    and _alive(row["owner"])
                    and not (_what(owner) == BATCH_WRITER and _what(row["owner"]) == BATCH_WRITER)
                ):
                    continue
                if row is not None and row["owner"] != owner:
                    logger.info(
                        "task %s: the claim of %s ran out; taken over by %s", task, row["owner"], owner
                    )
                conn.execute(
                    "INSERT OR REPLACE INTO prelabel_claims VALUES (?, ?, ?, ?, ?, ?)",
                    (str(project), task, version, owner, now, now + float(lease_s)),
                )
                claimed.add(task)
        return claimed

    def hold(
        self, project: str, version: str, task_ids: Iterable[int], *, owner: str, seconds: float
    ) -> None:
        """Keep ``owner``'s claims for ``seconds`` from now (and no longer): an answer Label Studio has
        still to store, so that nobody writes the same tasks meanwhile."""
        until = time.time() + float(seconds)
        with self._write() as conn:
            conn.executemany(
                "UPDATE prelabel_claims SET lease_until = ? WHERE project_id = ? AND task_id = ?"
                " AND model_version = ? AND owner = ?",
                [(until, str(project), int(t), version, owner) for t in task_ids],
            )

    def release(self, project: str, version: str, task_ids: Iterable[int], *, owner: str) -> None:
        """Give ``owner``'s claims back (written, failed or handed on); others' claims are untouched."""
        with self._write() as conn:
            conn.executemany(
                "DELETE FROM prelabel_claims WHERE project_id = ? AND task_id = ? AND model_version = ?"
                " AND owner = ?",
                [(str(project), int(t), version, owner) for t in task_ids],
            )

    def held(self) -> dict[str, int]:
        """Live claims per project (``/metrics``); expired ones are removed first."""
        with self._write() as conn:
            conn.execute("DELETE FROM prelabel_claims WHERE lease_until <= ?", (time.time(),))
        rows = (
            self._conn()
            .execute("SELECT project_id, COUNT(*) AS n FROM prelabel_claims GROUP BY project_id")
            .fetchall()
        )
        return {row["project_id"]: int(row["n"]) for row in rows}


@dataclass
class Claimer:
    """One writer's claims on one project and version: what the engine calls. ``claims`` None: no
    shared store (``--out``, tests), every task is claimable and :func:`converge` alone keeps one."""

    claims: PrelabelClaims | None
    project: str
    version: str
    owner: str
    lease_s: float = DEFAULT_LEASE_S

    def claim(self, task_ids: list[int]) -> set[int]:
        if self.claims is None:
            return set(task_ids)
        return self.claims.claim(self.project, self.version, task_ids, owner=self.owner, lease_s=self.lease_s)

    def release(self, task_ids: list[int]) -> None:
        if self.claims is not None and task_ids:
            self.claims.release(self.project, self.version, task_ids, owner=self.owner)

    def hold(self, task_ids: list[int], seconds: float) -> None:
        if self.claims is not None and task_ids:
            self.claims.hold(self.project, self.version, task_ids, owner=self.owner, seconds=seconds)


@dataclass
class Converged:
    """What :func:`converge` found: tasks holding a prediction of the version, and what it deleted."""

    done: set[int]
    duplicates: int = 0
    empty: int = 0


def converge(sink, project: int, task_ids: list[int], model_version: str) -> Converged:
    """Read the tasks back; of each task's predictions of ``model_version`` keep the non-empty one with
    the lowest id and delete the other non-empty ones (another writer's duplicates) and, once one is
    there, the empty ones (which block Label Studio's later retrieves)."""
    out = Converged(done=set())
    if not task_ids:
        return out
    for task in sink.tasks(project, ids=task_ids, skip_missing=True):
        mine = [
            p
            for p in task.get("predictions") or []
            if isinstance(p, dict) and p.get("model_version") == model_version
        ]
        full = sorted(p["id"] for p in mine if p.get("result") and isinstance(p.get("id"), int))
        if not full and not any(p.get("result") for p in mine):
            continue
        out.done.add(task["id"])
        for prediction_id in full[1:]:
            sink.delete_prediction(prediction_id)
            out.duplicates += 1
        for prediction in mine:
            if not prediction.get("result") and isinstance(prediction.get("id"), int):
                sink.delete_prediction(prediction["id"])
                out.empty += 1
    if out.duplicates:
        logger.info(
            "project %s: %d duplicate predictions of %s deleted (kept the lowest id)",
            project,
            out.duplicates,
            model_version,
        )
    return out
