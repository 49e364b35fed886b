"""A task's answers as Label Studio result items: each region as a brush RLE, polygon or rectangle
result of the project's output tool, its fields as Choices / TextArea results linked to it by id, the
whole-task fields, and the prediction's score (:mod:`backend.predict.confidence`: the least confident
region's margin times SAM's predicted IoU). Needs no model (runs outside the model session).
"""

from __future__ import annotations

import numpy as np

from backend.labelstudio.results import (
    choices_result,
    region_geometry,
    region_result,
    textarea_result,
)
from backend.labelstudio.schema import ProjectSchema
from osprey.inference.fields import ClosedSetAnswer, RegionLabels
from osprey.runtime.steps import step_boundary

from .answers import TaskAnswers
from .confidence import region_confidence, task_confidence
from .options import PredictOptions
from .regions import Region, new_region_id


def region_results(
    *,
    schema: ProjectSchema,
    region: Region,
    labels: RegionLabels | None,
    width: int,
    height: int,
    options: PredictOptions,
) -> tuple[list[dict], float]:
    """The region and its fields as Label Studio result items, and the region's score
    (:func:`~backend.predict.confidence.region_confidence`, also the region item's ``score``)."""
    tool = schema.output_tool
    category_spec = schema.field("category")
    category = labels.category if labels is not None else None
    in_tool = category_spec is not None and category_spec.from_name == tool.from_name
    if in_tool and isinstance(category, ClosedSetAnswer):
        tool_label = category.label
    else:
        tool_label = (
            region.label if region.label in tool.labels else (tool.labels[0] if tool.labels else None)
        )
    score = region_confidence(labels, region.score)
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


def task_results(
    items: list[tuple[np.ndarray, list[Region]]],
    answers: list[TaskAnswers],
    *,
    schema: ProjectSchema,
    options: PredictOptions,
) -> list[tuple[list[dict], float]]:
    """Label Studio result items (masks as brush RLE or polygons, linked fields) and the overall score
    (the least confident region's, :func:`~backend.predict.confidence.task_confidence`) of each task,
    from :func:`answer_tasks`' answers; needs no model."""
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
        out.append((results, task_confidence(scores)))
    return out
