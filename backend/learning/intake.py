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
- Anything else (``TASKS_CREATED``, ``PROJECT_UPDATED``, ...) is acknowledged and ignored.

Versions of one annotation are ordered by ``updated_at`` then a content hash (``compare_versions``): a
repeated delivery changes nothing and an older one never overwrites a newer. Cancelled (skipped)
annotations store no regions. An annotation whose project's label config is unknown is kept raw
(``unparsed``) and parsed later by ``reparse_unparsed`` (call it when ``/setup`` brings the config).

Regions are the results of the config's output tool (``schema.output_tool``); each is stored as a mask
in brush RLE (a brush region's own RLE once it decodes to the stated size; polygons and rectangles are
rasterised and encoded), with its field values read from the per-region Choices/TextArea results that
carry its ``id``. Each region is matched to the backend's recorded prediction (``match_prediction``)
and every field is judged kept, edited, added or removed (``outcomes``). ``compare_annotation`` does that
comparison as a pure function of the schema, the annotation's result and the task's predictions; the
export report (``backend.reports.acceptance``, ``osprey-label eval acceptance``) calls the same function.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache

import numpy as np

from backend.errors import RequestError
from backend.labelstudio.results import BadRegionError, encode_brush_rle, mask_from_result
from backend.labelstudio.schema import FieldSpec, ProjectSchema, SchemaError, parse_label_config

from .store import (
    AnnotationRecord,
    FieldOutcome,
    PredictedRegion,
    RegionRecord,
    TrainingStore,
    compare_versions,
    project_key,
)

logger = logging.getLogger(__name__)

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
DELETE_EVENTS = ("ANNOTATIONS_DELETED", "ANNOTATION_DELETED")
TRAIN_KIND = "train"
MATCH_IOU = 0.5  # an accepted region without a predicted id matches the best prediction at IoU >= this
KEPT_MASK_IOU = 0.99  # a matched mask this close to the predicted one counts as kept


class WebhookError(RequestError):
    """A webhook payload that is not what Label Studio sends; the message names the bad key."""


@dataclass
class _Region:
    """An accepted region while it is being read: its result item, mask, labels and fields."""

    region_id: str
    item: dict
    mask: np.ndarray
    rle: list[int]
    labels: list[str]
    fields: dict


def handle_webhook(
    store: TrainingStore,
    payload: dict,
    *,
    label_config_for: Callable[[str], str | None],
    train_every: int | None = None,
    queue=None,
    field_map: dict[str, str] | None = None,
) -> dict:
    """Persist one Label Studio webhook event; returns ``{"status", "action", ...}``.

    ``status`` is ``stored``, ``duplicate``, ``stale``, ``tombstoned``, ``cancelled``, ``unparsed``,
    ``deleted``, ``queued`` or ``ignored``; annotation events add ``annotation_id``, ``regions`` (stored)
    and ``skipped`` (unusable regions, with reasons). ``train`` is True when a training job was queued
    (START_TRAINING, or the project's new region labels crossed a multiple of ``train_every``) and
    ``job_id`` names it. Jobs go to ``queue`` (a ``backend.learning.queue.redis_queue`` queue), else to the store's own queue.
    The label config comes from ``payload["project"]["label_config"]``, else ``label_config_for(project_id)``.
    Raises WebhookError (a ValueError) for a malformed payload.
    """
    started = time.perf_counter()
    if not isinstance(payload, dict):
        raise WebhookError(f"the webhook body must be a JSON object, got {type(payload).__name__}")
    action = payload.get("action")
    if not isinstance(action, str) or not action:
        raise WebhookError("the webhook body has no 'action' string (e.g. 'ANNOTATION_CREATED')")
    queue = queue if queue is not None else store
    if action in ANNOTATION_EVENTS:
        out = _annotation_event(store, payload, label_config_for, field_map, train_every, queue)
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


def reparse_unparsed(
    store: TrainingStore,
    project_id: str,
    label_config: str,
    *,
    train_every: int | None = None,
    queue=None,
    field_map: dict[str, str] | None = None,
) -> int:
    """Parse the annotations kept raw while the project's config was unknown; returns how many."""
    done = 0
    for raw in store.unparsed_annotations(project_id):
        raw = {**raw, "project": {"id": project_key(project_id), "label_config": label_config}}
        out = handle_webhook(
            store, raw, label_config_for=lambda _: label_config, train_every=train_every, queue=queue,
            field_map=field_map,
        )  # fmt: skip
        done += out["status"] in ("stored", "cancelled")
    return done


# ---- payload reading -----------------------------------------------------------------------------


def _int(value, where: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise WebhookError(f"{where} must be an integer id, got {type(value).__name__} {value!r}")
    return value


def _project_id(payload: dict) -> str:
    project = payload.get("project")
    if isinstance(project, dict):
        project = project.get("id")
    if project is None or isinstance(project, (bool, list, dict)):
        raise WebhookError("the webhook body has no 'project' with an 'id'; Label Studio sends one per event")
    return project_key(project)


def _ids(payload: dict, key: str) -> list[int]:
    items = payload.get(key)
    if not isinstance(items, list):
        raise WebhookError(f"'{key}' must be a list of {{'id': ...}} objects, got {type(items).__name__}")
    return [_int(i.get("id") if isinstance(i, dict) else i, f"'{key}[{n}].id'") for n, i in enumerate(items)]


def annotation_timestamp(annotation: dict) -> float:
    """Label Studio's ``updated_at`` (else ``created_at``) as POSIX seconds; ISO 8601, naive means UTC.

    Raises WebhookError (a ValueError) when neither is a readable time.
    """
    value = annotation.get("updated_at") or annotation.get("created_at")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str):
        raise WebhookError(
            "'annotation.updated_at' is missing; expected an ISO 8601 time such as '2025-05-01T12:00:00Z'"
        )
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise WebhookError(f"'annotation.updated_at' is not an ISO 8601 time: {value[:40]!r}") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def _hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


@lru_cache(maxsize=32)
def _schema(label_config: str, field_map: tuple[tuple[str, str], ...]) -> ProjectSchema:
    return parse_label_config(label_config, field_map=dict(field_map))


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


def _annotation_event(store, payload, label_config_for, field_map, train_every, queue) -> dict:
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
            schema = _schema(config, tuple(sorted((field_map or {}).items())))
        except SchemaError as error:
            raise WebhookError(f"project {project}'s label config cannot be read: {error}") from None
        _fill(record, store, schema, result, data, skipped)
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
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# ---- regions and fields --------------------------------------------------------------------------


@dataclass(frozen=True)
class RegionMatch:
    """How one accepted region relates to the prediction: the predicted region it came from (None when
    the annotator added it), that prediction's model version, ``match`` (``"id"``, ``"iou"`` or None)
    and the mask IoU between the two (None without a match or when the masks cannot be compared)."""

    region_id: str
    predicted_region_id: str | None = None
    model_version: str | None = None
    match: str | None = None
    iou: float | None = None


@dataclass
class Comparison:
    """One annotation compared with the task's predictions (``compare_annotation``).

    ``regions`` are the readable accepted regions, ``matches`` one ``RegionMatch`` per region in the
    same order; ``removed`` the predicted regions nothing matched; ``model_version`` the source
    prediction's version (None without predictions); ``outcomes`` per region and field (kept, edited,
    added, removed); ``skipped`` says why each unreadable region was left out.
    """

    regions: list[_Region]
    matches: list[RegionMatch]
    removed: list[PredictedRegion]
    model_version: str | None
    task_fields: dict
    outcomes: list[FieldOutcome]
    skipped: list[str]


def compare_annotation(
    schema: ProjectSchema, result: list[dict], predicted: list[PredictedRegion]
) -> Comparison:
    """Compare an annotation's ``result`` items with the predictions recorded for its task (pure).

    ``predicted`` are the task's predicted regions and whole-task rows of every model version, newest
    first (``TrainingStore.predicted_regions``, or ``store.prediction_regions`` of each prediction of an
    export). Regions are the results of the schema's output tool; each is matched by
    ``match_prediction`` and every field judged by ``outcomes``. The live webhook intake and
    ``osprey-label eval acceptance`` both call this, so they count the same way.
    """
    linked: dict[str, list[dict]] = {}
    for item in result:
        linked.setdefault(str(item.get("id")), []).append(item)
    regions, skipped = [], []
    for item in result:
        if item.get("from_name") != schema.output_tool.from_name or item.get("id") is None:
            continue
        try:
            regions.append(_read_region(schema, item, linked.get(str(item["id"]), [])))
        except BadRegionError as error:
            skipped.append(f"region {item.get('id')}: {error}")
    accepted_task = task_fields(schema, result)
    found, version, removed = match_prediction(regions, predicted)
    matches, out = [], []
    for region in regions:
        pred, how, iou = found.get(region.region_id) or (None, None, None)
        matches.append(
            RegionMatch(
                region.region_id, pred.region_id if pred else None, pred.model_version if pred else None,
                how, iou,
            )
        )  # fmt: skip
        pred_fields = region_fields(schema, pred.items[0], pred.items[1:]) if pred else None
        out += outcomes(region.region_id, region.fields, pred_fields, iou, pred)
    for pred in removed:
        out += outcomes(
            pred.region_id, None, region_fields(schema, pred.items[0], pred.items[1:]), None, pred
        )
    task_pred = next((p for p in predicted if p.kind == "task" and p.model_version == version), None)
    if task_pred is not None or accepted_task:
        predicted_task = task_fields(schema, task_pred.items) if task_pred else None
        out += outcomes("", accepted_task, predicted_task, None, task_pred, region_level=False)
    return Comparison(regions, matches, removed, version, accepted_task, out, skipped)


def _fill(
    record: AnnotationRecord, store, schema: ProjectSchema, result, data: dict, skipped: list[str]
) -> None:
    """Read the regions and fields of ``result`` into ``record``, matched against recorded predictions."""
    reference = data.get(schema.image_data_key)
    record.image_ref = reference if isinstance(reference, str) else None
    predicted = (
        store.predicted_regions(record.project_id, record.task_id) if record.task_id is not None else []
    )
    comparison = compare_annotation(schema, result, predicted)
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


def _read_region(schema: ProjectSchema, item: dict, linked: list[dict]) -> _Region:
    width, height = item.get("original_width"), item.get("original_height")
    if not isinstance(width, int) or not isinstance(height, int):
        raise BadRegionError("the region has no integer original_width/original_height")
    mask = mask_from_result(item, width, height)
    if not mask.any():
        raise BadRegionError("the region's mask is empty")
    value = item["value"]
    rle = value.get("rle") if str(item.get("type", "")).lower().startswith("brush") else None
    rle = [int(b) for b in rle] if rle is not None else encode_brush_rle(mask)
    others = [other for other in linked if other is not item]
    return _Region(
        region_id=str(item["id"]), item=item, mask=mask, rle=rle, labels=_tool_labels(schema, item),
        fields=region_fields(schema, item, others),
    )  # fmt: skip


def _tool_labels(schema: ProjectSchema, item: dict) -> list[str]:
    labels = (item.get("value") or {}).get(schema.output_tool.result_type)
    return [str(label) for label in labels] if isinstance(labels, list) else []


def field_value(spec: FieldSpec, item: dict | None):
    """A field's value from a Choices/TextArea result: ``category``/``part`` a str, ``attributes`` a
    list[str], ``caption``/``description`` a str (lines joined by newlines); None when empty."""
    value = item.get("value") if isinstance(item, dict) else None
    if not isinstance(value, dict):
        return None
    raw = value.get("choices") if spec.is_closed_set else value.get("text")
    raw = [raw] if isinstance(raw, str) else raw
    texts = [str(v).strip() for v in raw or [] if isinstance(v, (str, int, float)) and str(v).strip()]
    if not texts:
        return None
    if spec.field == "attributes":
        return texts
    return texts[0] if spec.field in ("category", "part") else "\n".join(texts)


def region_fields(schema: ProjectSchema, region_item: dict, linked: list[dict]) -> dict:
    """The per-region field values of a region: its linked results (same ``id``) by ``from_name``, and
    the region tool's own label where the schema's category lives in the tool."""
    out = {}
    for spec in schema.fields:
        if not spec.per_region:
            continue
        if spec.from_name == schema.output_tool.from_name:
            labels = _tool_labels(schema, region_item)
            value = labels[0] if labels else None
        else:
            value = field_value(spec, next((i for i in linked if i.get("from_name") == spec.from_name), None))
        if value is not None:
            out[spec.field] = value
    return out


def task_fields(schema: ProjectSchema, items: list[dict]) -> dict:
    """Whole-task (not per-region) field values found in ``items``."""
    out = {}
    for spec in schema.fields:
        if not spec.per_region:
            value = field_value(spec, next((i for i in items if i.get("from_name") == spec.from_name), None))
            if value is not None:
                out[spec.field] = value
    return out


# ---- acceptance ----------------------------------------------------------------------------------


def match_prediction(regions: list[_Region], predicted: list[PredictedRegion]):
    """Match accepted regions to recorded predicted regions of the same task.

    1. Same region ``id`` (Label Studio keeps a predicted region's id when it is accepted or edited).
    2. The *source* prediction is the model version of most id matches, else the newest batch prediction;
       still unmatched regions take its regions (and interactive ones) greedily by mask IoU >= 0.5.
    3. The source batch prediction's regions that nothing matched were removed by the annotator
       (interactive predictions are never counted removed: each click supersedes the last).

    Returns ``({region_id: (PredictedRegion, "id" | "iou", mask IoU)}, source model version, removed)``.
    """
    by_id: dict[str, PredictedRegion] = {}
    for pred in predicted:
        if pred.kind == "region":
            by_id.setdefault(pred.region_id, pred)
    matches: dict[str, tuple] = {}
    for region in regions:
        pred = by_id.get(region.region_id)
        if pred is not None:
            matches[region.region_id] = (pred, "id", _iou(region, pred))
    versions = [m[0].model_version for m in matches.values()]
    batch = [p for p in predicted if p.kind == "region" and p.source == "batch"]
    version = (
        max(set(versions), key=versions.count) if versions else (batch[0].model_version if batch else None)
    )
    taken = {m[0].region_id for m in matches.values()}
    pool = [
        p for p in predicted
        if p.kind == "region" and p.region_id not in taken and (p.source == "interactive" or p.model_version == version)
    ]  # fmt: skip
    pairs = []
    for region in regions:
        if region.region_id in matches:
            continue
        for pred in pool:
            iou = _iou(region, pred)
            if iou is not None and iou >= MATCH_IOU:
                pairs.append((iou, region.region_id, pred))
    for iou, region_id, pred in sorted(pairs, key=lambda p: -p[0]):
        if region_id not in matches and pred.region_id not in taken:
            matches[region_id] = (pred, "iou", iou)
            taken.add(pred.region_id)
    removed = [p for p in batch if p.model_version == version and p.region_id not in taken]
    return matches, version, removed


def _iou(region: _Region, pred: PredictedRegion) -> float | None:
    """Mask IoU of an accepted region and a predicted one (1.0 without decoding when the geometry is
    byte-identical); None when the prediction was made on an image of another size or is unreadable."""
    item = pred.items[0]
    geometry = {k: v for k, v in (item.get("value") or {}).items() if not k.endswith("labels")}
    mine = {k: v for k, v in region.item["value"].items() if not k.endswith("labels")}
    if geometry == mine and str(item.get("type")).lower() == str(region.item.get("type")).lower():
        return 1.0
    height, width = region.mask.shape
    try:
        other = mask_from_result(item, width, height)
    except BadRegionError:
        return None
    union = np.logical_or(region.mask, other).sum()
    return float(np.logical_and(region.mask, other).sum() / union) if union else None


def _same(a, b) -> bool:
    """Field values equal up to whitespace (and order, for attribute lists)."""

    def norm(v):
        if isinstance(v, list):
            return sorted({" ".join(str(x).split()) for x in v})
        return " ".join(str(v).split())

    return norm(a) == norm(b)


def outcomes(
    region_id: str,
    accepted: dict | None,
    predicted: dict | None,
    iou: float | None,
    pred: PredictedRegion | None,
    *,
    region_level: bool = True,
) -> list[FieldOutcome]:
    """Per field: ``kept`` (pre-label unchanged), ``edited`` (changed or cleared), ``added`` (no pre-label),
    ``removed`` (the predicted region was deleted: ``accepted`` is None). ``region_level`` adds the
    pseudo-field ``region`` for the mask itself (kept when IoU >= 0.99)."""
    version = pred.model_version if pred else None
    out = []
    if region_level:
        if accepted is None:
            mask_outcome = "removed"
        elif pred is None:
            mask_outcome = "added"
        else:
            mask_outcome = "kept" if iou is not None and iou >= KEPT_MASK_IOU else "edited"
        out.append(FieldOutcome(region_id, "region", mask_outcome, version))
    predicted = predicted or {}
    for name in sorted(set(predicted) | set(accepted or {})):
        before, after = predicted.get(name), (accepted or {}).get(name)
        if accepted is None:
            outcome = "removed"
        elif before is None:
            outcome = "added"
        else:
            outcome = "kept" if after is not None and _same(before, after) else "edited"
        out.append(FieldOutcome(region_id, name, outcome, version))
    return out
