"""A task's regions, found one of three ways (chosen per task):

- *interactive*: the request's ``context`` carries the annotator's clicks, box, brush or polygon, and
  SAM turns them into one mask;
- *existing*: the task's latest annotation (else prediction) already has regions of the output tool,
  each labelled in place (SAM-refined first with ``OSPREY_REFINE_EXISTING``);
- *segment everything*: no regions at all, so SAM's automatic masks are used.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import numpy as np

from backend.labelstudio.limits import DEFAULT_LIMITS, PayloadLimits
from backend.labelstudio.results import mask_from_result, parse_context
from backend.labelstudio.rle import BadRegionError
from backend.labelstudio.schema import REGION_TYPES, ProjectSchema

from .options import PredictOptions

logger = logging.getLogger(__name__)


@dataclass
class Region:
    """A region to label: ``mask`` is ``(H, W)`` bool at the image's size; ``score`` is SAM's predicted
    IoU when SAM drew it; ``label`` is the region tool's label the annotator or a prediction gave it;
    ``device_mask`` is SAM's copy of ``mask`` on its device, which the region model reads instead (no
    copy back from the host)."""

    mask: np.ndarray
    region_id: str
    label: str | None = None
    score: float | None = None
    device_mask: object | None = None

    @property
    def model_mask(self):
        """The mask to give the region model: SAM's device copy when there is one."""
        return self.mask if self.device_mask is None else self.device_mask


def new_region_id() -> str:
    return uuid.uuid4().hex[:10]


def interactive_region(
    refiner, rgb: np.ndarray, context: dict, *, limits: PayloadLimits = DEFAULT_LIMITS
) -> Region:
    """SAM's mask for the annotator's clicks / box / brush / polygon in ``context``. BadRegionError
    when the prompt paints nothing or SAM finds no object there."""
    height, width = rgb.shape[:2]
    prompt = parse_context(context, width=width, height=height, limits=limits)
    rough = prompt.mask_prompt()  # brush strokes and polygon as one mask, by Label Studio's pixel rule
    if rough is not None and not rough.any():
        raise BadRegionError("the annotator's brush or polygon covers no pixel; draw over the object")
    refined = refiner.refine(
        rgb,
        points=prompt.points_xy if len(prompt.points_xy) else None,
        point_labels=prompt.point_labels if len(prompt.point_labels) else None,
        box_xyxy=prompt.box_xyxy,
        mask=rough,
    )
    if not refined.mask.any():
        raise BadRegionError("SAM found no object at the annotator's prompt; click inside the object")
    return Region(
        mask=refined.mask, region_id=new_region_id(), label=prompt.label, score=refined.predicted_iou,
        device_mask=refined.device_mask,
    )  # fmt: skip


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
        found = bool(refined.mask.any())
        out.append(
            Region(
                mask=refined.mask if found else region.mask, region_id=region.region_id, label=region.label,
                score=refined.predicted_iou, device_mask=refined.device_mask if found else None,
            )
        )  # fmt: skip
    return out


def everything_regions(everything, rgb: np.ndarray) -> list[Region]:
    """SAM's automatic masks of the whole image, each a region with SAM's predicted IoU as its score."""
    return [
        Region(mask=r.mask, region_id=new_region_id(), score=float(r.predicted_iou))
        for r in everything.generate(rgb)
    ]


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
    drawn (SAM-refined when ``options.refine_existing``), else SAM's segment everything. ``models``
    has ``refiner`` and ``everything``."""
    height, width = rgb.shape[:2]
    if context and context.get("result"):
        return [interactive_region(models.refiner, rgb, context, limits=options.limits)]
    regions = existing_regions(task, schema, width, height, limits=options.limits)
    if regions and options.refine_existing:
        return refine_regions(models.refiner, rgb, regions)
    if not regions and options.segment_everything:
        return everything_regions(models.everything, rgb)
    return regions
