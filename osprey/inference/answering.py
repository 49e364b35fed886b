"""One request's questions through a runner: the sequence every region model shares.

Round 1 (everything that depends on no other answer) is scored, round 2 (parts given each region's
most likely category) is scored, free text is generated, and the planner assembles the answers. The
fast path runs it on an :class:`~osprey.inference.fast.EncodedImage` or an
:class:`~osprey.inference.fast.ImageBatch`; the upstream-style baseline on the image and its masks.
"""

from __future__ import annotations

from .fields import RegionLabels
from .plan import Planner


def answer_fast(
    planner: Planner, fast, images, region_tokens: tuple, image_of: list[int]
) -> list[RegionLabels]:
    """Answers for ``len(image_of)`` regions; region ``r`` belongs to row ``image_of[r]`` of ``images``
    (one encoded image: all 0) and its tokens are row ``r`` of each tensor in ``region_tokens``."""
    first, gens = planner.first_round(len(image_of))
    for task in (*first, *gens):
        task.image = image_of[task.region]
    fast.score(images, first, region_tokens)
    second = planner.second_round(first)
    fast.score(images, second, region_tokens)
    fast.generate(images, gens, region_tokens)
    return planner.assemble(len(image_of), first, second, gens)


def answer_baseline(planner: Planner, baseline, rgb, masks) -> list[RegionLabels]:
    """The same questions asked the upstream way, one region and one question per call."""
    first, gens = planner.first_round(len(masks))
    baseline.score(rgb, masks, first)
    second = planner.second_round(first)
    baseline.score(rgb, masks, second)
    baseline.generate(rgb, masks, gens)
    return planner.assemble(len(masks), first, second, gens)
