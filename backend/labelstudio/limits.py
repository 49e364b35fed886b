"""Caps on what a Label Studio payload may make the backend allocate, checked before anything is decoded.

A region result says how large its image is (``original_width``/``original_height``) and the backend
builds an ``(H, W)`` mask of that size, so a few bytes of JSON can ask for gigabytes. ``PayloadLimits``
bounds every such claim: pixels per claimed image (the same cap as a loaded image,
``OSPREY_MAX_IMAGE_PIXELS``), vertices per polygon, clicks per interactive request and regions per
annotation (or per task, or per interactive request). Brush RLE is bounded by the claimed size: its
header must count ``W * H * 4`` values and its length what those values can take
(:func:`backend.labelstudio.rle.decode_brush_rle`). The messages name the setting to raise and never
carry the payload.
"""

from __future__ import annotations

from dataclasses import dataclass

from backend.errors import SettingsError

from .rle import BadRegionError

RECTANGLE_PERCENT_RANGE = (-100.0, 200.0)  # a rectangle may overhang its image by at most one image size


class PayloadTooLargeError(BadRegionError):
    """A region or request larger than the backend's limits (answered 413); the message names the limit."""

    status = 413


@dataclass(frozen=True)
class PayloadLimits:
    """The caps, each with its setting: ``max_image_pixels`` (``OSPREY_MAX_IMAGE_PIXELS``),
    ``max_polygon_points`` (``OSPREY_MAX_POLYGON_POINTS``), ``max_prompt_points``
    (``OSPREY_MAX_PROMPT_POINTS``: keypoints per interactive request) and ``max_regions``
    (``OSPREY_MAX_REGIONS``: regions per annotation, per task and items per interactive request)."""

    max_image_pixels: int = 100_000_000
    max_polygon_points: int = 10_000
    max_prompt_points: int = 100
    max_regions: int = 1_000

    def __post_init__(self) -> None:
        for name in ("max_image_pixels", "max_polygon_points", "max_prompt_points", "max_regions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingsError(f"OSPREY_{name.upper()} must be a positive integer, got {value!r}")
        if self.max_polygon_points < 3:
            raise SettingsError("OSPREY_MAX_POLYGON_POINTS must be at least 3 (a polygon has three vertices)")

    def check_image_size(self, width: int, height: int) -> None:
        """Refuse a claimed ``width x height`` (positive ints) over ``max_image_pixels``."""
        if width * height > self.max_image_pixels:
            raise PayloadTooLargeError(
                f"the region claims a {width}x{height} image ({width * height} pixels), more than "
                f"OSPREY_MAX_IMAGE_PIXELS={self.max_image_pixels}; nothing was decoded"
            )

    def check_polygon(self, points: list) -> None:
        """Refuse a polygon ``points`` list longer than ``max_polygon_points``."""
        if len(points) > self.max_polygon_points:
            raise PayloadTooLargeError(
                f"the polygon has {len(points)} points, more than OSPREY_MAX_POLYGON_POINTS="
                f"{self.max_polygon_points}"
            )

    def check_regions(self, count: int, where: str) -> None:
        """Refuse ``count`` regions in one ``where`` (e.g. ``"annotation 12"``) over ``max_regions``."""
        if count > self.max_regions:
            raise PayloadTooLargeError(
                f"{where} has {count} regions, more than OSPREY_MAX_REGIONS={self.max_regions}"
            )

    def check_context(self, context: dict) -> None:
        """Refuse an interactive ``context`` (``{"result": [...]}``) with more items than ``max_regions``,
        more keypoints than ``max_prompt_points`` or an item whose claimed image is over the pixel cap.
        Malformed items are left to :func:`backend.labelstudio.results.parse_context`."""
        items = context.get("result") if isinstance(context, dict) else None
        if not isinstance(items, list):
            return
        self.check_regions(len(items), "the interactive request (params.context.result)")
        points = sum(
            1 for i in items if isinstance(i, dict) and str(i.get("type", "")).lower().startswith("keypoint")
        )
        if points > self.max_prompt_points:
            raise PayloadTooLargeError(
                f"the interactive request has {points} keypoints, more than OSPREY_MAX_PROMPT_POINTS="
                f"{self.max_prompt_points}"
            )
        for item in items:
            if isinstance(item, dict):
                width, height = item.get("original_width"), item.get("original_height")
                if _positive_int(width) and _positive_int(height):
                    self.check_image_size(width, height)


DEFAULT_LIMITS = PayloadLimits()


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
