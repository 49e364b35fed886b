"""Tasks' predictions: find the regions, refine them with SAM, label them with Osprey (several tasks in
the same forward passes), and write Label Studio results.

Three ways, chosen per task: *interactive* (the request's ``context`` carries the annotator's clicks,
box, brush or polygon), *existing regions* (the task's latest annotation or prediction already has
regions of the output tool), and *segment everything* (no regions at all).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from backend.labelstudio.limits import DEFAULT_LIMITS, PayloadLimits
from backend.labelstudio.results import (
    choices_result,
    mask_from_result,
    parse_context,
    region_geometry,
    region_result,
    textarea_result,
)
from backend.labelstudio.rle import BadRegionError
from backend.labelstudio.schema import FieldSpec, ProjectSchema
from osprey.inference.fields import ClosedSetAnswer, LabelRequest, RegionLabels
from osprey.learning.head import FastHead, blend
from osprey.learning.region_features import feature_layout, region_features
from osprey.runtime.steps import step_boundary

logger = logging.getLogger(__name__)

REGION_TYPES = ("brushlabels", "polygonlabels", "rectanglelabels", "brush", "polygon", "rectangle")


@dataclass
class Region:
    """A region to label: ``mask`` (H, W) bool; ``score`` is SAM's predicted IoU when SAM drew it."""

    mask: np.ndarray
    region_id: str
    label: str | None = None
    score: float | None = None


@dataclass(frozen=True)
class PredictOptions:
    """How tasks are predicted; ``limits`` bound the regions and prompts a task may carry."""

    refine_existing: bool = False
    segment_everything: bool = True
    attribute_threshold: float = 0.5
    max_caption_tokens: int = 32
    max_description_tokens: int = 256
    limits: PayloadLimits = field(default=DEFAULT_LIMITS)


def new_region_id() -> str:
    return uuid.uuid4().hex[:10]


def label_request(fields: list[FieldSpec], options: PredictOptions) -> LabelRequest | None:
    """What to ask Osprey for the given field specs; None when there is nothing to ask."""
    by_field = {spec.field: spec for spec in fields}

    def labels(name: str) -> tuple[str, ...] | None:
        spec = by_field.get(name)
        return tuple(spec.labels) if spec is not None and spec.is_closed_set and spec.labels else None

    caption, description = "caption" in by_field, "description" in by_field
    request = dict(categories=labels("category"), parts=labels("part"), attributes=labels("attributes"))
    if not any(v is not None for v in request.values()) and not caption and not description:
        return None
    return LabelRequest(
        **request,
        caption=caption,
        description=description,
        max_caption_tokens=options.max_caption_tokens,
        max_description_tokens=options.max_description_tokens,
    )


# ---- finding regions -------------------------------------------------------------------------------


def interactive_region(
    refiner, rgb: np.ndarray, context: dict, *, limits: PayloadLimits = DEFAULT_LIMITS
) -> Region:
    """SAM's mask for the annotator's clicks / box / brush / polygon in ``context``."""
    height, width = rgb.shape[:2]
    prompt = parse_context(context, width=width, height=height, limits=limits)
    refined = refiner.refine(
        rgb,
        points=prompt.points_xy if len(prompt.points_xy) else None,
        point_labels=prompt.point_labels if len(prompt.point_labels) else None,
        box_xyxy=prompt.box_xyxy,
        mask=prompt.brush_mask,
        polygon=prompt.polygon,
    )
    if not refined.mask.any():
        raise BadRegionError("SAM found no object at the annotator's prompt; click inside the object")
    return Region(
        mask=refined.mask, region_id=new_region_id(), label=prompt.label, score=refined.predicted_iou
    )


def existing_regions(
    task: dict, schema: ProjectSchema, width: int, height: int, *, limits: PayloadLimits = DEFAULT_LIMITS
) -> list[Region]:
    """Regions of the image in the task's latest annotation (else latest prediction) that has any.

    Raises BadRegionError for a region that cannot be read and PayloadTooLargeError when the source has
    more than ``limits.max_regions`` regions (checked before any mask is made)."""
    sources = []
    for key in ("annotations", "predictions"):
        items = task.get(key) or []
        if isinstance(items, list):
            usable = [i for i in items if isinstance(i, dict) and not i.get("was_cancelled")]
            sources.extend(
                sorted(
                    usable, key=lambda i: str(i.get("updated_at") or i.get("created_at") or ""), reverse=True
                )
            )
    for source in sources:
        items = [
            item for item in source.get("result") or [] if isinstance(item, dict)
            and str(item.get("type", "")).lower() in REGION_TYPES and item.get("to_name") in (None, schema.image_name)
        ]  # fmt: skip
        limits.check_regions(len(items), "the task's annotation or prediction")
        regions = []
        for item in items:
            mask = mask_from_result(item, width, height, limits=limits)
            if not mask.any():
                continue
            value = item.get("value") or {}
            labels = value.get(str(item.get("type")).lower())
            label = labels[0] if isinstance(labels, list) and labels else None
            regions.append(Region(mask=mask, region_id=str(item.get("id") or new_region_id()), label=label))
        if regions:
            return regions
    return []


def refine_regions(refiner, rgb: np.ndarray, regions: list[Region]) -> list[Region]:
    """Each existing region replaced by SAM's mask for it (used as a rough-mask prompt)."""
    out = []
    for region in regions:
        refined = refiner.refine(rgb, mask=region.mask)
        mask = refined.mask if refined.mask.any() else region.mask
        out.append(
            Region(mask=mask, region_id=region.region_id, label=region.label, score=refined.predicted_iou)
        )
    return out


def everything_regions(everything, rgb: np.ndarray) -> list[Region]:
    return [
        Region(mask=r.mask, region_id=new_region_id(), score=float(r.predicted_iou))
        for r in everything.generate(rgb)
    ]


def apply_head(
    osprey, rgb: np.ndarray, regions: list[Region], answers: list[RegionLabels], head: FastHead, *, encoded
) -> None:
    """Blend the project's fast head into Osprey's closed-set answers, in place (see
    :func:`osprey.learning.head.blend`: the head's weight grows with its accepted examples per field)."""
    if not regions or not head.compatible_with(feature_layout(osprey)):
        return
    features = region_features(osprey, rgb, [r.mask for r in regions], encoded=encoded)
    for labels, head_probs in zip(answers, head.label_probs(features), strict=True):
        for name in ("category", "part"):
            answer = getattr(labels, name)
            if isinstance(answer, ClosedSetAnswer) and set(head_probs.get(name, {})) == set(answer.scores):
                scores = blend(answer.scores, head_probs[name], head.n_train.get(name, 0))
                best = max(scores, key=scores.get)
                setattr(labels, name, ClosedSetAnswer(label=best, score=scores[best], scores=scores))
        if labels.attributes and set(head_probs.get("attributes", {})) == set(labels.attributes):
            labels.attributes = blend(
                labels.attributes,
                head_probs["attributes"],
                head.n_train.get("attributes", 0),
                multi_label=True,
            )


# ---- writing results ---------------------------------------------------------------------------------


def region_results(
    *,
    schema: ProjectSchema,
    region: Region,
    labels: RegionLabels | None,
    width: int,
    height: int,
    options: PredictOptions,
) -> tuple[list[dict], float]:
    """The region and its fields as Label Studio result items, and the region's score."""
    tool = schema.output_tool
    category_spec = schema.field("category")
    category = labels.category if labels is not None else None
    in_tool = category_spec is not None and category_spec.from_name == tool.from_name
    if in_tool and isinstance(category, ClosedSetAnswer):
        tool_label, score = category.label, category.score
    else:
        tool_label = (
            region.label if region.label in tool.labels else (tool.labels[0] if tool.labels else None)
        )
        score = (
            category.score
            if isinstance(category, ClosedSetAnswer)
            else (region.score if region.score is not None else 1.0)
        )
    geometry_item = region_result(
        mask=region.mask,
        tool=tool.tag_type,
        from_name=tool.from_name,
        to_name=schema.image_name,
        width=width,
        height=height,
        label=tool_label if tool.labels else None,
        score=score,
        region_id=region.region_id,
    )
    results = [geometry_item]
    # Per-region results repeat the region's geometry as Label Studio saves them, except a brush's
    # RLE: the region result comes first, which is all the editor needs to link them.
    geometry = None if tool.result_type.startswith("brush") else region_geometry(geometry_item)
    if labels is not None:
        results += field_results(schema, labels, region.region_id, geometry, options, skip=tool.from_name)
    return results, score


def field_results(
    schema: ProjectSchema,
    labels: RegionLabels,
    region_id: str,
    geometry: dict | None,
    options: PredictOptions,
    *,
    skip: str | None = None,
) -> list[dict]:
    """Choices / TextArea results for the fields of ``schema`` answered in ``labels``."""
    out = []
    for spec in schema.fields:
        if spec.from_name == skip:
            continue
        common = dict(region_id=region_id, from_name=spec.from_name, to_name=spec.to_name, geometry=geometry)
        value = getattr(labels, spec.field, None)
        if spec.field in ("category", "part") and isinstance(value, ClosedSetAnswer):
            out.append(choices_result(choices=[value.label], score=value.score, **common))
        elif spec.field == "attributes" and value:
            chosen = [name for name, p in value.items() if p >= options.attribute_threshold]
            if chosen:
                score = float(np.mean([value[name] for name in chosen]))
                out.append(choices_result(choices=chosen, score=score, **common))
        elif spec.field in ("caption", "description") and isinstance(value, str) and value.strip():
            out.append(
                textarea_result(text=value.strip(), score=labels.text_scores.get(spec.field, 1.0), **common)
            )
    return out


def find_regions(
    *,
    task: dict,
    rgb: np.ndarray,
    schema: ProjectSchema,
    context: dict | None,
    models,
    options: PredictOptions,
) -> list[Region]:
    """The task's regions: SAM's mask for the annotator's prompt (``context``), else the regions already
    drawn (SAM-refined when ``options.refine_existing``), else SAM's segment everything."""
    height, width = rgb.shape[:2]
    if context and context.get("result"):
        return [interactive_region(models.refiner, rgb, context, limits=options.limits)]
    regions = existing_regions(task, schema, width, height, limits=options.limits)
    if regions and options.refine_existing:
        return refine_regions(models.refiner, rgb, regions)
    if not regions and options.segment_everything:
        return everything_regions(models.everything, rgb)
    return regions


def predict_task(
    *,
    task: dict,
    rgb: np.ndarray,
    schema: ProjectSchema,
    context: dict | None,
    models,
    options: PredictOptions,
    head: FastHead | None = None,
    model_session: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[list[dict], float]:
    """All result items for one task and the prediction's overall score (mean region score). The model
    work (regions, answers) runs inside ``model_session()``; building Label Studio's results does not."""
    with model_session():
        regions = find_regions(
            task=task, rgb=rgb, schema=schema, context=context, models=models, options=options
        )
        answers = answer_tasks([(rgb, regions)], schema=schema, models=models, options=options, head=head)
    return task_results([(rgb, regions)], answers, schema=schema, options=options)[0]


@dataclass
class TaskAnswers:
    """Osprey's answers for one task: per region (in order), and for the whole-task fields."""

    regions: list
    whole: RegionLabels | None


def answer_tasks(
    items: list[tuple[np.ndarray, list[Region]]],
    *,
    schema: ProjectSchema,
    models,
    options: PredictOptions,
    head: FastHead | None = None,
) -> list[TaskAnswers]:
    """Osprey's answers for each ``(image, regions)`` of several tasks: the part that needs the model.

    Every task's regions are labelled in the same Osprey forward passes (:meth:`Osprey.label_many`), as
    are the whole-task fields; the answers are those each task would get alone.
    """
    per_region = [s for s in schema.fields if s.per_region]
    whole_task = [s for s in schema.fields if not s.per_region]
    request = label_request(per_region, options)
    task_request = label_request(whole_task, options)
    osprey = models.osprey
    need = [i for i, (_, regions) in enumerate(items) if (regions and request) or task_request]
    # One encoding of each image serves every question, the head's features and the whole-task fields.
    encoded = dict(zip(need, osprey.encode_images([items[i][0] for i in need]), strict=True)) if need else {}
    answers: list[list] = [[None] * len(regions) for _, regions in items]
    if request is not None:
        labelled = [i for i in need if items[i][1]]
        batch = osprey.label_many(
            [(items[i][0], [r.mask for r in items[i][1]]) for i in labelled],
            request,
            encoded=[encoded[i] for i in labelled],
        )
        for i, labels in zip(labelled, batch, strict=True):
            answers[i] = labels
            if head is not None:
                apply_head(osprey, items[i][0], items[i][1], labels, head, encoded=encoded[i])
    whole: dict[int, RegionLabels] = {}
    if task_request is not None:
        full = [(items[i][0], [np.ones(items[i][0].shape[:2], bool)]) for i in need]
        for i, labels in zip(
            need, osprey.label_many(full, task_request, encoded=[encoded[i] for i in need]), strict=True
        ):
            whole[i] = labels[0]
    return [TaskAnswers(regions=answers[i], whole=whole.get(i)) for i in range(len(items))]


def task_results(
    items: list[tuple[np.ndarray, list[Region]]],
    answers: list[TaskAnswers],
    *,
    schema: ProjectSchema,
    options: PredictOptions,
) -> list[tuple[list[dict], float]]:
    """Label Studio result items (masks as brush RLE or polygons, linked fields) and the overall score
    (mean region score) of each task, from :func:`answer_tasks`' answers; needs no model."""
    out = []
    for (rgb, regions), answer in zip(items, answers, strict=True):
        height, width = rgb.shape[:2]
        results: list[dict] = []
        scores: list[float] = []
        for region, labels in zip(regions, answer.regions, strict=True):
            step_boundary()  # work that shares the machine with more urgent work gives way here
            region_items, score = region_results(
                schema=schema, region=region, labels=labels, width=width, height=height, options=options
            )
            results += region_items
            scores.append(score)
        if answer.whole is not None:
            results += field_results(schema, answer.whole, new_region_id(), None, options)
        out.append((results, float(np.mean(scores)) if scores else 0.0))
    return out
