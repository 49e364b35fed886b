"""One fixed-length feature vector per region, for the fast per-project head (:mod:`osprey.learning.head`).

Layout of the ``(R, F)`` float32 matrix returned by :func:`region_features`, in this order (see
:func:`feature_layout` for the group sizes of a given model):

- ``res2``, ``res3``, ``res4``, ``res5``: the ConvNeXt CLIP feature maps of the four trunk stages,
  averaged inside the mask exactly as Osprey's own extractor pools them
  (:func:`osprey.model.extractor.mask_pool`), each level L2-normalised on its own (so every level has the
  same weight whatever its channel count or activation scale). These carry the semantics: on the
  trained CLIP tower they separate "dog" from "cat" linearly.
- ``geometry`` (12): cheap descriptors every segmentation carries, computed with OpenCV on the mask
  at the image's resolution:

  ====================  ===================================================================
  ``area_fraction``     mask pixels / image pixels
  ``extent``            mask pixels / bounding-box pixels (axis-aligned square 1, triangle ~0.5)
  ``log_aspect``        ``log(bbox width / bbox height)`` (0 for a square box; symmetric)
  ``circularity``       ``4 pi A / P^2`` of the outer contours, A their polygon area and P the
                        perimeter after a 1-pixel polygon simplification, which removes the
                        pixel staircase: disc ~1, square pi/4, equilateral triangle ~0.6;
                        0 for masks too thin to have an area
  ``solidity``          polygon area / convex-hull area (1 for convex shapes)
  ``hu1`` .. ``hu7``    Hu's seven moment invariants (translation, scale and rotation invariant),
                        scaled as ``sign(h) |h|^(1/d)``, ``d`` the invariant's degree in the
                        normalised central moments (1, 2, 2, 2, 4, 3, 4), so all seven are
                        on the scale of a moment. Not the usual ``-sign(h) log10|h|``: that
                        maps the digitisation noise of ideally-zero invariants (a square's
                        hu2..hu7 come out anywhere in 1e-14..1e-6) to values 8 units apart,
                        and jumps when a near-zero invariant changes sign; measured on the
                        synthetic shapes task, it turned squares into circles
  ====================  ===================================================================

- ``colour`` (3): mean R, G, B inside the mask, divided by 255.

Why not the CLIP features alone: geometry and colour are meaningful on *any* backbone, random
weights included, and a linear head picks them up from a handful of accepted labels ("round",
"small", "red", "pole-shaped"), while the 2880 CLIP dimensions of the 7B model need more examples
to pin down. Together the head is useful from the first labels and keeps improving as the project
accumulates them. The vector is computed from the cached :class:`~osprey.inference.fast.EncodedImage`, so it
costs no extra vision forward beyond what labelling the image already paid.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image

from osprey.inference.fast import EncodedImage
from osprey.inference.region_model import pooled_features
from osprey.model.preprocess import stack_masks, to_rgb_array

logger = logging.getLogger(__name__)

FEATURES_VERSION = 1
GEOMETRY_NAMES = (
    "area_fraction",
    "extent",
    "log_aspect",
    "circularity",
    "solidity",
    *(f"hu{i}" for i in range(1, 8)),
)
COLOUR_NAMES = ("mean_r", "mean_g", "mean_b")
_HU_DEGREE = np.array([1.0, 2.0, 2.0, 2.0, 4.0, 3.0, 4.0])  # degree of each invariant in the moments


@dataclass(frozen=True)
class FeatureLayout:
    """Named, contiguous groups of a region feature vector and the vision tower that produced it.

    Two heads (or a head and a model) are compatible when their layouts are equal: same
    ``version``, same ``backbone`` (the open_clip model name; LoRA versions of the LLM keep it) and
    the same group sizes.
    """

    groups: tuple[tuple[str, int], ...]
    backbone: str
    version: int = FEATURES_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple((str(n), int(d)) for n, d in self.groups))
        if not self.groups or any(d < 1 for _, d in self.groups):
            raise ValueError(f"feature groups must be non-empty with sizes >= 1, got {self.groups}")

    @property
    def dim(self) -> int:
        return sum(d for _, d in self.groups)

    def slices(self) -> dict[str, slice]:
        """Group name -> its columns in the feature matrix."""
        out, start = {}, 0
        for name, size in self.groups:
            out[name] = slice(start, start + size)
            start += size
        return out

    def to_dict(self) -> dict:
        return {"groups": [list(g) for g in self.groups], "backbone": self.backbone, "version": self.version}

    @classmethod
    def from_dict(cls, data: dict) -> FeatureLayout:
        return cls(
            groups=tuple(tuple(g) for g in data["groups"]),
            backbone=data["backbone"],
            version=int(data["version"]),
        )


def feature_layout(model) -> FeatureLayout:
    """The layout of :func:`region_features` for ``model`` (a
    :class:`~osprey.inference.region_model.RegionModel`): its feature maps, then geometry and colour."""
    groups = list(model.feature_levels())
    groups += [("geometry", len(GEOMETRY_NAMES)), ("colour", len(COLOUR_NAMES))]
    return FeatureLayout(groups=tuple(groups), backbone=model.feature_backbone)


def _signed_root(hu: np.ndarray) -> np.ndarray:
    return np.sign(hu) * np.abs(hu) ** (1.0 / _HU_DEGREE)


def mask_geometry(mask: np.ndarray) -> np.ndarray:
    """The 12 geometry descriptors of one ``(H, W)`` non-empty binary mask, in ``GEOMETRY_NAMES``
    order, as float32 (see the module docstring for definitions)."""
    mask = np.asarray(mask) > 0
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("mask is empty: it selects no pixel; geometry needs at least one pixel")
    area = float(ys.size)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box_h, box_w = float(y1 - y0), float(x1 - x0)
    # a 1-pixel zero border closes contours that touch the crop's edge
    crop = np.pad(mask[y0:y1, x0:x1].astype(np.uint8), 1)
    contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    polys = [cv2.approxPolyDP(c, 1.0, True) for c in contours]
    poly_area = sum(abs(cv2.contourArea(c)) for c in contours)
    perimeter = sum(cv2.arcLength(p, True) for p in polys)
    hull_area = abs(cv2.contourArea(cv2.convexHull(np.concatenate(contours))))
    circularity = 4.0 * math.pi * poly_area / perimeter**2 if perimeter > 0 and poly_area > 0 else 0.0
    solidity = poly_area / hull_area if hull_area > 0 else 1.0
    hu = cv2.HuMoments(cv2.moments(crop, binaryImage=True)).ravel()
    out = [
        area / mask.size,
        area / (box_h * box_w),
        math.log(box_w / box_h),
        min(circularity, 1.0),
        min(solidity, 1.0),
        *_signed_root(hu),
    ]
    return np.asarray(out, dtype=np.float32)


def _mean_colours(rgb: np.ndarray, masks: torch.Tensor) -> np.ndarray:
    """``(R, 3)`` mean RGB / 255 inside each mask of ``masks (R, H, W)``."""
    flat = masks.reshape(masks.shape[0], -1).numpy()  # (R, H*W)
    pixels = rgb.reshape(-1, 3).astype(np.float32) / 255.0  # (H*W, 3)
    return (flat @ pixels) / flat.sum(axis=1, keepdims=True)


def region_features(
    osprey,
    image: Image.Image | np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray,
    *,
    encoded: EncodedImage | None = None,
) -> np.ndarray:
    """Feature vectors of regions of one image (layout: module docstring, :func:`feature_layout`).

    Args:
        osprey: a :class:`~osprey.inference.region_model.RegionModel` (Osprey or PixelRefer-Lite).
        image: ``(H, W, 3)`` uint8 RGB array or a PIL image.
        masks: ``(H, W)`` binary masks at the image's resolution, each non-empty.
        encoded: the image's :class:`~osprey.inference.fast.EncodedImage`; by default it comes from
            ``osprey.encode_image`` (its cache, when it has one), so labelling and feature
            extraction share one vision forward.

    Returns:
        ``(R, F)`` float32, ``F = feature_layout(osprey).dim`` (615 for ``tiny``, 2895 for 7B).
    """
    rgb = to_rgb_array(image)
    mask_t = stack_masks(masks, image_hw=rgb.shape[:2])  # (R, H, W) float, validated
    encoded = encoded or osprey.encode_image(rgb)
    if tuple(encoded.image_hw) != tuple(rgb.shape[:2]):
        raise ValueError(
            f"encoded image is {tuple(encoded.image_hw)} (H, W) but the image is {rgb.shape[:2]}; "
            "pass the EncodedImage of this image or leave encoded=None"
        )
    pooled = pooled_features(osprey, encoded, mask_t)
    geometry = np.stack([mask_geometry(m) for m in mask_t.numpy()])
    colours = _mean_colours(rgb, mask_t)
    return np.concatenate([pooled, geometry, colours], axis=1).astype(np.float32)
