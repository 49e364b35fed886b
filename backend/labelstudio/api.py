"""Label Studio's REST API, the one client every part of the backend uses (label-studio-sdk): a
project's label config and tasks, predictions written and deleted, the project's webhooks.

``LabelStudioClient`` wraps the SDK client, which exchanges a personal access token (a JWT refresh
token) for short-lived access tokens and sends a legacy key as it is. Tasks come back as plain JSON
dicts with their ``data``, ``annotations`` and ``predictions`` (each prediction with its ``id``,
``model_version``, ``result`` and ``score``), as ``/predict`` receives them. Predictions are written in
bulk (``POST /api/projects/<id>/import/predictions``), one call per chunk.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator

from backend.errors import SettingsError

logger = logging.getLogger(__name__)

TASK_KEYS = ("id", "data", "annotations", "predictions", "project", "meta")


class LabelStudioAPIError(RuntimeError):
    """A Label Studio API call failed; the message names the call and the status, never the token."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _plain(value) -> dict:
    """An SDK model (or dict) as plain JSON types."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    elif hasattr(value, "dict"):
        value = value.dict()
    return json.loads(json.dumps(value, default=str))


class LabelStudioClient:
    """A Label Studio instance at ``url`` (``LABEL_STUDIO_URL``) with ``api_key`` (``LABEL_STUDIO_API_KEY``)."""

    def __init__(self, *, url: str, api_key: str, timeout_s: float = 60.0, sdk_client=None) -> None:
        if not url or not api_key:
            raise SettingsError(
                "writing predictions needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (a personal access token "
                "from Label Studio's Account & Settings page)"
            )
        self.url = url.rstrip("/")
        if sdk_client is None:
            from label_studio_sdk import LabelStudio

            sdk_client = LabelStudio(base_url=self.url, api_key=api_key, timeout=timeout_s)
        self._sdk = sdk_client

    def _call(self, what: str, function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except Exception as error:  # the SDK raises httpx and ApiError types; name the call, not the token
            status = getattr(error, "status_code", None)
            raise LabelStudioAPIError(
                f"Label Studio {what} failed"
                + (f" (HTTP {status})" if status else "")
                + f": {type(error).__name__}",
                status=status,
            ) from error

    def tasks(
        self,
        project: int,
        *,
        ids: Iterable[int] | None = None,
        view: int | None = None,
        page_size: int = 100,
        skip_missing: bool = False,
    ) -> Iterator[dict]:
        """The project's tasks (or those of a Data Manager ``view``, or exactly ``ids``), each as a dict of
        :data:`TASK_KEYS`. ``skip_missing``: ids deleted meanwhile are left out instead of raising.

        Tasks are always read through the task list (``GET /api/tasks/?project=...``), never one by one:
        reading a single task makes Label Studio ask the connected ML backend for a prediction.
        """
        if ids is None:
            yield from self._list(project, view=view, page_size=page_size)
            return
        wanted = [int(i) for i in ids]
        for start in range(0, len(wanted), page_size):
            chunk = wanted[start : start + page_size]
            query = json.dumps({"selectedItems": {"all": False, "included": chunk}})
            found = {t["id"]: t for t in self._list(project, query=query, page_size=page_size)}
            missing = [i for i in chunk if i not in found]
            if missing and not skip_missing:
                raise LabelStudioAPIError(f"project {project} has no tasks {missing}", status=404)
            if missing:
                logger.info("tasks %s are gone from Label Studio project %s; skipped", missing, project)
            for task_id in chunk:
                if task_id in found:
                    yield found[task_id]

    def _list(self, project: int, *, view: int | None = None, query: str | None = None, page_size: int = 100):
        pager = self._call(
            f"list tasks of project {project}", self._sdk.tasks.list, project=int(project), view=view,
            query=query, fields="all", page_size=page_size,
        )  # fmt: skip
        try:
            for task in pager:
                plain = _plain(task)
                yield {k: plain.get(k) for k in TASK_KEYS}
        except LabelStudioAPIError:
            raise
        except Exception as error:  # a later page failed
            status = getattr(error, "status_code", None)
            raise LabelStudioAPIError(
                f"Label Studio list tasks of project {project} failed"
                + (f" (HTTP {status})" if status else ""),
                status=status,
            ) from error

    def label_config(self, project: int) -> str:
        """The project's label config XML."""
        found = _plain(self._call(f"GET project {project}", self._sdk.projects.get, id=int(project)))
        config = found.get("label_config")
        if not isinstance(config, str) or not config.strip():
            raise LabelStudioAPIError(f"Label Studio project {project} has no label config yet")
        return config

    def predictions(self, task_id: int) -> list[dict]:
        """Every prediction of one task (``id``, ``model_version``, ``result``, ``score``)."""
        found = self._call(
            f"list predictions of task {task_id}", self._sdk.predictions.list, task=int(task_id)
        )
        return [_plain(p) for p in found]

    def create_predictions(self, project: int, predictions: list[dict]) -> int:
        """Write ``predictions`` (each ``{task, result, score, model_version}``) in one call; returns how
        many Label Studio created."""
        if not predictions:
            return 0
        response = self._call(
            f"import {len(predictions)} predictions into project {project}",
            self._sdk.projects.import_predictions,
            id=int(project),
            request=predictions,
        )
        created = getattr(response, "created", None)
        return int(created) if created is not None else len(predictions)

    def delete_prediction(self, prediction_id: int) -> None:
        self._call(f"DELETE prediction {prediction_id}", self._sdk.predictions.delete, id=int(prediction_id))

    def webhooks(self, project: str) -> list[dict]:
        """The project's webhooks (``id``, ``project``, ``url``, ``headers``, ``actions``, ...)."""
        found = self._call(
            f"list the webhooks of project {project}", self._sdk.webhooks.list, project=str(project)
        )
        return [_plain(hook) for hook in found]

    def set_webhook_headers(self, webhook_id: int, headers: dict[str, str]) -> None:
        """Replace the extra headers Label Studio sends with webhook ``webhook_id``."""
        self._call(
            f"update webhook {webhook_id}", self._sdk.webhooks.update, id=int(webhook_id), headers=headers
        )
