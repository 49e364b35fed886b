"""One request's questions through a runner: the sequence every region model shares.

Round 1 (everything that depends on no other answer) is scored, round 2 (parts given each region's
most likely category) is scored, free text is generated, and the planner assembles the answers. The
fast path runs it on an :class:`~osprey.inference.fast.EncodedImage` or an
:class:`~osprey.inference.fast.ImageBatch`; the upstream-style baseline on the image and its masks.
:func:`label_items` is the ``label_many`` both region models share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from osprey.model.preprocess import stack_masks, to_rgb_array

from .fast import batch_images
from .fields import LabelRequest, RegionLabels
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


def label_items(
    model, items: Sequence[tuple], request: LabelRequest, encoded: Sequence | None, region_tokens_of: Callable
) -> list[list[RegionLabels]]:
    """The body of every region model's ``label_many``: ``items`` are ``(image, masks)`` pairs; images
    without masks get ``[]``; ``encoded`` (one per item, or per item with masks) skips encoding;
    ``region_tokens_of(rgb, masks (R, H, W), encoded image)`` gives a tuple of ``(R, ...)`` tensors.
    Every item's regions are answered in the same forwards, each as it would be alone."""
    rgbs = [to_rgb_array(image) for image, _ in items]
    mask_ts = [
        stack_masks(masks, image_hw=rgb.shape[:2]) if len(masks) else None
        for rgb, (_, masks) in zip(rgbs, items, strict=True)
    ]
    live = [i for i, masks in enumerate(mask_ts) if masks is not None]
    out: list[list[RegionLabels]] = [[] for _ in items]
    if not live:
        return out
    if encoded is None:
        encoded = model.encode_images([rgbs[i] for i in live])
    elif len(encoded) == len(items):
        encoded = [encoded[i] for i in live]
    for i, enc in zip(live, encoded, strict=True):
        if tuple(enc.image_hw) != rgbs[i].shape[:2]:
            raise ValueError(
                f"encoded image {i} is {enc.image_hw} (H, W) but the image is {rgbs[i].shape[:2]}"
            )
    with torch.inference_mode():
        parts = [region_tokens_of(rgbs[i], mask_ts[i], enc) for i, enc in zip(live, encoded, strict=True)]
    region_tokens = tuple(torch.cat(column) for column in zip(*parts, strict=True))
    counts = [len(mask_ts[i]) for i in live]
    image_of = [b for b, n in enumerate(counts) for _ in range(n)]
    answers = answer_fast(
        model.planner(request), model.fast, batch_images(list(encoded)), region_tokens, image_of
    )
    start = 0
    for i, n in zip(live, counts, strict=True):
        out[i] = answers[start : start + n]
        start += n
    return out
