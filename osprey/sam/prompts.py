"""From what the annotator drew to SAM prompts: pure functions on numpy arrays.

Coordinate conventions (all in ORIGINAL image pixels, before SAM's resize):

- A pixel at row ``r``, column ``c`` covers the square ``[c, c+1) x [r, r+1)``; ``(X, Y)`` points
  and boxes use that continuous frame, so Label Studio's percent values map with
  ``x_px = x_pct / 100 * W`` and ``W`` itself is a valid coordinate (the right edge).
- Points are an ``Nx2`` array of ``(X, Y)`` plus ``N`` labels (1 = positive, 0 = negative); a point
  falls on pixel ``(int(Y), int(X))``. Points made from a mask are whole pixel indices.
- Boxes are ``XYXY`` = ``(x0, y0, x1, y1)`` with ``x0 < x1`` and ``y0 < y1``; a mask's box is
  ``(min col, min row, max col + 1, max row + 1)``.
- Masks are ``HxW`` at the image size; pixels > 0 (or True) are inside.
- Polygons are lists of ``(x, y)`` vertices in the same continuous frame; a pixel is inside when
  its CENTRE ``(c + 0.5, r + 0.5)`` is inside the polygon (even-odd rule; a centre exactly on a
  left or top edge is inside, on a right or bottom edge outside). So a polygon's pixel count
  matches its area, and polygons that share an edge share no pixel. (``cv2.fillPoly`` was not
  used because it also fills every pixel the outline touches: a 4x5 rectangle gives 5x6 pixels.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .masks import (
    EDGE_TOLERANCE_PX,
    check_image_size,
    check_polygon,
    mask_bbox_xyxy,
    mask_exterior_points,
    mask_interior_points,
    mask_to_low_res_logits,
    rasterize_polygon,
)

__all__ = [
    "MaskPromptConfig",
    "SamPrompt",
    "build_sam_prompt",
    "check_box",
    "check_mask",
    "check_points",
    "mask_bbox_xyxy",
    "mask_exterior_points",
    "mask_interior_points",
    "mask_to_low_res_logits",
    "polygon_prompt_mask",
]


@dataclass(frozen=True)
class MaskPromptConfig:
    """How a rough mask (brush or polygon) becomes SAM prompts.

    Attributes:
        n_positive: interior points: the distance-transform maximum plus ``n_positive - 1``
            well-spread deep-interior points (farthest-point sampling).
        n_negative: exterior points, near the mask but outside it, inside the expanded box.
        gap_frac, min_gap_px: negatives keep at least ``max(min_gap_px, gap_frac * long side of
            the mask's box)`` pixels from the mask, since a rough mask's edge is itself uncertain.
        margin_frac, min_margin_px: the box is expanded by ``max(min_margin_px, margin_frac * long
            side)`` pixels; negatives lie inside it (and inside the image).
        use_mask_input: also pass the rough mask as SAM's low-resolution mask input.
        logit_scale: mask input logits are ``(2 * coverage - 1) * logit_scale``.
    """

    n_positive: int = 3
    n_negative: int = 4
    gap_frac: float = 0.05
    min_gap_px: float = 2.0
    margin_frac: float = 0.2
    min_margin_px: float = 6.0
    use_mask_input: bool = True
    logit_scale: float = 10.0

    def __post_init__(self) -> None:
        if self.n_positive < 1:
            raise ValueError(f"n_positive must be >= 1, got {self.n_positive}")
        if self.n_negative < 0:
            raise ValueError(f"n_negative must be >= 0, got {self.n_negative}")
        if self.min_gap_px <= 0 or self.gap_frac < 0 or self.margin_frac < 0 or self.min_margin_px < 0:
            raise ValueError(
                "min_gap_px must be > 0 and gap_frac, margin_frac, min_margin_px >= 0, got "
                f"{self.min_gap_px}, {self.gap_frac}, {self.margin_frac}, {self.min_margin_px}"
            )
        if self.logit_scale <= 0:
            raise ValueError(f"logit_scale must be > 0, got {self.logit_scale}")


@dataclass(frozen=True)
class SamPrompt:
    """Validated SAM prompts in original image pixels (see the module docstring for frames).

    Attributes:
        image_size: (H, W) of the original image.
        point_coords: Nx2 float32 (X, Y), or None.
        point_labels: N int32, 1 positive / 0 negative, or None.
        box_xyxy: 4 float32 XYXY, or None.
        rough_mask: HxW bool union of brush and polygon input, or None; used to pick a candidate.
        mask_input: 1xhxw float32 logits in SAM's padded low-resolution frame (1x256x256 for the
            released models), or None.
    """

    image_size: tuple[int, int]
    point_coords: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    box_xyxy: np.ndarray | None = None
    rough_mask: np.ndarray | None = None
    mask_input: np.ndarray | None = None


def check_points(
    points: np.ndarray | Sequence[Sequence[float]],
    labels: np.ndarray | Sequence[int] | None,
    image_size: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """Validate Nx2 (X, Y) pixel points and their labels; ``labels=None`` means all positive.

    Returns (Nx2 float32, N int32). Raises ValueError for a bad shape, non-finite values, labels
    other than 0/1, or a point outside ``[0, W] x [0, H]``.
    """
    height, width = check_image_size(image_size)
    coords = np.asarray(points, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] < 1:
        raise ValueError(
            f"points must be an Nx2 array of (X, Y) pixels with N >= 1, got shape {coords.shape}"
        )
    if not np.isfinite(coords).all():
        raise ValueError("points contain NaN or infinite values")
    if labels is None:
        lab = np.ones(len(coords), dtype=np.int32)
    else:
        lab_raw = np.asarray(labels)
        if lab_raw.shape != (len(coords),):
            raise ValueError(f"point_labels must have shape ({len(coords)},), got {lab_raw.shape}")
        if not np.isin(lab_raw, (0, 1)).all():
            raise ValueError(
                f"point_labels must be 1 (positive) or 0 (negative), got {sorted(set(lab_raw.tolist()))}"
            )
        lab = lab_raw.astype(np.int32)
    tol = EDGE_TOLERANCE_PX
    outside = (
        (coords[:, 0] < -tol)
        | (coords[:, 0] > width + tol)
        | (coords[:, 1] < -tol)
        | (coords[:, 1] > height + tol)
    )
    if outside.any():
        bad = coords[outside][0].tolist()
        raise ValueError(
            f"{int(outside.sum())} point(s) outside the {width}x{height} image, e.g. (X, Y) = {bad}; "
            "points are pixels in [0, W] x [0, H] (convert Label Studio percents with x / 100 * W)"
        )
    coords[:, 0] = coords[:, 0].clip(0, width)
    coords[:, 1] = coords[:, 1].clip(0, height)
    return coords.astype(np.float32), lab


def check_box(box_xyxy: np.ndarray | Sequence[float], image_size: Sequence[int]) -> np.ndarray:
    """Validate an XYXY pixel box: 4 finite values, ``x0 < x1``, ``y0 < y1``, inside the image.

    Returns a float32 array of 4.
    """
    height, width = check_image_size(image_size)
    box = np.asarray(box_xyxy, dtype=np.float64).reshape(-1)
    if box.shape != (4,) or not np.isfinite(box).all():
        raise ValueError(
            f"box must be 4 finite numbers (x0, y0, x1, y1) in pixels, got {np.asarray(box_xyxy)!r}"
        )
    x0, y0, x1, y1 = box.tolist()
    if x1 <= x0 or y1 <= y0:
        raise ValueError(
            f"box must have x0 < x1 and y0 < y1 (XYXY, non-zero area), got {box.tolist()}; "
            "for an (x, y, width, height) box pass (x, y, x + width, y + height)"
        )
    tol = EDGE_TOLERANCE_PX
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        raise ValueError(f"box {box.tolist()} is outside the {width}x{height} image (XYXY pixels)")
    return np.array([max(x0, 0.0), max(y0, 0.0), min(x1, width), min(y1, height)], dtype=np.float32)


def check_mask(mask: np.ndarray, image_size: Sequence[int], *, what: str = "mask") -> np.ndarray:
    """Validate an HxW mask at the image size and return it as bool (pixels > 0 are inside)."""
    height, width = check_image_size(image_size)
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D HxW array, got shape {arr.shape}")
    if arr.shape != (height, width):
        raise ValueError(
            f"{what} size {arr.shape[0]}x{arr.shape[1]} (HxW) does not match the image {height}x{width}; "
            "masks must be at the original image size"
        )
    out = arr if arr.dtype == np.bool_ else arr > 0
    if not out.any():
        raise ValueError(f"{what} is empty (no pixel > 0); draw something or leave it out")
    return out


def polygon_prompt_mask(
    polygon: np.ndarray | Sequence[Sequence[float]], image_size: Sequence[int]
) -> np.ndarray:
    """The HxW bool rough mask of an annotator's polygon of (x, y) pixel vertices.

    Stricter than :func:`~osprey.sam.masks.rasterize_polygon`, which it calls: as a prompt, a polygon
    must lie inside the image and cover at least one pixel centre, else ValueError.
    """
    height, width = check_image_size(image_size)
    pts = check_polygon(polygon)
    tol = EDGE_TOLERANCE_PX
    if (
        (pts[:, 0] < -tol).any()
        or (pts[:, 0] > width + tol).any()
        or (pts[:, 1] < -tol).any()
        or (pts[:, 1] > height + tol).any()
    ):
        raise ValueError(
            f"polygon has vertices outside the {width}x{height} image (pixels in [0, W] x [0, H])"
        )
    mask = rasterize_polygon(pts, width=width, height=height)
    if not mask.any():
        raise ValueError("polygon covers no pixel centre (it is degenerate or thinner than a pixel)")
    return mask


def build_sam_prompt(
    image_size: Sequence[int],
    *,
    points: np.ndarray | Sequence[Sequence[float]] | None = None,
    point_labels: np.ndarray | Sequence[int] | None = None,
    box_xyxy: np.ndarray | Sequence[float] | None = None,
    mask: np.ndarray | None = None,
    polygon: np.ndarray | Sequence[Sequence[float]] | None = None,
    config: MaskPromptConfig | None = None,
    encoder_size: int = 1024,
    mask_input_size: tuple[int, int] = (256, 256),
) -> SamPrompt:
    """Combine any annotator inputs into one validated :class:`SamPrompt`.

    Args:
        image_size: (H, W) of the original image.
        points, point_labels: Nx2 (X, Y) pixel clicks and their 1/0 labels (None: all positive).
        box_xyxy: a dragged box, XYXY pixels.
        mask: a rough brush mask, HxW at the image size.
        polygon: (x, y) pixel vertices, rasterised with :func:`polygon_prompt_mask`.
        config: how a rough mask becomes prompts (:class:`MaskPromptConfig`).
        encoder_size, mask_input_size: SAM's square input frame and low-resolution mask size.

    A brush mask and a polygon are united into one rough mask. A rough mask adds its box (unless
    ``box_xyxy`` is given), interior positive and exterior negative points (after the annotator's
    own points) and, if ``config.use_mask_input``, the low-resolution mask input.
    """
    size = check_image_size(image_size)
    cfg = config or MaskPromptConfig()
    if points is None and point_labels is not None:
        raise ValueError("point_labels given without points")
    if points is None and box_xyxy is None and mask is None and polygon is None:
        raise ValueError("no prompt given: pass at least one of points, box_xyxy, mask or polygon")

    coords = labels = None
    if points is not None:
        coords, labels = check_points(points, point_labels, size)
    box = check_box(box_xyxy, size) if box_xyxy is not None else None

    rough = check_mask(mask, size, what="brush mask") if mask is not None else None
    if polygon is not None:
        poly_mask = polygon_prompt_mask(polygon, size)
        rough = poly_mask if rough is None else rough | poly_mask
    mask_input = None
    if rough is not None:
        if box is None:
            box = mask_bbox_xyxy(rough)
        long_side = float(max(box[2] - box[0], box[3] - box[1]))
        gap = max(cfg.min_gap_px, cfg.gap_frac * long_side)
        margin = max(cfg.min_margin_px, cfg.margin_frac * long_side, gap + 1.0)
        positives = mask_interior_points(rough, cfg.n_positive)
        negatives = mask_exterior_points(rough, cfg.n_negative, gap_px=gap, margin_px=margin, avoid=positives)
        extra = np.concatenate([positives, negatives]).astype(np.float32)
        extra_labels = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))]).astype(np.int32)
        coords = extra if coords is None else np.concatenate([coords, extra])
        labels = extra_labels if labels is None else np.concatenate([labels, extra_labels])
        if cfg.use_mask_input:
            mask_input = mask_to_low_res_logits(
                rough, encoder_size=encoder_size, low_res_size=mask_input_size, logit_scale=cfg.logit_scale
            )
    return SamPrompt(
        image_size=size,
        point_coords=coords,
        point_labels=labels,
        box_xyxy=box,
        rough_mask=rough,
        mask_input=mask_input,
    )
