"""Segment everything's small-region clean-up, on the host, one mask's bounding box at a time.

SAM's automatic mask generator cleans each kept mask twice with ``remove_small_regions``: first it fills
holes (background components) smaller than ``min_area`` pixels, then it removes islands (mask
components) smaller than that, keeping the largest when all are. Upstream labels the whole image twice
per mask. :func:`clean_mask` gives the same mask and the same "changed" flag while labelling only the
mask's bounding box plus a one-pixel background ring on the sides that are not the image's edge:

- islands lie inside the box, so their sizes and their scan order are the same as in the whole image;
- a background component that reaches the ring joins the background outside the box, as it does in
  the image (the ring is connected exactly where the outside is: the outside of a box splits in two
  only when the box spans the full width or height, and then so does the ring). Such a component is at
  least as large as the outside piece it joins; when every outside piece has ``min_area`` pixels or more
  it is never a hole, and otherwise (a box nearly as large as the image) the whole image is labelled, as
  upstream does.

A test compares it with upstream's function on real VOC instance masks and on edge cases.
"""

from __future__ import annotations

import cv2
import numpy as np

from .build import remove_small_regions

__all__ = ["clean_mask", "mask_box"]


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` of an (H, W) bool mask, exclusive end; None when it is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if not len(rows):
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _outside_pieces(box: tuple[int, int, int, int], height: int, width: int) -> list[int]:
    """Pixel counts of the connected pieces of the image outside ``box`` (8-connectivity)."""
    x0, y0, x1, y1 = box
    if x0 == 0 and x1 == width:
        return [n for n in (y0 * width, (height - y1) * width) if n]
    if y0 == 0 and y1 == height:
        return [n for n in (x0 * height, (width - x1) * height) if n]
    outside = height * width - (y1 - y0) * (x1 - x0)
    return [outside] if outside else []


def clean_mask(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, bool]:
    """``mask`` (H, W) bool with holes, then islands, smaller than ``min_area`` pixels removed (all
    islands small: the largest kept), and whether anything changed; equal to upstream's
    ``remove_small_regions(.., "holes")`` then ``(.., "islands")`` (see the module docstring)."""
    height, width = mask.shape
    box = mask_box(mask)
    if box is None or any(piece < min_area for piece in _outside_pieces(box, height, width)):
        return _clean_whole(mask, min_area)
    x0, y0, x1, y1 = box
    top, left = int(y0 > 0), int(x0 > 0)
    bottom, right = int(y1 < height), int(x1 < width)
    crop = np.pad(mask[y0:y1, x0:x1], ((top, bottom), (left, right)))  # the ring is background

    count, labels, stats, _ = cv2.connectedComponentsWithStats((~crop).astype(np.uint8), connectivity=8)
    ring = np.zeros(count, dtype=bool)  # background components joined to the outside
    for edge, present in (
        (labels[0], top),
        (labels[-1], bottom),
        (labels[:, 0], left),
        (labels[:, -1], right),
    ):
        if present:
            ring[edge] = True
    holes = (stats[:, cv2.CC_STAT_AREA] < min_area) & ~ring
    holes[0] = False  # label 0: the mask itself
    filled = crop | holes[labels] if holes.any() else crop

    count, labels, stats, _ = cv2.connectedComponentsWithStats(filled.astype(np.uint8), connectivity=8)
    sizes = stats[1:, cv2.CC_STAT_AREA]
    small = sizes < min_area
    changed = bool(holes.any() or small.any())
    if small.any():
        keep = ~small if not small.all() else np.arange(len(sizes)) == int(np.argmax(sizes))
        filled = np.concatenate([[False], keep])[labels]
    if not changed:
        return mask, False
    out = np.zeros_like(mask)
    out[y0:y1, x0:x1] = filled[top : top + y1 - y0, left : left + x1 - x0]
    return out, True


def _clean_whole(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, bool]:
    mask, holes = remove_small_regions(mask, min_area, mode="holes")
    mask, islands = remove_small_regions(mask, min_area, mode="islands")
    return mask, bool(holes or islands)
