"""``osprey-label prelabel --out predictions.jsonl``: the predictions written to a file of Label
Studio tasks instead of through the API, for teams that import in bulk.

Each line is one Label Studio task as its import takes it (Import -> upload the file, or
``POST /api/projects/<id>/import``)::

    {"data": {...the task's data...}, "predictions": [{"model_version": ..., "score": ..., "result": [...]}],
     "meta": {"osprey_source": {"project": 7, "task": 123}}}

Importing creates new tasks (Label Studio has no import that adds predictions to existing tasks; for
those, run ``prelabel`` without ``--out``). ``meta.osprey_source`` names the task it came from.

The file is resumable: a run appends, one chunk of lines at a time (flushed and fsynced), and a rerun
with the same ``--out`` reads the file first and skips the tasks already in it with this model version;
a line cut off by a crash is removed. :class:`JsonlSink` is the engine's sink for it: the same chunked
writes and read-backs as against Label Studio, on the file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from backend.errors import InputError

logger = logging.getLogger(__name__)


class JsonlSink:
    """The engine's sink (``create_predictions``, ``tasks``, ``delete_prediction``) over a JSONL file
    (see the module docstring). ``remember(task)`` must see each task before its prediction is written
    (the line carries the task's ``data``); :meth:`pending` wraps the task stream to do it and to mark
    the tasks already in the file."""

    def __init__(self, path: str | Path, *, project: int, model_version: str) -> None:
        self.path = Path(path)
        self.project, self.model_version = int(project), model_version
        self.exported: set[int] = set()
        self._data: dict[int, dict] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._read_back()
        self._file = self.path.open("a", encoding="utf-8")

    def _read_back(self) -> None:
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        good = raw.rfind(b"\n") + 1
        if good < len(raw):  # a line cut off by a crash: drop it, its chunk is written again
            logger.warning("%s: a cut-off last line removed (a run was interrupted)", self.path)
            with self.path.open("r+b") as handle:
                handle.truncate(good)
        for number, line in enumerate(raw[:good].splitlines(), 1):
            try:
                task = json.loads(line)
                source = task["meta"]["osprey_source"]
                versions = {p.get("model_version") for p in task.get("predictions") or []}
            except (ValueError, KeyError, TypeError):
                raise InputError(
                    f"{self.path} line {number} is not a task written by osprey-label prelabel --out; "
                    f"choose another --out file"
                ) from None
            if int(source["project"]) == self.project and self.model_version in versions:
                self.exported.add(int(source["task"]))

    def pending(self, tasks: Iterable[dict]) -> Iterator[dict]:
        """The task stream, each task remembered, and those already in the file marked done with a
        prediction of this version (so the engine counts them as skipped)."""
        for task in tasks:
            if task.get("id") in self.exported:
                marker = {"model_version": self.model_version, "result": [{"in": str(self.path)}]}
                yield {**task, "predictions": [*(task.get("predictions") or []), marker]}
                continue
            self.remember(task)
            yield task

    def remember(self, task: dict) -> None:
        self._data[int(task["id"])] = task.get("data") or {}

    # ---- the engine's sink ----
    def create_predictions(self, project: int, predictions: list[dict]) -> int:
        lines = []
        for item in predictions:
            task = int(item["task"])
            prediction = {k: item[k] for k in ("model_version", "score", "result")}
            lines.append(json.dumps({
                "data": self._data.pop(task, {}), "predictions": [prediction],
                "meta": {"osprey_source": {"project": int(project), "task": task}},
            }, separators=(",", ":")))  # fmt: skip
        self._file.write("".join(line + "\n" for line in lines))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.exported.update(int(item["task"]) for item in predictions)
        return len(predictions)

    def tasks(self, project: int, *, ids=None, skip_missing: bool = True, **_) -> Iterator[dict]:
        """The tasks among ``ids`` already in the file, each with its one prediction of the version."""
        for task in ids or []:
            if int(task) in self.exported:
                prediction = {
                    "id": 1,
                    "model_version": self.model_version,
                    "result": [{"in": str(self.path)}],
                }
                yield {"id": int(task), "predictions": [prediction]}

    def delete_prediction(self, prediction_id: int) -> None:
        """Nothing in Label Studio is touched with ``--out``."""

    def forget(self, task_id: int | None) -> None:
        """A task finished without a line (failed, skipped): its data is not kept."""
        self._data.pop(task_id, None)

    def close(self) -> None:
        self._file.close()
