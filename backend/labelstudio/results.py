"""Label Studio <-> mask conversions (pure functions, no I/O).

Coordinate frames:

- Label Studio stores geometry in **percent** of ``original_width``/``original_height``: ``x``, ``y``,
  ``width``, ``height`` of rectangles (``rotation`` in degrees, clockwise on screen, about the
  top-left corner ``(x, y)``), ``x``/``y`` of keypoints, ``points`` ``[[x%, y%], ...]`` of polygons.
- This module's **pixel** coordinates are continuous: pixel column ``i`` covers ``[i, i + 1)``, so
  ``x_px = x_pct / 100 * width`` and a mask whose columns run ``x0..x1`` has box edges ``x0`` and
  ``x1 + 1``. Boxes are ``XYXY`` in these units. Masks are ``(H, W)`` bool arrays.
- Brush masks are Label Studio's RLE (:mod:`backend.labelstudio.rle`).

Result shapes follow what Label Studio 1.23 itself stores: every result of one region (the region
and its per-region Choices/TextArea results) shares the region's ``id``. Label Studio builds a region
from the first result with a new id, so the region result must come before its per-region results
(or each per-region result must repeat the geometry: see ``region_geometry``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime, timezone

import cv2
import numpy as np

from backend.errors import WebhookError
from osprey.sam.masks import rasterize_polygon  # the project's one polygon fill (pixel centres inside)

from .limits import DEFAULT_LIMITS, RECTANGLE_PERCENT_RANGE, PayloadLimits
from .rle import BadRegionError, decode_brush_rle, encode_brush_rle, image_size
from .schema import CLICK_TYPES, REGION_TYPES

logger = logging.getLogger(__name__)

LABELED_TYPES = ("brushlabels", "polygonlabels", "rectanglelabels", "keypointlabels")
_RASTER_ROWS = 64  # rectangles are rasterised this many rows at a time (bounded temporaries)


def finite_number(value, name: str) -> float:
    """``value`` as a float; BadRegionError unless it is a finite int/float (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise BadRegionError(f"{name} must be a number, got {type(value).__name__} {str(value)[:40]}")
    number = _float(value)
    if not math.isfinite(number):
        raise BadRegionError(f"{name} must be finite, got {number!r}")
    return number


def _float(value) -> float:
    """``float(value)``, with ints too large for a float (``10**400``) read as infinity."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _check_rotation(item: dict) -> None:
    rotation = item.get("image_rotation") or 0
    if finite_number(rotation, "image_rotation") % 360 != 0:
        raise BadRegionError(
            f"the region was drawn on an image rotated by {rotation} degrees in Label Studio; rotate the "
            f"image back to 0 degrees (or remove rotateControl from the Image tag) and draw again"
        )


def check_original_size(item: dict, width: int, height: int) -> None:
    """Refuse an item whose ``original_width``/``original_height`` differ from the loaded image.

    Missing sizes are tolerated (Label Studio omits them in some payloads).
    """
    original = (item.get("original_width"), item.get("original_height"))
    if original[0] is None or original[1] is None:
        return
    if (finite_number(original[0], "original_width"), finite_number(original[1], "original_height")) != (
        width,
        height,
    ):
        raise BadRegionError(
            f"the region was drawn on a {original[0]}x{original[1]} image but the task image loads as "
            f"{width}x{height}; the image file changed or its EXIF orientation is read differently"
        )


def mask_from_result(
    result_item: dict, width: int, height: int, *, limits: PayloadLimits = DEFAULT_LIMITS
) -> np.ndarray:
    """The ``(H, W)`` bool mask of a stored region result (brush, polygon or rectangle, labelled or not).

    Per-region results (choices/textarea) that repeat their region's geometry are read too. Raises
    BadRegionError for keypoints, unknown types, rotated images or a size mismatch, and
    PayloadTooLargeError (a BadRegionError) past ``limits``, before the mask is allocated.
    """
    width, height = image_size(width, height)
    limits.check_image_size(width, height)
    if not isinstance(result_item, dict) or not isinstance(result_item.get("value"), dict):
        raise BadRegionError("a result item must be a dict with a 'value' dict")
    _check_rotation(result_item)
    check_original_size(result_item, width, height)
    value, kind = result_item["value"], str(result_item.get("type", "")).lower()
    if kind.startswith("brush") or (kind not in REGION_TYPES and "rle" in value):
        if value.get("format", "rle") != "rle":
            raise BadRegionError(f"brush format {value.get('format')!r} is not supported; expected 'rle'")
        return decode_brush_rle(value.get("rle"), width, height)
    if kind.startswith("polygon") or (kind not in REGION_TYPES and "points" in value):
        return rasterize_polygon(
            polygon_to_pixels(value, width=width, height=height, max_points=limits.max_polygon_points),
            width=width,
            height=height,
        )
    if kind.startswith("rectangle") or (kind not in REGION_TYPES and "height" in value and "x" in value):
        return rasterize_rectangle(value, width=width, height=height)
    raise BadRegionError(
        f"result type {kind!r} has no area to turn into a mask; expected one of {', '.join(REGION_TYPES)}"
    )


def _percent(value: dict, key: str) -> float:
    if not isinstance(value, dict) or key not in value:
        raise BadRegionError(f"the region value has no {key!r} (percent of the image size)")
    return finite_number(value[key], key)


def keypoint_to_pixels(value: dict, *, width: int, height: int) -> tuple[float, float]:
    """``(x_px, y_px)`` of a keypoint value ``{x, y}`` given in percent; refuses points outside the image."""
    x_pct, y_pct = _percent(value, "x"), _percent(value, "y")
    if not (0 <= x_pct <= 100 and 0 <= y_pct <= 100):
        raise BadRegionError(f"the point ({x_pct:.2f}%, {y_pct:.2f}%) lies outside the image (0..100%)")
    return x_pct / 100 * width, y_pct / 100 * height


def rectangle_corners(value: dict, *, width: int, height: int) -> np.ndarray:
    """``(4, 2)`` pixel corners (TL, TR, BR, BL) of a rectangle value, rotated about its top-left corner.

    Percent values outside ``RECTANGLE_PERCENT_RANGE`` (more than an image size beyond the image) are
    refused as corrupt.
    """
    low, high = RECTANGLE_PERCENT_RANGE
    for key in ("x", "y", "width", "height"):
        if not low <= _percent(value, key) <= high:
            raise BadRegionError(
                f"the rectangle's {key} is {value[key]!r}% of the image; expected {low:g}..{high:g}%"
            )
    x, y = _percent(value, "x") / 100 * width, _percent(value, "y") / 100 * height
    w, h = _percent(value, "width") / 100 * width, _percent(value, "height") / 100 * height
    if w <= 0 or h <= 0:
        raise BadRegionError(f"the rectangle has zero area ({value.get('width')}% x {value.get('height')}%)")
    theta = math.radians(finite_number(value.get("rotation") or 0, "rotation"))
    cos, sin = math.cos(theta), math.sin(theta)
    return np.array(
        [
            (x, y),
            (x + w * cos, y + w * sin),
            (x + w * cos - h * sin, y + w * sin + h * cos),
            (x - h * sin, y + h * cos),
        ]
    )


def rectangle_to_xyxy(value: dict, *, width: int, height: int) -> tuple[float, float, float, float]:
    """Pixel box ``XYXY`` of a rectangle value: the axis-aligned bounds of the (rotated) rectangle, clipped."""
    corners = rectangle_corners(value, width=width, height=height)
    x0, y0 = np.clip(corners.min(axis=0), 0, (width, height))
    x1, y1 = np.clip(corners.max(axis=0), 0, (width, height))
    if x1 <= x0 or y1 <= y0:
        raise BadRegionError("the rectangle lies outside the image")
    return float(x0), float(y0), float(x1), float(y1)


def rasterize_rectangle(value: dict, *, width: int, height: int) -> np.ndarray:
    """``(H, W)`` bool mask of the pixels whose centres lie inside a (rotated) rectangle value."""
    corners = rectangle_corners(value, width=width, height=height)
    u_axis, v_axis = corners[1] - corners[0], corners[3] - corners[0]
    x0, y0 = np.floor(np.clip(corners.min(axis=0), 0, (width, height))).astype(int)
    x1, y1 = np.ceil(np.clip(corners.max(axis=0), 0, (width, height))).astype(int)
    mask = np.zeros((height, width), dtype=bool)
    for top in range(y0, y1, _RASTER_ROWS):  # a few rows at a time: the temporaries are 48 bytes a pixel
        bottom = min(top + _RASTER_ROWS, y1)
        yy, xx = np.mgrid[top:bottom, x0:x1] + 0.5
        offsets = np.stack([xx - corners[0][0], yy - corners[0][1]], axis=-1)  # (h, w, 2)
        u = offsets @ u_axis / (u_axis @ u_axis)  # position along the top edge, 0..1 inside
        v = offsets @ v_axis / (v_axis @ v_axis)
        mask[top:bottom, x0:x1] = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    return mask


def mask_to_rectangle_value(mask: np.ndarray) -> dict:
    """Percent ``{x, y, width, height, rotation: 0}`` of the mask's bounding box (pixel edges)."""
    mask = np.asarray(mask) > 0
    if mask.ndim != 2 or not mask.any():
        raise BadRegionError("the mask is empty; there is no box to return")
    height, width = mask.shape
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    x0, x1, y0, y1 = int(xs[0]), int(xs[-1]) + 1, int(ys[0]), int(ys[-1]) + 1
    return {
        "x": x0 / width * 100,
        "y": y0 / height * 100,
        "width": (x1 - x0) / width * 100,
        "height": (y1 - y0) / height * 100,
        "rotation": 0,
    }


def polygon_to_pixels(
    value: dict, *, width: int, height: int, max_points: int = DEFAULT_LIMITS.max_polygon_points
) -> list[tuple[float, float]]:
    """Pixel vertices of a polygon value ``{points: [[x%, y%], ...]}`` (clipped to the image); a polygon of
    more than ``max_points`` vertices is refused (PayloadTooLargeError) before any is read."""
    points = value.get("points") if isinstance(value, dict) else None
    if not isinstance(points, list) or len(points) < 3:
        raise BadRegionError("a polygon needs 'points' with at least 3 [x%, y%] pairs")
    PayloadLimits(max_polygon_points=max_points).check_polygon(points)
    vertices = []
    for index, point in enumerate(points):
        if not isinstance(point, (list, tuple)) or len(point) != 2:
            raise BadRegionError(f"polygon point {index} must be [x%, y%], got {point!r}")
        x_pct, y_pct = (min(max(finite_number(v, f"polygon point {index}"), 0.0), 100.0) for v in point)
        vertices.append((x_pct / 100 * width, y_pct / 100 * height))
    return vertices


def mask_to_polygon_value(mask: np.ndarray, *, max_points: int = 128, tolerance_px: float = 1.0) -> dict:
    """Percent ``{points, closed: True}`` outlining the mask's largest connected component.

    The outer contour (holes and smaller components dropped: a Label Studio polygon has one ring) is
    traced on the component upscaled 2x, so its vertices sit a quarter pixel inside the boundary pixels'
    edges: read back by the pixel-centre rule (:func:`rasterize_polygon`) the unsimplified outline gives
    exactly the component's pixels. It is then simplified with ``cv2.approxPolyDP``, starting at
    ``tolerance_px`` and loosening until at most ``max_points`` vertices remain.
    """
    mask = np.asarray(mask) > 0
    if mask.ndim != 2 or not mask.any():
        raise BadRegionError("the mask is empty; there is no polygon to return")
    if max_points < 3:
        raise ValueError(f"max_points must be at least 3, got {max_points}")
    height, width = mask.shape
    _, components, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = (int(v) for v in stats[biggest, :4])
    crop = (components[y : y + h, x : x + w] == biggest).astype(np.uint8)
    doubled = np.pad(np.repeat(np.repeat(crop, 2, axis=0), 2, axis=1), 1)  # a border for findContours
    contours, _ = cv2.findContours(doubled, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contour = max(contours, key=len)
    epsilon, approx = 2.0 * tolerance_px, contour  # in doubled pixels
    while True:
        approx = cv2.approxPolyDP(contour, epsilon, True) if epsilon > 0 else contour
        if len(approx) <= max_points:
            break
        epsilon = max(epsilon, 1.0) * 1.5
    if len(approx) < 3:  # a tiny component simplified to a line: its outline as traced (>= 4 points)
        approx = contour
    # doubled pixel p (after the 1-pixel border) has its centre at (p - 1 + 0.5) / 2 in crop pixels
    points = (approx.reshape(-1, 2).astype(np.float64) - 0.5) / 2.0 + (x, y)
    return {
        "points": [[float(px / width * 100), float(py / height * 100)] for px, py in points],
        "closed": True,
    }


@dataclass
class AnnotatorInput:
    """The annotator's prompt from an interactive request, in pixels of the loaded image.

    ``points_xy`` is ``(N, 2)`` float ``(X, Y)``; ``point_labels`` is ``(N,)`` int, 1 positive and 0
    negative; ``box_xyxy`` is ``(4,)`` float ``XYXY`` (the last rectangle wins); ``brush_mask`` is the
    ``(H, W)`` bool union of brush strokes; ``polygon`` is a list of ``(x, y)`` vertices (the last
    polygon wins). ``label`` is the first label the annotator picked on a smart tool and
    ``region_id``/``from_name`` come from the first context item.
    """

    width: int
    height: int
    points_xy: np.ndarray
    point_labels: np.ndarray
    box_xyxy: np.ndarray | None = None
    brush_mask: np.ndarray | None = None
    polygon: list[tuple[float, float]] | None = None
    label: str | None = None
    region_id: str | None = None
    from_name: str | None = None

    def polygon_mask(self) -> np.ndarray | None:
        """The polygon rasterised to an ``(H, W)`` bool mask, or None without a polygon."""
        if self.polygon is None:
            return None
        return rasterize_polygon(self.polygon, width=self.width, height=self.height)

    def mask_prompt(self) -> np.ndarray | None:
        """Union of the brush strokes and the polygon as one ``(H, W)`` bool mask, or None."""
        masks = [m for m in (self.brush_mask, self.polygon_mask()) if m is not None]
        return np.logical_or.reduce(masks) if masks else None


CONTEXT_TYPES = (*CLICK_TYPES, *REGION_TYPES)


def parse_context(
    context: dict, *, width: int, height: int, limits: PayloadLimits = DEFAULT_LIMITS
) -> AnnotatorInput:
    """Read Label Studio's interactive ``context`` (``{"result": [...]}``) for an image of this size.

    Raises BadRegionError for an empty or malformed context, unknown item types, points outside the
    image, zero-area boxes, empty brush strokes, rotated images or a size mismatch between the item's
    ``original_width``/``original_height`` and ``width``/``height``; PayloadTooLargeError past ``limits``
    (items, keypoints, polygon vertices), before any item is read.
    """
    width, height = image_size(width, height)
    items = context.get("result") if isinstance(context, dict) else None
    if not isinstance(items, list) or not items:
        raise BadRegionError('the context must be {"result": [...]} with at least one item from a smart tool')
    limits.check_context(context)
    parsed = AnnotatorInput(
        width=width, height=height, points_xy=np.zeros((0, 2)), point_labels=np.zeros(0, int)
    )
    points, labels = [], []
    for index, item in enumerate(items):
        kind = str(item.get("type", "")).lower() if isinstance(item, dict) else ""
        try:
            if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
                raise BadRegionError("each item must be a dict with a 'value' dict")
            if kind not in CONTEXT_TYPES:
                raise BadRegionError(
                    f"type {kind!r} is not a prompt; expected one of {', '.join(CONTEXT_TYPES)}"
                )
            _check_rotation(item)
            check_original_size(item, width, height)
            value = item["value"]
            if kind.startswith("keypoint"):
                points.append(keypoint_to_pixels(value, width=width, height=height))
                labels.append(0 if item.get("is_positive") is not None and not item["is_positive"] else 1)
            elif kind.startswith("rectangle"):
                parsed.box_xyxy = np.array(rectangle_to_xyxy(value, width=width, height=height))
            elif kind.startswith("polygon"):
                parsed.polygon = polygon_to_pixels(
                    value, width=width, height=height, max_points=limits.max_polygon_points
                )
            else:
                stroke = mask_from_result(item, width, height, limits=limits)
                if not stroke.any():
                    raise BadRegionError("the brush stroke is empty")
                parsed.brush_mask = stroke if parsed.brush_mask is None else parsed.brush_mask | stroke
        except BadRegionError as error:
            raise BadRegionError(f"context item {index} ({kind or 'no type'}): {error}") from None
        chosen = value.get(kind)
        if parsed.label is None and isinstance(chosen, list) and chosen and isinstance(chosen[0], str):
            parsed.label = chosen[0]
    if points:
        parsed.points_xy, parsed.point_labels = (
            np.array(points, dtype=np.float64),
            np.array(labels, dtype=np.int64),
        )
    first = items[0]
    parsed.region_id = str(first["id"]) if first.get("id") is not None else None
    parsed.from_name = first.get("from_name")
    return parsed


def _result_base(region_id: str, from_name: str, to_name: str, kind: str, score: float) -> dict:
    if not isinstance(region_id, str) or not region_id:
        raise ValueError(f"region_id must be a non-empty string, got {region_id!r}")
    if not from_name or not to_name:
        raise ValueError(
            f"from_name and to_name must name tags of the label config, got {from_name!r}, {to_name!r}"
        )
    score = float(score)
    if not math.isfinite(score):
        raise ValueError(f"score must be finite, got {score}")
    return {"id": region_id, "from_name": from_name, "to_name": to_name, "type": kind, "score": score}


def region_result(
    *,
    mask: np.ndarray,
    tool: str,
    from_name: str,
    to_name: str,
    width: int,
    height: int,
    label: str | None,
    score: float,
    region_id: str,
    max_polygon_points: int = 128,
) -> dict:
    """A Label Studio result item for ``mask`` drawn with ``tool`` (a tag type such as ``BrushLabels``).

    brush: ``value {format: "rle", rle}``; polygon: ``{points, closed: true}``; rectangle: ``{x, y,
    width, height, rotation: 0}``; the labelled variants add ``value[type] = [label]``. Raises
    BadRegionError for an empty mask, ValueError for inconsistent arguments.
    """
    width, height = image_size(width, height)
    kind = str(tool).lower()
    if kind not in REGION_TYPES:
        raise ValueError(f"tool {tool!r} cannot hold a region; expected one of {', '.join(REGION_TYPES)}")
    mask = np.asarray(mask)
    if mask.shape != (height, width):
        raise ValueError(
            f"mask shape {mask.shape} does not match the image (height, width) = {(height, width)}"
        )
    if not mask.any():
        raise BadRegionError("the mask is empty; there is no region to return")
    if kind.startswith("brush"):
        value = {"format": "rle", "rle": encode_brush_rle(mask)}
    elif kind.startswith("polygon"):
        value = mask_to_polygon_value(mask, max_points=max_polygon_points)
    else:
        value = mask_to_rectangle_value(mask)
    if kind in LABELED_TYPES:
        if not isinstance(label, str) or not label:
            raise ValueError(f"a {kind} region needs one of the tool's labels, got {label!r}")
        value[kind] = [label]
    elif label is not None:
        raise ValueError(f"a plain {kind} tool has no labels; pass label=None (got {label!r})")
    result = _result_base(region_id, from_name, to_name, kind, score)
    result.update(original_width=width, original_height=height, image_rotation=0, value=value, readonly=False)
    return result


def region_geometry(region: dict) -> dict:
    """The geometry fields of a region result's value (its labels removed), for per-region results."""
    return {key: item for key, item in region["value"].items() if not key.endswith("labels")}


def choices_result(
    *,
    region_id: str,
    from_name: str,
    to_name: str,
    choices: list[str],
    score: float,
    geometry: dict | None = None,
) -> dict:
    """A per-region Choices result (``type "choices"``, ``value {choices}``) linked to the region by id.

    ``geometry`` (see ``region_geometry``) is copied into the value as Label Studio does when it saves
    annotations; it is optional when the region result precedes this one in the result list.
    """
    if isinstance(choices, str) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"choices must be a non-empty list of label strings, got {choices!r}")
    result = _result_base(region_id, from_name, to_name, "choices", score)
    result.update(value={**(geometry or {}), "choices": list(choices)}, readonly=False)
    return result


def textarea_result(
    *, region_id: str, from_name: str, to_name: str, text: str, score: float, geometry: dict | None = None
) -> dict:
    """A per-region TextArea result (``type "textarea"``, ``value {text: [text]}``) linked by id."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text must be a non-empty string, got {text!r}")
    result = _result_base(region_id, from_name, to_name, "textarea", score)
    result.update(value={**(geometry or {}), "text": [text]}, readonly=False)
    return result


# ---- predictions as recorded ----------------------------------------------------------------------


@dataclass(frozen=True)
class PredictedRegion:
    """A region (``kind="region"``) or the whole-task fields (``kind="task"``) of a recorded prediction.

    ``items`` are the Label Studio result items that carry ``region_id``; a region's own item is first.
    """

    region_id: str
    model_version: str
    source: str
    kind: str
    items: list[dict]
    created_at: float


def prediction_regions(
    result: list[dict], *, model_version: str, created_at: float = 0.0, source: str = "batch"
) -> list[PredictedRegion]:
    """A prediction's result items grouped as ``TrainingStore.record_prediction`` records them: one
    ``PredictedRegion`` per ``id``, a region item (brush/polygon/rectangle) first with its per-region
    items, and groups without a region item as whole-task rows (``kind="task"``)."""
    groups: dict[str, list[dict]] = {}
    for item in result:
        if isinstance(item, dict) and item.get("id") is not None:
            groups.setdefault(str(item["id"]), []).append(item)
    out = []
    for region_id, items in groups.items():
        items.sort(key=lambda i: str(i.get("type", "")).lower() not in REGION_TYPES)
        kind = "region" if str(items[0].get("type", "")).lower() in REGION_TYPES else "task"
        out.append(PredictedRegion(region_id, str(model_version), source, kind, items, created_at))
    return out


# ---- annotations --------------------------------------------------------------------------------------


def annotation_timestamp(annotation: dict) -> float:
    """Label Studio's ``updated_at`` (else ``created_at``) as POSIX seconds; ISO 8601, naive means UTC.

    Raises WebhookError (a ValueError) when neither is a readable time.
    """
    value = annotation.get("updated_at") or annotation.get("created_at")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = _float(value)
        if not math.isfinite(seconds):
            raise WebhookError(
                f"'annotation.updated_at' must be a finite time (ISO 8601 or POSIX seconds), got {seconds!r}"
            )
        return seconds
    if not isinstance(value, str):
        raise WebhookError(
            "'annotation.updated_at' is missing; expected an ISO 8601 time such as '2025-05-01T12:00:00Z'"
        )
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise WebhookError(f"'annotation.updated_at' is not an ISO 8601 time: {value[:40]!r}") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()
