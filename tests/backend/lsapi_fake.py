"""An in-memory stand-in for the Label Studio API calls the pre-label engine makes (the real API is
exercised by tests/e2e)."""

from __future__ import annotations

import copy


class FakeLabelStudio:
    """Tasks with their predictions; ``create_predictions``/``delete_prediction``/``predictions``/``tasks``
    as :class:`backend.labelstudio.api.LabelStudioClient` offers them. ``fail_creates`` makes the next
    N bulk writes raise (a crash or an outage); ``tasks_read`` counts the tasks the listings gave out;
    ``views`` are Data Manager tabs (their task ids as listed: one deleted since is read as missing)."""

    def __init__(self, project: int = 7, label_config: str | None = None) -> None:
        self.project = project
        self.config = label_config
        self.tasks_by_id: dict[int, dict] = {}
        self.next_prediction = 1000
        self.fail_creates = 0
        self.calls: list[tuple] = []
        self.tasks_read = 0  # tasks the listings gave out
        self.views: dict[int, list[int]] = {}

    def add_task(self, task_id: int, image: str, predictions: list[dict] | None = None) -> dict:
        task = {
            "id": task_id,
            "data": {"image": image},
            "annotations": [],
            "predictions": [],
            "project": self.project,
        }
        self.tasks_by_id[task_id] = task
        for prediction in predictions or []:
            self._store(task_id, prediction)
        return task

    def _store(self, task_id: int, prediction: dict) -> dict:
        self.next_prediction += 1
        stored = {"id": self.next_prediction, "task": task_id, "score": None, **prediction}
        self.tasks_by_id[task_id]["predictions"].append(stored)
        return stored

    # ---- the client's surface ----
    def tasks(self, project: int, *, ids=None, view=None, page_size: int = 100, skip_missing: bool = False,
              on_missing=None, after=None, unannotated: bool = False):  # fmt: skip
        self.calls.append(("tasks", project, tuple(ids) if ids is not None else None))
        if view is not None:
            ids, skip_missing = self.views[view], True
        chosen = list(ids) if ids is not None else sorted(self.tasks_by_id)
        if after is not None:
            chosen = [task_id for task_id in chosen if task_id > after]
        if unannotated:
            chosen = [task_id for task_id in chosen if not self.tasks_by_id[task_id]["annotations"]]
        for task_id in chosen:
            if int(task_id) not in self.tasks_by_id:
                if skip_missing:
                    if on_missing is not None:
                        on_missing([task_id])
                    continue
                raise KeyError(f"no task {task_id}")
            self.tasks_read += 1
            yield copy.deepcopy(self.tasks_by_id[int(task_id)])

    def view(self, project: int, view: int) -> dict:
        return {"id": view, "project": project}

    def predictions(self, task_id: int) -> list[dict]:
        return copy.deepcopy(self.tasks_by_id[int(task_id)]["predictions"])

    def create_predictions(self, project: int, predictions: list[dict]) -> int:
        self.calls.append(("create", project, [p["task"] for p in predictions]))
        if self.fail_creates:
            self.fail_creates -= 1
            raise RuntimeError("Label Studio import predictions failed (HTTP 503): ServiceUnavailable")
        for prediction in predictions:
            self._store(prediction["task"], {k: v for k, v in prediction.items() if k != "task"})
        return len(predictions)

    def delete_prediction(self, prediction_id: int) -> None:
        self.calls.append(("delete", prediction_id))
        for task in self.tasks_by_id.values():
            task["predictions"] = [p for p in task["predictions"] if p["id"] != prediction_id]

    def label_config(self, project: int) -> str:
        assert self.config is not None, "give FakeLabelStudio a label_config"
        return self.config

    # ---- what the tests look at ----
    def of_version(self, task_id: int, version: str) -> list[dict]:
        return [p for p in self.tasks_by_id[task_id]["predictions"] if p["model_version"] == version]
