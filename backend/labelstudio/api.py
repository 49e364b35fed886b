"""Label Studio's REST API, the one client every part of the backend uses: a project's label config and
tasks, predictions written and deleted, the project's webhooks.

Plain HTTP on a :func:`~backend.labelstudio.http.label_studio_session` (the one retry policy) with a
:class:`~backend.labelstudio.auth.LabelStudioAuth` (a personal access token is exchanged for access
tokens, refreshed by the expiry Label Studio wrote into them); a 401 makes the auth forget its access
token and the call is repeated once. Tasks are read through the task list (``GET /api/tasks/``, never
one by one: reading a single task makes Label Studio ask the ML backend for a prediction) and come back
as plain dicts with ``data``, ``annotations`` and ``predictions``, as ``/predict`` receives them.
Predictions are written in bulk (``POST /api/projects/<id>/import/predictions``).

Every failure is a :class:`LabelStudioAPIError` naming the call, the status and what to do, never the
token. ``outcome_unknown`` says that Label Studio may have done what a failed POST asked (the request
went out; no answer came back): the caller reads back before sending it again.
"""

from __future__ import annotations

import heapq
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from itertools import pairwise

import requests

from backend.errors import SettingsError

from .auth import LabelStudioAuth
from .http import label_studio_session
from .images import sanitize_url

logger = logging.getLogger(__name__)

TASK_KEYS = ("id", "data", "annotations", "predictions", "project", "meta", "updated_at")
DEFAULT_TIMEOUT_S = (10.0, 60.0)  # connect, read


class LabelStudioAPIError(RuntimeError):
    """A Label Studio API call failed. ``kind``: ``unreachable`` (no connection, a reset or no answer),
    ``auth`` (401/403), ``not_found`` (404), ``refused`` (another 4xx) or ``upstream`` (5xx after the
    retries); ``status`` is the HTTP status when there was one; ``outcome_unknown`` is True when a write
    may have taken effect. The message names the call and the fix, never the token."""

    def __init__(
        self, message: str, *, kind: str, status: int | None = None, outcome_unknown: bool = False
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.outcome_unknown = outcome_unknown


class LabelStudioClient:
    """Label Studio at ``url`` (``LABEL_STUDIO_URL``) as the owner of ``api_key`` (``LABEL_STUDIO_API_KEY``),
    or of a shared ``auth`` (the image loader uses the same one). ``session`` defaults to one with the
    retry policy; ``timeout_s`` is (connect, read) seconds per attempt."""

    def __init__(
        self,
        *,
        url: str,
        api_key: str | None = None,
        auth: LabelStudioAuth | None = None,
        session: requests.Session | None = None,
        timeout_s: tuple[float, float] = DEFAULT_TIMEOUT_S,
    ) -> None:
        if not url or not (api_key or auth):
            raise SettingsError(
                "writing predictions needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (a personal access token "
                "from Label Studio's Account & Settings page)"
            )
        self.url = url.rstrip("/")
        self.auth = auth or LabelStudioAuth(base_url=self.url, api_key=api_key)
        self._session = session or label_studio_session()
        self._timeout = timeout_s

    def __repr__(self) -> str:
        return f"LabelStudioClient(url={sanitize_url(self.url)!r})"

    # ---- one call ----
    def _call(
        self, method: str, path: str, what: str, *, params=None, body=None, allow: tuple[int, ...] = ()
    ):
        """The decoded JSON answer of one call (None for an empty one); LabelStudioAPIError otherwise.
        Statuses in ``allow`` come back as ``(status, None)`` instead of raising."""
        response = None
        for attempt in (1, 2):
            try:
                response = self._session.request(
                    method, self.url + path, params=params, json=body, timeout=self._timeout, allow_redirects=False,
                    headers={"Authorization": self.auth(), "Accept": "application/json"},
                )  # fmt: skip
            except requests.RequestException as error:
                raise LabelStudioAPIError(
                    f"Label Studio {what} failed: no answer from {sanitize_url(self.url)} ({type(error).__name__}); "
                    f"check that Label Studio runs there (LABEL_STUDIO_URL)",
                    kind="unreachable", outcome_unknown=method == "POST" and _maybe_sent(error),
                ) from None  # fmt: skip
            if response.status_code == 401 and attempt == 1:
                self.auth.invalidate()  # an access token Label Studio no longer accepts: fetch a new one, once
                continue
            break
        status = response.status_code
        if status in allow:
            return status, None
        if status >= 400:
            raise _error(what, status, self.url, write=method == "POST", detail=_detail(response))
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise LabelStudioAPIError(
                f"Label Studio {what} answered HTTP {status} with a body that is not JSON; is LABEL_STUDIO_URL "
                f"Label Studio's address (not a proxy's login page)?",
                kind="upstream", status=status,
            ) from None  # fmt: skip

    # ---- tasks ----
    def tasks(
        self,
        project: int,
        *,
        ids: Iterable[int] | None = None,
        view: int | None = None,
        page_size: int = 100,
        skip_missing: bool = False,
        on_missing: Callable[[list[int]], None] | None = None,
        annotated: bool = False,
        unannotated: bool = False,
        after: int | None = None,
        updated_after: datetime | None = None,
    ) -> Iterator[dict]:
        """The project's tasks, in id order, each a dict of :data:`TASK_KEYS`: all of them, or those of a
        Data Manager ``view`` (in its order), or exactly ``ids`` (in that order; ``skip_missing``: ids
        deleted meanwhile are left out instead of raising ``not_found``, and given to ``on_missing``; a
        view's ids deleted between its listing and their read are too), or those Label Studio selects
        for us (its Data Manager filters, so only they are read): ``annotated`` (an annotation, submitted
        or skipped), ``unannotated`` (none: the tasks still to label), ``after`` (an id greater than it),
        ``updated_after`` (changed after that time: Label Studio touches a task when an annotation or
        prediction of it is saved or deleted); the filters given all apply.

        Nothing is read by page number while the caller works: a task that leaves the selection
        meanwhile (annotated while the unannotated ones are listed, given a prediction while a view of
        the tasks without one is pre-labelled) would shift the next page past a task that stays.
        Listings without a view ask for the tasks above the last id read; a view's task ids are listed
        first (without annotations and predictions: a light read), then its tasks read by id, in the
        view's order."""
        if ids is None and view is not None:
            if annotated or unannotated or after is not None or updated_after is not None:
                raise ValueError("tasks(): a view has its own filters; give either view or a filter")
            # ids only: ten times fewer reads (a capped page size is read on)
            ids_per_page = max(page_size, 1000)
            listed = [
                t["id"]
                for t in self._pages(project, view=view, query=None, page_size=ids_per_page, light=True)
            ]
            yield from self.tasks(
                project, ids=listed, page_size=page_size, skip_missing=True, on_missing=on_missing
            )
            return
        if ids is None:
            selections = _selections(
                annotated=annotated, unannotated=unannotated, updated_after=updated_after
            )
            streams = [self._by_id(project, items, after=after, page_size=page_size) for items in selections]
            last = None
            for task in heapq.merge(*streams, key=lambda t: t["id"]):  # "annotated" is two selections
                if task["id"] != last:
                    last = task["id"]
                    yield task
            return
        wanted = [int(i) for i in ids]
        for start in range(0, len(wanted), page_size):
            chunk = wanted[start : start + page_size]
            query = json.dumps({"selectedItems": {"all": False, "included": chunk}})
            found = {t["id"]: t for t in self._pages(project, view=None, query=query, page_size=page_size)}
            missing = [i for i in chunk if i not in found]
            if missing and not skip_missing:
                raise LabelStudioAPIError(
                    f"Label Studio project {project} has no tasks {missing[:10]}"
                    + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""),
                    kind="not_found", status=404,
                )  # fmt: skip
            if missing:
                logger.info("tasks %s are gone from Label Studio project %s; skipped", missing, project)
                if on_missing is not None:
                    on_missing(missing)
            for task_id in chunk:
                if task_id in found:
                    yield found[task_id]

    def count_tasks(self, project: int, *, unannotated: bool = False, view: int | None = None) -> int | None:
        """How many tasks the project has (``unannotated``: without an annotation; ``view``: in that Data
        Manager view; one small page read), or None when Label Studio does not say."""
        params = {"project": int(project), "page": 1, "page_size": 1}
        if view is not None:
            if unannotated:
                raise ValueError("count_tasks(): a view has its own filters; give either view or unannotated")
            params["view"] = int(view)
        if unannotated:
            (items,) = _selections(annotated=False, unannotated=True, updated_after=None)
            params["query"] = _query(items)
        answer = self._call(
            "GET", "/api/tasks/", f"count the tasks of project {project}", params=params, allow=(404,)
        )  # fmt: skip
        total = answer.get("total") if isinstance(answer, dict) else None
        return total if isinstance(total, int) else None

    def _by_id(self, project: int, items: list[dict], *, after: int | None, page_size: int) -> Iterator[dict]:
        """The tasks Label Studio selects with the filter ``items`` (all apply), in id order, read as
        "the first ``page_size`` above the last id read" until the last page (:func:`_last_page`)."""
        cursor = 0 if after is None else int(after)
        while True:
            query = _query([_item("id", "greater", "Number", cursor), *items])
            answer = self._call("GET", "/api/tasks/", f"list tasks of project {project}",
                                params={"project": int(project), "page": 1, "page_size": page_size,
                                        "fields": "all", "query": query})  # fmt: skip
            tasks = answer.get("tasks", []) if isinstance(answer, dict) else answer
            ids = [task.get("id") for task in tasks]
            if not all(isinstance(i, int) for i in ids) or any(b <= a for a, b in pairwise([cursor, *ids])):
                raise LabelStudioAPIError(
                    f"Label Studio at {sanitize_url(self.url)} listed tasks of project {project} that are not above "
                    f"id {cursor} in id order, though asked for exactly that (a Data Manager filter and ordering "
                    f"on the id); this backend needs a Label Studio whose task list applies them (1.23 does)",
                    kind="upstream",
                )  # fmt: skip
            for task in tasks:
                yield {key: task.get(key) for key in TASK_KEYS}
            if _last_page(answer, tasks, len(tasks), page_size):
                return
            cursor = ids[-1]

    def _pages(
        self,
        project: int,
        *,
        view: int | None,
        query: str | None,
        page_size: int,
        light: bool = False,
    ) -> Iterator[dict]:
        """Page after page (``light``: without annotations and predictions); only for selections that
        cannot change while they are read (chosen ids), or for a listing read at once."""
        seen, page = 0, 1
        while True:
            params = {"project": int(project), "page": page, "page_size": page_size}
            if not light:
                params["fields"] = "all"
            if view is not None:
                params["view"] = int(view)
            if query is not None:
                params["query"] = query
            answer = self._call("GET", "/api/tasks/", f"list tasks of project {project}", params=params,
                                allow=(404,) if page > 1 else ())  # fmt: skip
            if isinstance(answer, tuple):  # 404 past the last page
                return
            tasks = answer.get("tasks", []) if isinstance(answer, dict) else answer
            for task in tasks:
                seen += 1
                yield {key: task.get(key) for key in TASK_KEYS}
            if _last_page(answer, tasks, seen, page_size):
                return
            page += 1

    def view(self, project: int, view: int) -> dict:
        """The Data Manager tab (view) ``view`` of ``project``; a ``not_found`` error naming it when the
        project has no such tab (Label Studio answers a task listing with another project's tab with a 500)."""
        try:
            found = self._call("GET", f"/api/dm/views/{int(view)}/", f"read Data Manager tab {view}")
        except LabelStudioAPIError as error:
            if error.kind != "not_found":
                raise
            found = None
        if not isinstance(found, dict) or found.get("project") != int(project):
            elsewhere = f" (it is a tab of project {found['project']})" if isinstance(found, dict) else ""
            raise LabelStudioAPIError(
                f"Label Studio project {project} has no Data Manager tab {view}{elsewhere}; check --view (the "
                f"number after ?tab= in the project's URL when the tab is open)",
                kind="not_found", status=404,
            )  # fmt: skip
        return found

    # ---- projects and predictions ----
    def label_config(self, project: int) -> str:
        """The project's label config XML."""
        try:
            found = self._call("GET", f"/api/projects/{int(project)}/", f"read project {project}")
        except LabelStudioAPIError as error:
            if error.kind != "not_found":
                raise
            raise LabelStudioAPIError(
                f"Label Studio at {sanitize_url(self.url)} has no project {project} (HTTP 404), or the token's user "
                f"cannot see it; check --project (the number in the project's URL)",
                kind="not_found", status=404,
            ) from None  # fmt: skip
        config = found.get("label_config") if isinstance(found, dict) else None
        if not isinstance(config, str) or not config.strip():
            raise LabelStudioAPIError(
                f"Label Studio project {project} has no label config yet; set one up in its Settings",
                kind="refused",
            )
        return config

    def predictions(self, task_id: int) -> list[dict]:
        """Every prediction of one task (``id``, ``model_version``, ``result``, ``score``)."""
        found = self._call(
            "GET", "/api/predictions/", f"list predictions of task {task_id}", params={"task": int(task_id)}
        )
        return list(found or [])

    def create_predictions(self, project: int, predictions: list[dict]) -> int:
        """Write ``predictions`` (each ``{task, result, score, model_version}``) in one call; returns how
        many Label Studio created. On a failure with ``outcome_unknown`` some may exist: read back."""
        if not predictions:
            return 0
        answer = self._call(
            "POST", f"/api/projects/{int(project)}/import/predictions",
            f"import {len(predictions)} predictions into project {project}", body=predictions,
        )  # fmt: skip
        created = answer.get("created") if isinstance(answer, dict) else None
        return int(created) if isinstance(created, int) else len(predictions)

    def delete_prediction(self, prediction_id: int) -> None:
        """Delete one prediction; one already gone counts as deleted."""
        self._call(
            "DELETE",
            f"/api/predictions/{int(prediction_id)}/",
            f"delete prediction {prediction_id}",
            allow=(404,),
        )

    # ---- webhooks ----
    def webhooks(self, project: str) -> list[dict]:
        """The project's webhooks (``id``, ``project``, ``url``, ``headers``, ``actions``, ...)."""
        found = self._call(
            "GET",
            "/api/webhooks/",
            f"list the webhooks of project {project}",
            params={"project": str(project)},
        )
        return list(found or [])

    def set_webhook_headers(self, webhook_id: int, headers: dict[str, str]) -> None:
        """Replace the extra headers Label Studio sends with webhook ``webhook_id``."""
        self._call(
            "PATCH",
            f"/api/webhooks/{int(webhook_id)}/",
            f"update webhook {webhook_id}",
            body={"headers": headers},
        )


def _maybe_sent(error: requests.RequestException) -> bool:
    """Whether a failed request may have reached Label Studio: anything but a connection that was never
    made (refused, unresolvable, timed out connecting). A reset or a read timeout after sending may not."""
    if isinstance(error, requests.ConnectTimeout):
        return False
    text = str(error).lower()
    markers = (
        "connection refused",
        "name or service not known",
        "failed to establish",
        "nodename nor servname",
    )
    return not any(marker in text for marker in markers)


def _detail(response: requests.Response) -> str:
    """What Label Studio said of a refused call (its ``detail`` or validation message), briefly; "" when
    the answer is not its JSON (a proxy's HTML page)."""
    try:
        body = response.json()
    except ValueError:
        return ""
    if isinstance(body, dict):
        body = body.get("validation_errors") or body.get("detail") or body  # "detail": "Validation error"
    text = " ".join(str(body).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _error(what: str, status: int, url: str, *, write: bool, detail: str = "") -> LabelStudioAPIError:
    where = sanitize_url(url)
    if status == 413:
        return LabelStudioAPIError(
            f"Label Studio {what} failed: HTTP 413, the request is larger than {where} accepts (a proxy in "
            f"front of Label Studio: nginx client_max_body_size, an ingress' proxy-body-size; Label Studio "
            f"itself: DATA_UPLOAD_MAX_MEMORY_SIZE)",
            kind="refused", status=413,
        )  # fmt: skip
    if status in (401, 403):
        return LabelStudioAPIError(
            f"Label Studio {what} failed: HTTP {status}; LABEL_STUDIO_API_KEY is not accepted by {where} (revoked, "
            f"expired, of another instance, or without access to this project): create a personal access "
            f"token in Label Studio's Account & Settings and set LABEL_STUDIO_API_KEY",
            kind="auth", status=status,
        )  # fmt: skip
    if status == 404:
        return LabelStudioAPIError(
            f"Label Studio {what} failed: HTTP 404 (no such object at {where})", kind="not_found", status=404
        )
    if status < 500 and status != 429:
        return LabelStudioAPIError(
            f"Label Studio {what} failed: HTTP {status}" + (f": {detail}" if detail else ""),
            kind="refused", status=status,
        )  # fmt: skip
    return LabelStudioAPIError(
        f"Label Studio {what} failed: HTTP {status} after retrying for about a minute; Label Studio at {where} is "
        f"overloaded or failing (its log says why)",
        kind="upstream", status=status, outcome_unknown=write,
    )  # fmt: skip


LS_DATETIME = "%Y-%m-%dT%H:%M:%S.%fZ"  # the only form Label Studio's Data Manager filters parse (UTC)
ANNOTATION_COUNTERS = ("total_annotations", "cancelled_annotations")  # a task's submitted, skipped


def _item(column: str, operator: str, kind: str, value) -> dict:
    return {"filter": f"filter:tasks:{column}", "operator": operator, "type": kind, "value": value}


def _last_page(answer, tasks: list, seen: int, page_size: int) -> bool:
    """Whether a listing read its last page: by the ``total`` Label Studio counted for it when it says
    (a deployment may cap pages below ``page_size``: ``TASK_API_PAGE_SIZE_MAX``), else by a short page."""
    total = answer.get("total") if isinstance(answer, dict) else None
    if not tasks:
        return True
    return seen >= total if isinstance(total, int) else len(tasks) < page_size


def _selections(*, annotated: bool, unannotated: bool, updated_after: datetime | None) -> list[list[dict]]:
    """The Data Manager filters of a task listing (see :meth:`LabelStudioClient.tasks`), as selections
    whose union is wanted, the filters of each all applying. Label Studio's filters have one conjunction,
    so ``annotated`` (submitted or skipped: either of two counters) is two selections."""
    if annotated and unannotated:
        raise ValueError("tasks(): a task is either annotated or unannotated, not both")
    items = []
    if updated_after is not None:
        when = updated_after.astimezone(timezone.utc).strftime(LS_DATETIME)
        items.append(_item("updated_at", "greater", "Datetime", when))
    if unannotated:  # Label Studio counts submitted and skipped annotations apart: neither
        items += [_item(counter, "equal", "Number", 0) for counter in ANNOTATION_COUNTERS]
    if annotated:
        return [[*items, _item(counter, "greater", "Number", 0)] for counter in ANNOTATION_COUNTERS]
    return [items]


def _query(items: list[dict]) -> str:
    """A task listing's ``query``: every filter in ``items`` applies, in id order."""
    return json.dumps({"filters": {"conjunction": "and", "items": items}, "ordering": ["tasks:id"],
                       "selectedItems": {"all": True, "excluded": []}})  # fmt: skip
