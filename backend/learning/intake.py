"""Webhook intake: Label Studio's annotation events become accepted regions in the training store.

``handle_webhook`` persists before it returns (the route answers 2xx only after the commit) and does no
training itself: it queues a training job every ``train_every`` new region labels and on START_TRAINING.

Events (Label Studio 1.23, see DESIGN.md 3b):

- ``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED``: ``{"action", "annotation": {id, result, task,
  was_cancelled, ground_truth, completed_by, created_at, updated_at, ...}, "task": {id, data, ...},
  "project": {id, label_config, ...}}``. All regions of the annotation are replaced by the new version.
- ``ANNOTATIONS_DELETED`` (``"annotations": [{"id"}]``) and ``ANNOTATION_DELETED`` (``"annotation"``):
  regions removed, a tombstone left so a late older event cannot bring them back. ``TASKS_DELETED``
  (``"tasks": [{"id"}]``) does the same for every annotation of the tasks.
- ``START_TRAINING``: a training job is queued.
- ``TASKS_CREATED``: with ``OSPREY_AUTO_PRELABEL``, a pre-label job for the tasks (the ``handlers``
  the runtime gives :class:`Intake`); otherwise ignored.
- Anything else (``PROJECT_UPDATED``, ...) is acknowledged and ignored.

Versions of one annotation are ordered by ``updated_at`` then a content hash (``compare_versions``): a
repeated delivery changes nothing and an older one never overwrites a newer. Cancelled (skipped)
annotations store no regions. An annotation whose project's label config is unknown is kept raw
(``unparsed``) and parsed later by ``reparse_unparsed`` (call it when ``/setup`` brings the config).

Regions are the results of the config's output tool (``schema.output_tool``); each is stored as a mask
in brush RLE (a brush region's own RLE once it decodes to the stated size; polygons and rectangles are
rasterised and encoded), with its field values read from the per-region Choices/TextArea results that
carry its ``id``. Each region is matched to the backend's recorded prediction and every field is judged
kept, edited, added or removed by :func:`backend.acceptance.comparison.compare_annotation`, the same function
the export report (``osprey-label eval acceptance``) calls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable

from backend.acceptance.comparison import compare_annotation
from backend.errors import InputError, WebhookError, internal_error
from backend.jobs import JobQueue
from backend.labelstudio.ids import MAX_ID, label_studio_id, project_key
from backend.labelstudio.limits import DEFAULT_LIMITS, PayloadLimits
from backend.labelstudio.results import annotation_timestamp
from backend.labelstudio.schema import ProjectSchema, parse_label_config

from .inbox import InboxItem, WebhookInbox
from .store import AnnotationRecord, RegionRecord, TrainingStore, compare_versions

logger = logging.getLogger(__name__)

__all__ = ["WebhookError", "handle_webhook", "reparse_unparsed"]

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
DELETE_EVENTS = ("ANNOTATIONS_DELETED", "ANNOTATION_DELETED")
TRAIN_KIND = "train"
HANDLED_EVENTS = (*ANNOTATION_EVENTS, *DELETE_EVENTS, "TASKS_DELETED", "START_TRAINING")


def handle_webhook(
    store: TrainingStore,
    payload: dict,
    *,
    label_config_for: Callable[[str], str | None],
    queue: JobQueue,
    train_every: int | None = None,
    schema_for: Callable[[str], ProjectSchema] = parse_label_config,
    limits: PayloadLimits = DEFAULT_LIMITS,
) -> dict:
    """Persist one Label Studio webhook event; returns ``{"status", "action", ...}``.

    ``status`` is ``stored``, ``duplicate``, ``stale``, ``tombstoned``, ``cancelled``, ``unparsed``,
    ``deleted``, ``queued`` or ``ignored``; annotation events add ``annotation_id``, ``regions`` (stored)
    and ``skipped`` (unusable regions, with reasons). ``train`` is True when a training job was queued
    (START_TRAINING, or the project's new region labels crossed a multiple of ``train_every``) and
    ``job_id`` names it. Jobs go to ``queue`` (either back end of :mod:`backend.jobs`).
    The label config comes from ``payload["project"]["label_config"]``, else ``label_config_for(project_id)``,
    and is read by ``schema_for`` (the process's schema cache; parsed afresh by default).
    Regions past ``limits`` (claimed image size, polygon vertices, regions per annotation) are not
    decoded: they are listed under ``skipped`` with the reason. Raises WebhookError (a ValueError) for a
    malformed payload, naming the field.
    """
    started = time.perf_counter()
    if not isinstance(payload, dict):
        raise WebhookError(f"the webhook body must be a JSON object, got {type(payload).__name__}")
    action = payload.get("action")
    if not isinstance(action, str) or not action:
        raise WebhookError("the webhook body has no 'action' string (e.g. 'ANNOTATION_CREATED')")
    if action in ANNOTATION_EVENTS:
        out = _annotation_event(store, payload, label_config_for, schema_for, train_every, queue, limits)
    elif action in DELETE_EVENTS:
        out = _delete_event(store, payload)
    elif action == "TASKS_DELETED":
        ids = _ids(payload, "tasks")
        out = {"status": "deleted", "regions_removed": store.delete_tasks(_project_id(payload), ids)}
    elif action == "START_TRAINING":
        project = _project_id(payload)
        marker = store.change_counter(project)
        job_id = queue.enqueue(project, TRAIN_KIND, {"reason": "START_TRAINING", "changes": marker})
        out = {"status": "queued", "train": True, "job_id": job_id}
    else:
        return {"status": "ignored", "action": action}
    out = {"action": action, "train": False, **out}
    elapsed_ms = (time.perf_counter() - started) * 1000
    logger.info(
        "webhook %s: %s (%s regions) in %.1f ms", action, out["status"], out.get("regions", "-"), elapsed_ms
    )
    return {**out, "ms": round(elapsed_ms, 1)}


def check_envelope(payload) -> tuple[str, str | None]:
    """``(action, project)`` of a webhook body whose ids and times can be read; WebhookError naming the
    field otherwise. Cheap (no region is decoded): what ``/webhook`` checks before storing the body."""
    if not isinstance(payload, dict):
        raise WebhookError(f"the webhook body must be a JSON object, got {type(payload).__name__}")
    action = payload.get("action")
    if not isinstance(action, str) or not action:
        raise WebhookError("the webhook body has no 'action' string (e.g. 'ANNOTATION_CREATED')")
    if action not in HANDLED_EVENTS:
        return action, None
    project = _project_id(payload)
    if action in ANNOTATION_EVENTS:
        annotation = payload.get("annotation")
        if not isinstance(annotation, dict):
            raise WebhookError(f"{action} needs an 'annotation' object, got {type(annotation).__name__}")
        _int(annotation.get("id"), "'annotation.id'")
        task = payload.get("task") if isinstance(payload.get("task"), dict) else {}
        task_ref = task.get("id", annotation.get("task"))
        _int(task_ref.get("id") if isinstance(task_ref, dict) else task_ref, "'task.id'")
        result = annotation.get("result")
        if not isinstance(result, list) or not all(isinstance(item, dict) for item in result):
            raise WebhookError("'annotation.result' must be a list of Label Studio result objects")
        annotation_timestamp(annotation)
    elif action in DELETE_EVENTS and isinstance(payload.get("annotations"), list):
        _ids(payload, "annotations")
    elif action == "TASKS_DELETED":
        _ids(payload, "tasks")
    return action, project


def reparse_unparsed(
    store: TrainingStore,
    project_id: str,
    label_config: str,
    *,
    queue: JobQueue,
    train_every: int | None = None,
    schema_for: Callable[[str], ProjectSchema] = parse_label_config,
    limits: PayloadLimits = DEFAULT_LIMITS,
) -> int:
    """Parse the annotations kept raw while the project's config was unknown; returns how many."""
    done = 0
    for raw in store.unparsed_annotations(project_id):
        raw = {**raw, "project": {"id": project_key(project_id), "label_config": label_config}}
        out = handle_webhook(
            store, raw, label_config_for=lambda _: label_config, train_every=train_every, queue=queue,
            schema_for=schema_for, limits=limits,
        )  # fmt: skip
        done += out["status"] in ("stored", "cancelled")
    return done


# ---- payload reading -----------------------------------------------------------------------------


def _int(value, where: str) -> int:
    return label_studio_id(value, where, error=WebhookError)


def _project_id(payload: dict) -> str:
    project = payload.get("project")
    if isinstance(project, dict):
        project = project.get("id")
    if project is None or isinstance(project, (bool, list, dict)):
        raise WebhookError("the webhook body has no 'project' with an 'id'; Label Studio sends one per event")
    if not isinstance(project, str):
        _int(project, "'project.id'")
    return project_key(project)


def _handled_project(payload: dict) -> str | None:
    """The project a body names (``project.id``), or None."""
    project = payload.get("project")
    try:
        return (
            project_key(project["id"])
            if isinstance(project, dict) and project.get("id") is not None
            else None
        )
    except ValueError:
        return None


def _ids(payload: dict, key: str) -> list[int]:
    items = payload.get(key)
    if not isinstance(items, list):
        raise WebhookError(f"'{key}' must be a list of {{'id': ...}} objects, got {type(items).__name__}")
    return [_int(i.get("id") if isinstance(i, dict) else i, f"'{key}[{n}].id'") for n, i in enumerate(items)]


def _hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def _delete_event(store: TrainingStore, payload: dict) -> dict:
    if isinstance(payload.get("annotations"), list):
        ids = _ids(payload, "annotations")
    elif isinstance(payload.get("annotation"), dict):
        ids = [_int(payload["annotation"].get("id"), "'annotation.id'")]
    else:
        raise WebhookError("a delete event needs 'annotations': [{'id': ...}] (or 'annotation': {'id': ...})")
    project = payload.get("project")
    project_id = _project_id(payload) if project is not None else None
    return {
        "status": "deleted",
        "annotations": ids,
        "regions_removed": store.delete_annotations(project_id, ids),
    }


def _annotation_event(store, payload, label_config_for, schema_for, train_every, queue, limits) -> dict:
    annotation = payload.get("annotation")
    if not isinstance(annotation, dict):
        raise WebhookError(
            f"{payload['action']} needs an 'annotation' object, got {type(annotation).__name__}"
        )
    project = _project_id(payload)
    annotation_id = _int(annotation.get("id"), "'annotation.id'")
    task = payload.get("task") if isinstance(payload.get("task"), dict) else {}
    task_ref = task.get("id", annotation.get("task"))
    task_id = _int(task_ref.get("id") if isinstance(task_ref, dict) else task_ref, "'task.id'")
    result = annotation.get("result")
    if not isinstance(result, list) or not all(isinstance(item, dict) for item in result):
        raise WebhookError("'annotation.result' must be a list of Label Studio result objects")
    data = task.get("data") if isinstance(task.get("data"), dict) else {}
    cancelled = bool(annotation.get("was_cancelled"))
    ts, content = annotation_timestamp(annotation), _hash([result, cancelled, data])
    base = {"annotation_id": annotation_id, "regions": 0}
    seen = store.annotation_state(project, annotation_id, task_id)
    if seen is not None and seen[0] == "deleted":
        return {**base, "status": "tombstoned"}
    if seen is not None:
        order = compare_versions(ts, content, seen[1], seen[2])
        if order < 0 or (order == 0 and seen[0] != "unparsed"):
            return {**base, "status": "duplicate" if order == 0 else "stale"}
    record = AnnotationRecord(
        project_id=project, annotation_id=annotation_id, task_id=task_id, state="accepted", updated_ts=ts,
        content_hash=content, completed_by=_optional_int(annotation.get("completed_by")),
        ground_truth=bool(annotation.get("ground_truth")),
    )  # fmt: skip
    skipped: list[str] = []
    project_doc = payload.get("project") if isinstance(payload.get("project"), dict) else {}
    config = project_doc.get("label_config") or label_config_for(project)
    if cancelled:
        record.state = "cancelled"
    elif not config:
        record.state = "unparsed"
        record.raw = {
            "action": payload["action"],
            "annotation": annotation,
            "task": {"id": task_id, "data": data},
        }
        logger.warning(
            "project %s: no label config known yet; annotation %s kept raw", project, annotation_id
        )
    else:
        try:
            schema = schema_for(config)
        except InputError as error:  # SchemaError, or the schema cache's UnprocessableError
            raise WebhookError(f"project {project}'s label config cannot be read: {error}") from None
        _fill(record, store, schema, result, data, skipped, limits)
    written = store.write_annotation(record)
    status = (
        {"accepted": "stored"}.get(record.state, record.state)
        if written.status == "stored"
        else written.status
    )
    out = {**base, "status": status, "regions": written.regions, "new_labels": written.new_labels}
    if skipped:
        out["skipped"] = skipped
    if train_every and written.changes_before // train_every < written.changes_after // train_every:
        payload_out = {"reason": "new_labels", "changes": written.changes_after}
        out.update(train=True, job_id=queue.enqueue(project, TRAIN_KIND, payload_out))
    return out


def _optional_int(value) -> int | None:
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ID else None


# ---- regions -------------------------------------------------------------------------------------


def _fill(
    record: AnnotationRecord,
    store,
    schema: ProjectSchema,
    result,
    data: dict,
    skipped: list[str],
    limits: PayloadLimits,
) -> None:
    """Read the regions and fields of ``result`` into ``record``, matched against recorded predictions."""
    reference = data.get(schema.image_data_key)
    record.image_ref = reference if isinstance(reference, str) else None
    predicted = (
        store.predicted_regions(record.project_id, record.task_id) if record.task_id is not None else []
    )
    comparison = compare_annotation(schema, result, predicted, limits=limits)
    for message in comparison.skipped:
        logger.warning("annotation %s: skipped %s", record.annotation_id, message)
    skipped.extend(comparison.skipped)
    record.task_fields = comparison.task_fields
    for region, match in zip(comparison.regions, comparison.matches, strict=True):
        record.regions.append(
            RegionRecord(
                region_id=region.region_id, tool_type=str(region.item.get("type", "")).lower(),
                labels=region.labels, rle=region.rle, width=region.mask.shape[1], height=region.mask.shape[0],
                area=int(region.mask.sum()), fields=region.fields,
                content_hash=_hash([region.rle, region.fields, region.labels]),
                model_version=match.model_version, predicted_region_id=match.predicted_region_id,
                match=match.match, iou=match.iou,
            )
        )  # fmt: skip
    record.outcomes += comparison.outcomes


class Intake:
    """What ``/webhook`` and ``/setup`` hand to the retraining loop.

    ``receive`` (in the request) checks the envelope and appends the body to the ``inbox``: a webhook is
    acknowledged once it is durable, however many arrive at once. The intake thread (``start``/``stop``,
    owned by the runtime) parses what is in the inbox, in arrival order, with :func:`handle_webhook`;
    ``drain`` waits for it (or, without the thread, parses inline).

    Collaborators: ``store``, ``queue`` and ``inbox``; ``projects`` (``label_config``, ``remember``,
    ``schema_for``); ``flush()`` waits until recorded predictions are in the store (an annotation is
    compared with the prediction it started from); ``count(key, n)`` counts outcomes for ``/metrics``;
    ``submit(fn, *args)`` runs housekeeping in the runtime's background thread; ``wake()`` makes the
    training worker look for a job now; ``lora_enabled`` queues a LoRA job with every training job;
    ``handlers`` maps other actions to a function of the body giving the outcome (``TASKS_CREATED`` with
    :mod:`backend.prelabel.auto`): those are stored and parsed like the rest."""

    def __init__(
        self,
        *,
        store: TrainingStore,
        queue: JobQueue,
        inbox: WebhookInbox,
        projects,
        flush: Callable[[], None],
        count: Callable[[str, int], None],
        submit: Callable,
        wake: Callable[[], None] = lambda: None,
        train_every: int | None = None,
        lora_enabled: bool = False,
        limits: PayloadLimits = DEFAULT_LIMITS,
        thread_name: str = "osprey-intake",
        poll_s: float = 1.0,
        handlers: dict[str, Callable[[dict], dict]] | None = None,
    ) -> None:
        self.handlers = dict(handlers or {})
        self.store, self.queue, self.inbox, self.projects = store, queue, inbox, projects
        self.flush, self.count, self.submit, self.wake = flush, count, submit, wake
        self.train_every = train_every or None
        self.lora_enabled = lora_enabled
        self.limits = limits
        self.thread_name = thread_name
        self.poll_s = poll_s
        self._arrived = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one parser at a time: events of one annotation stay in order

    # ---- in the request ----
    def receive(self, action: str, payload: dict) -> dict:
        """Check the envelope (WebhookError, a 400, for bad ids or times), store the body, answer."""
        action, project = check_envelope(payload)
        if action in self.handlers:  # e.g. TASKS_CREATED with automatic pre-labelling
            project = _handled_project(payload)
        elif action not in HANDLED_EVENTS:
            return {"status": "ignored", "action": action}
        inbox_id = self.inbox.append(action, project, payload)
        self.count(f"webhook {action} received", 1)
        self._arrived.set()
        return {"status": "received", "action": action, "inbox_id": inbox_id}

    def arrived(self) -> None:
        """Something was put in the inbox by another hand (the reconciliation): parse it now."""
        self._arrived.set()

    def configured(self, project: str, label_config: str) -> None:
        """``/setup`` brought ``project``'s label config: annotations stored before it was known are
        parsed in the background (``/setup`` has 3 s)."""
        if self.store.count_unparsed(project):
            self.submit(self._reparse, project, label_config)

    # ---- the intake thread ----
    def start(self) -> None:
        """Parse what the inbox holds, and whatever arrives, in a thread of its own."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop after the event being parsed; True when the thread has stopped."""
        self._stop.set()
        self._arrived.set()
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def drain(self, timeout_s: float = 30.0) -> bool:
        """Wait until every stored event is parsed (inline when the thread is not running); True when
        none is left."""
        if self._thread is None or not self._thread.is_alive():
            while self.process_pending():
                pass
            return not self.inbox.pending(limit=1)
        deadline = time.monotonic() + timeout_s
        self._arrived.set()
        with self._idle:
            while self.inbox.pending(limit=1):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(min(remaining, 0.05))
        return True

    def outcome(self, inbox_id: int) -> dict | None:
        """What parsing one stored event gave: its outcome, ``{"status": "failed", "error"}``, or None
        while it waits."""
        return self.inbox.result(inbox_id)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                parsed = self.process_pending()
            except Exception:  # the inbox's database unreachable: try again at the next poll
                internal_error(logger, "reading the webhook inbox")
                parsed = 0
            if not parsed:
                with self._idle:
                    self._idle.notify_all()
                self._arrived.wait(self.poll_s)
                self._arrived.clear()

    def process_pending(self, limit: int = 50) -> int:
        """Parse up to ``limit`` stored events, oldest first; how many."""
        with self._lock:
            items = self.inbox.pending(limit=limit)
            if items:
                self.flush()
            for item in items:
                if self._stop.is_set() and self._thread is not None:
                    return 0
                self._parse(item)
            return len(items)

    def _parse(self, item: InboxItem) -> None:
        payload = item.payload
        try:
            project = payload.get("project")
            if (
                isinstance(project, dict)
                and isinstance(project.get("label_config"), str)
                and project.get("id") is not None
            ):
                self.projects.remember(project_key(project["id"]), project["label_config"])
            if item.action in self.handlers:
                outcome = {"action": item.action, **self.handlers[item.action](payload)}
            else:
                outcome = handle_webhook(
                    self.store, payload, label_config_for=self.projects.label_config, train_every=self.train_every,
                    queue=self.queue, schema_for=self.projects.schema_for, limits=self.limits,
                )  # fmt: skip
            if outcome.get("train"):
                if self.lora_enabled:
                    outcome["lora_job_id"] = self.queue.enqueue(
                        _project_id(payload), "lora", {"reason": item.action}
                    )
                self.wake()
        except WebhookError as error:  # stored, then found unreadable: nothing to learn from it
            logger.warning("webhook %s (inbox %d) cannot be used: %s", item.action, item.inbox_id, error)
            self.inbox.finish(item.inbox_id, error=str(error))
            self.count(f"webhook {item.action} failed", 1)
            return
        except Exception:
            error_id = internal_error(logger, f"parsing webhook {item.action} (inbox {item.inbox_id})")
            self.inbox.finish(item.inbox_id, error=f"internal error {error_id}")
            self.count(f"webhook {item.action} failed", 1)
            return
        self.inbox.finish(item.inbox_id, outcome=outcome)
        self.count(f"webhook {item.action} {outcome.get('status')}", 1)

    def _reparse(self, project: str, label_config: str) -> None:
        try:
            done = reparse_unparsed(
                self.store, project, label_config, queue=self.queue, train_every=self.train_every,
                schema_for=self.projects.schema_for, limits=self.limits,
            )  # fmt: skip
            logger.info("project %s: parsed %d annotations stored before its label config", project, done)
        except Exception:
            internal_error(logger, f"parsing project {project}'s stored annotations")
