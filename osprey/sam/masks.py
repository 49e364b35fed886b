"""Rough-mask geometry for SAM prompts: polygon fill, mask box, interior/exterior points, mask input.

Pure numpy/OpenCV functions (no torch or segment-anything at import: :func:`mask_to_low_res_logits`
takes SAM's resize rule from :mod:`osprey.sam.build` when called); coordinate conventions are those of :mod:`osprey.sam.prompts`:
pixel (row r, col c) covers ``[c, c+1) x [r, r+1)``, boxes are XYXY with an exclusive end, points
made from a mask are whole ``(X, Y)`` pixel indices, and a polygon covers the pixels whose centre
``(c + 0.5, r + 0.5)`` is inside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "check_polygon",
    "mask_bbox_xyxy",
    "mask_exterior_points",
    "mask_interior_points",
    "mask_to_low_res_logits",
    "rasterize_polygon",
]

_MAX_SAMPLING_CANDIDATES = 4096
# Percent coordinates converted to pixels may land a hair outside the image.
EDGE_TOLERANCE_PX = 1e-3
# Polygon vertices farther out than this are refused: edge arithmetic on them could overflow.
MAX_COORDINATE_PX = 1e15
# The polygon fill works a band of rows at a time: at most this many rows, pixels (their toggle
# counts are int64) and edge crossings (about 40 bytes of temporaries each), so a band needs about
# 2 + 2.5 MiB whatever the polygon and the image.
_BAND_ROWS = 64
_BAND_CELLS = 1 << 18
_BAND_CROSSINGS = 1 << 16


def check_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    """Validate an image size given as (H, W) and return it as two ints."""
    if len(image_size) != 2 or min(image_size) < 1:
        raise ValueError(f"image_size must be (H, W) with H, W >= 1, got {tuple(image_size)}")
    return int(image_size[0]), int(image_size[1])


def check_polygon(vertices_xy: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Validate a polygon given as (x, y) pixel vertices and return it as an (N, 2) float64 array.

    Raises ValueError unless it is (N, 2) with N >= 3 and every coordinate finite and within
    ``MAX_COORDINATE_PX`` of the origin (farther vertices would overflow the edge arithmetic).
    """
    try:
        pts = np.asarray(vertices_xy, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            "polygon must be a list of (x, y) number pairs, e.g. [(0, 0), (4, 0), (0, 3)]"
        ) from None
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"polygon must be an (N, 2) list of (x, y) vertices, got shape {pts.shape}")
    if len(pts) < 3:
        raise ValueError(f"polygon needs at least 3 vertices, got {len(pts)}")
    if not np.isfinite(pts).all() or np.abs(pts).max() > MAX_COORDINATE_PX:
        raise ValueError(
            f"polygon vertices must be finite pixel coordinates within +-{MAX_COORDINATE_PX:.0e}, "
            f"got values from {pts.min()} to {pts.max()}"
        )
    return pts


def rasterize_polygon(
    vertices_xy: np.ndarray | Sequence[Sequence[float]], *, width: int, height: int
) -> np.ndarray:
    """Fill a polygon of (x, y) pixel vertices into an (H, W) bool mask, pixel-centre rule.

    Pixel (row r, col c) is inside when its centre (c + 0.5, r + 0.5) is inside the polygon
    (even-odd rule, so self-intersections cut holes; a centre on a left or top edge is inside, on a
    right or bottom edge outside), so a polygon's pixel count matches its area and polygons that
    share an edge share no pixel. Vertices may lie outside the image: what falls outside is simply
    not drawn. A polygon that covers no pixel centre gives an all-False mask.

    Memory is the mask plus a few MiB, whatever the number of vertices: rows are filled a band at a
    time, from the crossings of the edges that reach the band only.

    Raises:
        ValueError: ``width`` or ``height`` below 1, or vertices refused by :func:`check_polygon`.
    """
    if min(width, height) < 1:
        raise ValueError(f"the mask needs width and height >= 1 pixel, got width={width}, height={height}")
    width, height = int(width), int(height)
    start = check_polygon(vertices_xy)
    end = np.roll(start, -1, axis=0)
    # Half-open rule: an edge crosses the rows whose centre is in [y_lo, y_hi); horizontal edges none.
    y_lo, y_hi = np.minimum(start[:, 1], end[:, 1]), np.maximum(start[:, 1], end[:, 1])
    first_row = np.clip(np.ceil(y_lo - 0.5), 0, height).astype(np.int64)
    stop_row = np.clip(np.ceil(y_hi - 0.5), 0, height).astype(np.int64)
    keep = first_row < stop_row
    start, extent = start[keep], end[keep] - start[keep]
    edges = _Edges(start[:, 0], start[:, 1], extent[:, 0], extent[:, 1], first_row[keep], stop_row[keep])
    mask = np.zeros((height, width), dtype=bool)
    if not len(edges.first_row):
        return mask
    # crossings_before[r]: edge crossings in rows [0, r), to size each band.
    per_row = np.cumsum(
        np.bincount(edges.first_row, minlength=height + 1) - np.bincount(edges.stop_row, minlength=height + 1)
    )[:height]
    crossings_before = np.concatenate([[0], np.cumsum(per_row)])
    max_rows = max(1, min(_BAND_ROWS, _BAND_CELLS // (width + 1)))
    top, last = int(edges.first_row.min()), int(edges.stop_row.max())
    while top < last:
        budget = crossings_before[top] + _BAND_CROSSINGS
        fits = int(np.searchsorted(crossings_before, budget, side="right")) - 1  # last row end within budget
        bottom = min(last, top + max_rows, max(top + 1, fits))
        mask[top:bottom] = _band_parity(edges, top, bottom, width)
        top = bottom
    return mask


@dataclass(frozen=True)
class _Edges:
    """The polygon's E non-horizontal edges: start (x0, y0), extent (dx, dy) and the rows
    [first_row, stop_row) whose centres they cross; (E,) arrays each."""

    x0: np.ndarray
    y0: np.ndarray
    dx: np.ndarray
    dy: np.ndarray
    first_row: np.ndarray
    stop_row: np.ndarray


def _band_parity(edges: _Edges, top: int, bottom: int, width: int) -> np.ndarray:
    """Rows [top, bottom) of the mask, as (rows, W) uint8 0/1: crossings to the left of each centre, mod 2."""
    active = np.flatnonzero((edges.first_row < bottom) & (edges.stop_row > top))
    lo = np.maximum(edges.first_row[active], top)
    counts = np.minimum(edges.stop_row[active], bottom) - lo
    edge = np.repeat(active, counts)  # one entry per (edge, row) crossing
    row = np.repeat(lo - (np.cumsum(counts) - counts), counts) + np.arange(int(counts.sum()))
    t = (row + 0.5 - edges.y0[edge]) / edges.dy[edge]
    x_cross = edges.x0[edge] + t * edges.dx[edge]
    # The crossing toggles inside/outside for every pixel whose centre is at or right of it; column
    # W collects the crossings right of the image.
    first_col = np.clip(np.ceil(x_cross - 0.5), 0, width).astype(np.int64)
    rows = bottom - top
    toggles = np.bincount((row - top) * (width + 1) + first_col, minlength=rows * (width + 1))
    # uint8 wraps around at 256, which keeps the parity, the only thing the even-odd rule needs.
    toggles = toggles.astype(np.uint8).reshape(rows, width + 1)[:, :width]
    return np.cumsum(toggles, axis=1, dtype=np.uint8) & 1


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
    from .build import ResizeLongestSide  # SAM's own resize rule; imported here to keep this module light

    height, width = mask.shape
    in_h, in_w = ResizeLongestSide.get_preprocess_shape(height, width, encoder_size)
    resized = cv2.resize(mask.astype(np.float32), (in_w, in_h), interpolation=cv2.INTER_LINEAR)
    frame = np.zeros((encoder_size, encoder_size), dtype=np.float32)
    frame[:in_h, :in_w] = resized
    low = cv2.resize(frame, (low_res_size[1], low_res_size[0]), interpolation=cv2.INTER_AREA)
    return ((2.0 * np.clip(low, 0.0, 1.0) - 1.0) * logit_scale)[None].astype(np.float32)
