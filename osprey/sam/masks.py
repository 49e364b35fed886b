"""Rough-mask geometry for SAM prompts: polygon fill, mask box, interior/exterior points, mask input.

Pure numpy/OpenCV functions; coordinate conventions are those of :mod:`osprey.sam.prompts`:
pixel (row r, col c) covers ``[c, c+1) x [r, r+1)``, boxes are XYXY with an exclusive end, points
made from a mask are whole ``(X, Y)`` pixel indices, and a polygon covers the pixels whose centre
``(c + 0.5, r + 0.5)`` is inside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from .build import ResizeLongestSide

__all__ = [
    "mask_bbox_xyxy",
    "mask_exterior_points",
    "mask_interior_points",
    "mask_to_low_res_logits",
    "rasterize_polygon",
]

_MAX_SAMPLING_CANDIDATES = 4096
# Percent coordinates converted to pixels may land a hair outside the image.
EDGE_TOLERANCE_PX = 1e-3


def check_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    """Validate an image size given as (H, W) and return it as two ints."""
    if len(image_size) != 2 or min(image_size) < 1:
        raise ValueError(f"image_size must be (H, W) with H, W >= 1, got {tuple(image_size)}")
    return int(image_size[0]), int(image_size[1])


def rasterize_polygon(
    vertices: np.ndarray | Sequence[Sequence[float]], image_size: Sequence[int]
) -> np.ndarray:
    """Fill a polygon of (x, y) pixel vertices into an HxW bool mask, pixel-centre rule.

    Pixel (r, c) is inside when (c + 0.5, r + 0.5) is inside the polygon (even-odd rule, centres
    on left/top edges in, on right/bottom edges out). Raises ValueError for fewer than 3 vertices,
    a vertex outside ``[0, W] x [0, H]``, or a polygon that covers no pixel centre.
    """
    height, width = check_image_size(image_size)
    pts = np.asarray(vertices, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or not np.isfinite(pts).all():
        raise ValueError(f"polygon must be a list of finite (x, y) vertices, got shape {pts.shape}")
    if len(pts) < 3:
        raise ValueError(f"polygon needs at least 3 vertices, got {len(pts)}")
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

    start, end = pts, np.roll(pts, -1, axis=0)
    y_lo, y_hi = np.minimum(start[:, 1], end[:, 1]), np.maximum(start[:, 1], end[:, 1])
    centres_y = np.arange(height, dtype=np.float64)[:, None] + 0.5  # (H, 1)
    # Half-open rule: an edge spans the rows whose centre is in [y_lo, y_hi); horizontal edges none.
    crosses = (centres_y >= y_lo[None, :]) & (centres_y < y_hi[None, :])  # (H, E)
    dy = end[:, 1] - start[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (centres_y - start[None, :, 1]) / dy[None, :]
    x_cross = start[None, :, 0] + t * (end[:, 0] - start[:, 0])[None, :]  # (H, E)
    rows, edges = np.nonzero(crosses)
    # The crossing toggles inside/outside for every pixel whose centre is at or right of it.
    first_col = np.clip(np.ceil(x_cross[rows, edges] - 0.5), 0, width).astype(np.int64)
    toggles = np.zeros((height, width + 1), dtype=np.int32)
    np.add.at(toggles, (rows, first_col), 1)
    mask = (np.cumsum(toggles, axis=1)[:, :width] % 2).astype(bool)
    if not mask.any():
        raise ValueError("polygon covers no pixel centre (it is degenerate or thinner than a pixel)")
    return mask


def mask_bbox_xyxy(mask: np.ndarray) -> np.ndarray:
    """XYXY box of a non-empty HxW bool mask: (min col, min row, max col + 1, max row + 1), float32."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        raise ValueError("mask is empty; it has no bounding box")
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)


def _farthest_points(candidates: np.ndarray, n: int, seeds: np.ndarray) -> np.ndarray:
    """Greedily pick ``n`` candidates (Mx2) each farthest from the seeds (Kx2) and earlier picks."""
    if len(candidates) > _MAX_SAMPLING_CANDIDATES:
        step = int(np.ceil(len(candidates) / _MAX_SAMPLING_CANDIDATES))
        candidates = candidates[::step]
    cand = candidates.astype(np.float64)
    if len(seeds):
        min_d = np.min(
            np.linalg.norm(cand[:, None, :] - seeds[None, :, :].astype(np.float64), axis=2), axis=1
        )
    else:
        min_d = np.full(len(cand), np.inf)
    picked: list[int] = []
    for _ in range(min(n, len(cand))):
        idx = int(np.argmax(min_d))
        if min_d[idx] <= 0:
            break
        picked.append(idx)
        min_d = np.minimum(min_d, np.linalg.norm(cand - cand[idx], axis=1))
    return candidates[picked].reshape(-1, 2)


def mask_interior_points(mask: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` (X, Y) pixel indices inside a non-empty bool mask, as an int64 array (k, 2).

    The first is the maximum of the distance transform (the image border counts as background,
    so it is the pixel deepest inside the mask); the others are spread by farthest-point sampling
    over the deep interior (distance >= half the maximum).
    """
    padded = np.pad(mask, 1).astype(np.uint8)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    peak = float(dist.max())
    # The maximum is often a ridge (e.g. along a rectangle's long axis): take its pixel nearest
    # the mask's centroid, so the first click sits in the middle of the shape.
    ridge_rows, ridge_cols = np.nonzero(dist >= peak - 1e-4)
    all_rows, all_cols = np.nonzero(mask)
    centre_r, centre_c = all_rows.mean(), all_cols.mean()
    best = int(np.argmin((ridge_rows - centre_r) ** 2 + (ridge_cols - centre_c) ** 2))
    row, col = int(ridge_rows[best]), int(ridge_cols[best])
    first = np.array([[col, row]], dtype=np.int64)
    if n <= 1:
        return first
    deep_rows, deep_cols = np.nonzero(dist >= max(1.0, 0.5 * peak))
    others = _farthest_points(np.stack([deep_cols, deep_rows], axis=1), n - 1, first)
    return np.concatenate([first, others.astype(np.int64)], axis=0)


def mask_exterior_points(
    mask: np.ndarray, n: int, *, gap_px: float, margin_px: float, avoid: np.ndarray | None = None
) -> np.ndarray:
    """Up to ``n`` (X, Y) pixel indices outside a bool mask: at least ``gap_px`` from it and inside
    its box expanded by ``margin_px`` (clipped to the image), spread by farthest-point sampling
    away from ``avoid`` (e.g. the positive points). Returns int64 (k, 2); k may be 0 when the mask
    leaves no room (it fills the expanded box).
    """
    if n <= 0:
        return np.zeros((0, 2), dtype=np.int64)
    height, width = mask.shape
    x0, y0, x1, y1 = mask_bbox_xyxy(mask).tolist()
    bx0, by0 = max(0, int(np.ceil(x0 - margin_px))), max(0, int(np.ceil(y0 - margin_px)))
    bx1, by1 = min(width, int(np.ceil(x1 + margin_px))), min(height, int(np.ceil(y1 + margin_px)))
    window = mask[by0:by1, bx0:bx1]
    # Distance to the nearest mask pixel; the window holds every mask pixel, so it is exact.
    dist = cv2.distanceTransform((~window).astype(np.uint8), cv2.DIST_L2, 5)
    rows, cols = np.nonzero(dist >= gap_px)
    candidates = np.stack([cols + bx0, rows + by0], axis=1)
    seeds = avoid if avoid is not None else np.zeros((0, 2))
    return _farthest_points(candidates, n, seeds).astype(np.int64)


def mask_to_low_res_logits(
    mask: np.ndarray,
    *,
    encoder_size: int = 1024,
    low_res_size: tuple[int, int] = (256, 256),
    logit_scale: float = 10.0,
) -> np.ndarray:
    """SAM's low-resolution mask input from an HxW bool mask: 1 x low_res_size float32 logits.

    The mask is resized like the image (longest side to ``encoder_size``), padded bottom/right to
    the square input frame (padding is background), area-averaged down to ``low_res_size`` and
    mapped from coverage ``p`` to ``(2p - 1) * logit_scale``.
    """
    height, width = mask.shape
    in_h, in_w = ResizeLongestSide.get_preprocess_shape(height, width, encoder_size)
    resized = cv2.resize(mask.astype(np.float32), (in_w, in_h), interpolation=cv2.INTER_LINEAR)
    frame = np.zeros((encoder_size, encoder_size), dtype=np.float32)
    frame[:in_h, :in_w] = resized
    low = cv2.resize(frame, (low_res_size[1], low_res_size[0]), interpolation=cv2.INTER_AREA)
    return ((2.0 * np.clip(low, 0.0, 1.0) - 1.0) * logit_scale)[None].astype(np.float32)
