"""Did a pre-label survive? One annotation compared with the predictions its task received.

``compare_annotation`` is a pure function of the project's schema, the annotation's result items and the
task's recorded predictions: it reads the accepted regions of the schema's output tool, matches each to
a predicted region (``match_prediction``: by id, else by mask IoU) and judges every field kept, edited,
added or removed (``outcomes``). The live webhook intake (:mod:`backend.learning.intake`) and the export
report (:mod:`backend.acceptance.report`, ``osprey-label eval acceptance``) both call it, so they count
the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backend.labelstudio.limits import DEFAULT_LIMITS, PayloadLimits, PayloadTooLargeError
from backend.labelstudio.results import PredictedRegion, mask_from_result
from backend.labelstudio.rle import BadRegionError, encode_brush_rle
from backend.labelstudio.schema import FieldSpec, ProjectSchema

OUTCOMES = ("kept", "edited", "added", "removed")
MATCH_IOU = 0.5  # an accepted region without a predicted id matches the best prediction at IoU >= this
KEPT_MASK_IOU = 0.99  # a matched mask this close to the predicted one counts as kept


@dataclass(frozen=True)
class FieldOutcome:
    """Whether a pre-label survived: ``region_id`` is ``""`` for whole-task fields and the predicted
    region's id for removed regions; ``field`` is a field name or ``"region"`` (the mask itself)."""

    region_id: str
    field: str
    outcome: str
    model_version: str | None = None


@dataclass
class AcceptedItem:
    """An accepted region as read from an annotation: its result item, ``(H, W)`` bool mask, brush RLE,
    the region tool's labels and its per-region field values."""

    region_id: str
    item: dict
    mask: np.ndarray
    rle: list[int]
    labels: list[str]
    fields: dict


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

    regions: list[AcceptedItem]
    matches: list[RegionMatch]
    removed: list[PredictedRegion]
    model_version: str | None
    task_fields: dict
    outcomes: list[FieldOutcome]
    skipped: list[str]


def compare_annotation(
    schema: ProjectSchema,
    result: list[dict],
    predicted: list[PredictedRegion],
    *,
    limits: PayloadLimits = DEFAULT_LIMITS,
) -> Comparison:
    """Compare an annotation's ``result`` items with the predictions recorded for its task (pure).

    ``predicted`` are the task's predicted regions and whole-task rows of every model version, newest
    first (``TrainingStore.predicted_regions``, or ``store.prediction_regions`` of each prediction of an
    export). Regions are the results of the schema's output tool; each is matched by
    ``match_prediction`` and every field judged by ``outcomes``. The live webhook intake and
    ``osprey-label eval acceptance`` both call this, so they count the same way.

    Regions past ``limits`` are skipped with the reason before their masks are made; an annotation with
    more than ``limits.max_regions`` regions has none read.
    """
    linked: dict[str, list[dict]] = {}
    for item in result:
        linked.setdefault(str(item.get("id")), []).append(item)
    regions, skipped = [], []
    items = [
        i for i in result if i.get("from_name") == schema.output_tool.from_name and i.get("id") is not None
    ]
    try:
        limits.check_regions(len(items), "the annotation")
    except PayloadTooLargeError as error:
        skipped.append(f"every region: {error}")
        items = []
    for item in items:
        try:
            regions.append(_read_region(schema, item, linked.get(str(item["id"]), []), limits))
        except BadRegionError as error:
            skipped.append(f"region {str(item.get('id'))[:64]}: {error}")
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


def _read_region(
    schema: ProjectSchema, item: dict, linked: list[dict], limits: PayloadLimits
) -> AcceptedItem:
    width, height = item.get("original_width"), item.get("original_height")
    if not isinstance(width, int) or not isinstance(height, int):
        raise BadRegionError("the region has no integer original_width/original_height")
    mask = mask_from_result(item, width, height, limits=limits)
    if not mask.any():
        raise BadRegionError("the region's mask is empty")
    value = item["value"]
    rle = value.get("rle") if str(item.get("type", "")).lower().startswith("brush") else None
    rle = [int(b) for b in rle] if rle is not None else encode_brush_rle(mask)
    others = [other for other in linked if other is not item]
    return AcceptedItem(
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


def match_prediction(regions: list[AcceptedItem], predicted: list[PredictedRegion]):
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


def _iou(region: AcceptedItem, pred: PredictedRegion) -> float | None:
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
