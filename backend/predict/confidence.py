"""How sure a prediction is: the ``score`` of each region and of the whole prediction, made so that
sorting tasks by it puts the most informative ones first ("least confident first").

A region's confidence is the product of two chances, each in ``[0, 1]``:

- *the label*: the smallest **margin** over its closed-set answers (category, part), the top
  probability minus the runner-up's (``1.0`` with one candidate). ``(0.50, 0.49, 0.01)`` scores 0.01:
  the answer is a coin toss between two labels, although its top probability is 0.5. A category the
  model generated (open vocabulary) counts with its tokens' geometric-mean probability instead.
  Attributes do not count: they are independent yes/no answers, most of them clear "no"s, shown with
  their own probability on their Choices result.
- *the mask*: SAM's predicted IoU, clipped to ``[0, 1]``, for a region SAM drew (a click, a refined
  region, segment everything); ``1.0`` for a region an annotator drew.

A region with no closed-set or generated category answer scores its mask's chance alone. A task's
score is its least confident region's (one doubtful region is enough to make a task worth a look);
a task with no region scores 0.0, so the tasks where nothing was found come first as well.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from osprey.inference.fields import ClosedSetAnswer, RegionLabels


def margin(scores: Mapping[str, float]) -> float:
    """Top probability minus the second (``1.0`` with one candidate), in ``[0, 1]``."""
    top = sorted(scores.values(), reverse=True)
    gap = top[0] - top[1] if len(top) > 1 else 1.0
    return float(min(max(gap, 0.0), 1.0))


def label_confidence(labels: RegionLabels | None) -> float | None:
    """The smallest margin over the region's closed-set answers (a generated category: its token
    confidence); None when it has neither."""
    if labels is None:
        return None
    found = [margin(a.scores) for a in (labels.category, labels.part) if isinstance(a, ClosedSetAnswer)]
    if isinstance(labels.category, str) and "category" in labels.text_scores:
        found.append(float(labels.text_scores["category"]))
    return min(found) if found else None


def region_confidence(labels: RegionLabels | None, mask_iou: float | None) -> float:
    """A region's score (module docstring): label confidence times SAM's predicted IoU (``mask_iou``,
    None when SAM did not draw the region)."""
    label = label_confidence(labels)
    mask = 1.0 if mask_iou is None else float(min(max(mask_iou, 0.0), 1.0))
    return mask if label is None else label * mask


def task_confidence(region_scores: Iterable[float]) -> float:
    """A prediction's score: its least confident region's, 0.0 when it has none."""
    return float(min(region_scores, default=0.0))
