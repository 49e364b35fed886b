"""The part of a prediction that needs the model: the region model's answers for every region of
several tasks, and the project's fast head blended into its closed-set answers.

One encoding of each image serves every question, the head's region features and the whole-task
fields; every task's regions are answered in the same forward passes (``label_many``), and each task
gets the answers it would get alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backend.labelstudio.schema import FieldSpec, ProjectSchema
from osprey.inference.fields import LabelRequest, RegionLabels
from osprey.learning.blend import blend_labels
from osprey.learning.head import FastHead
from osprey.learning.region_features import feature_layout, region_features

from .options import PredictOptions
from .regions import Region


def label_request(fields: list[FieldSpec], options: PredictOptions) -> LabelRequest | None:
    """What to ask the model for the given field specs; None when there is nothing to ask."""
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


def apply_head(
    osprey, rgb: np.ndarray, regions: list[Region], answers: list[RegionLabels], head: FastHead, *, encoded
) -> list[RegionLabels]:
    """The answers as served: each region's closed-set answers blended with the project's head
    (:func:`osprey.learning.blend.blend_labels` with the head's fitted weights, the rule the promotion
    gate measures too)."""
    if not regions or not head.compatible_with(feature_layout(osprey)):
        return answers
    features = region_features(osprey, rgb, [r.mask for r in regions], encoded=encoded)
    weights = head.head_weights()
    return [
        blend_labels(labels, head_probs, weights)
        for labels, head_probs in zip(answers, head.label_probs(features), strict=True)
    ]


@dataclass
class TaskAnswers:
    """The model's answers for one task: per region (in order), and for the whole-task fields."""

    regions: list
    whole: RegionLabels | None


def answer_tasks(
    items: list[tuple[np.ndarray, list[Region]]],
    *,
    schema: ProjectSchema,
    osprey,
    options: PredictOptions,
    head: FastHead | None = None,
) -> list[TaskAnswers]:
    """The answers for each ``(image, regions)`` of several tasks (see the module docstring)."""
    per_region = [s for s in schema.fields if s.per_region]
    whole_task = [s for s in schema.fields if not s.per_region]
    request = label_request(per_region, options)
    task_request = label_request(whole_task, options)
    need = [i for i, (_, regions) in enumerate(items) if (regions and request) or task_request]
    encoded = dict(zip(need, osprey.encode_images([items[i][0] for i in need]), strict=True)) if need else {}
    answers: list[list] = [[None] * len(regions) for _, regions in items]
    if request is not None:
        labelled = [i for i in need if items[i][1]]
        batch = osprey.label_many(
            [(items[i][0], [r.model_mask for r in items[i][1]]) for i in labelled],
            request,
            encoded=[encoded[i] for i in labelled],
        )
        for i, labels in zip(labelled, batch, strict=True):
            answers[i] = labels
            if head is not None:
                answers[i] = apply_head(osprey, items[i][0], items[i][1], labels, head, encoded=encoded[i])
    whole: dict[int, RegionLabels] = {}
    if task_request is not None:
        full = [(items[i][0], [np.ones(items[i][0].shape[:2], bool)]) for i in need]
        for i, labels in zip(
            need, osprey.label_many(full, task_request, encoded=[encoded[i] for i in need]), strict=True
        ):
            whole[i] = labels[0]
    return [TaskAnswers(regions=answers[i], whole=whole.get(i)) for i in range(len(items))]
