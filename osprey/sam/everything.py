"""Segment everything: SAM's automatic mask generator on the cached image embedding.

:class:`SamEverything` drives ``segment_anything``'s ``SamAutomaticMaskGenerator`` (grid of
point prompts, IoU and stability filtering, box NMS, small-region clean-up); its
predictor's ``set_image`` takes the embedding from the shared
:class:`~osprey.sam.embedding.SamImageEmbedder`. So an image that was clicked on is not
re-encoded, and segment-everything then clicks are not either. With ``crop_n_layers > 0`` the
generator also encodes crops of the image; those are encoded directly, not cached, so they do not
push interactive images out of the cache. The only other change to the generator: RLEs are
shared rather than deep-copied when its batches are concatenated (see ``_SharedRle``); the
output is identical to upstream's (a test compares them).

Every call builds its own generator and predictor (cheap: a point grid), so calls from several
threads do not share per-image state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from osprey.runtime.steps import step_boundary

from .build import MaskData, SamAutomaticMaskGenerator, SamPredictor
from .embedding import SamImageEmbedder, check_image
from .masks import mask_bbox_xyxy

__all__ = ["EverythingOptions", "SamEverything", "SegmentedRegion"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EverythingOptions:
    """Settings of segment-everything (SAM's defaults, tuned for ViT-H, except ``max_masks``).

    Attributes:
        points_per_side: the point grid is points_per_side x points_per_side over the image.
        points_per_batch: points decoded at once (memory vs speed).
        pred_iou_thresh: keep masks whose predicted IoU is above this (0 disables).
        stability_score_thresh: keep masks whose stability score is at least this (0 disables).
        stability_score_offset: logit offset of the stability score.
        box_nms_thresh: box IoU above which the lower-scored duplicate is dropped.
        min_mask_region_area: remove islands and holes smaller than this many pixels, then drop
            masks smaller than it (0 disables both).
        max_masks: keep at most this many masks, the first in the output order (None: all).
        crop_n_layers: extra layers of image crops (0: the whole image only, fully cached).
    """

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    min_mask_region_area: int = 0
    max_masks: int | None = 100
    crop_n_layers: int = 0

    def __post_init__(self) -> None:
        for name in ("points_per_side", "points_per_batch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh"):
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.stability_score_offset <= 0:
            raise ValueError(f"stability_score_offset must be > 0, got {self.stability_score_offset}")
        if self.min_mask_region_area < 0:
            raise ValueError(f"min_mask_region_area must be >= 0, got {self.min_mask_region_area}")
        if self.max_masks is not None and self.max_masks < 1:
            raise ValueError(f"max_masks must be >= 1 or None, got {self.max_masks}")
        if self.crop_n_layers < 0:
            raise ValueError(f"crop_n_layers must be >= 0, got {self.crop_n_layers}")


@dataclass(frozen=True)
class SegmentedRegion:
    """One mask found by segment-everything.

    Attributes:
        mask: HxW bool at the original image size.
        bbox_xyxy: (min col, min row, max col + 1, max row + 1) in pixels.
        area: number of mask pixels.
        predicted_iou: SAM's estimate of the mask's quality (the output's sort score).
        stability_score: stability under +-offset changes of the logit threshold.
        point_xy: (X, Y) pixel of the grid point that prompted the mask.
    """

    mask: np.ndarray
    bbox_xyxy: tuple[int, int, int, int]
    area: int
    predicted_iou: float
    stability_score: float
    point_xy: tuple[float, float]


class _CachedPredictor(SamPredictor):
    """A ``SamPredictor`` whose ``set_image`` reads the embedding cache instead of encoding."""

    def __init__(self, embedder: SamImageEmbedder, full_size: tuple[int, int]) -> None:
        super().__init__(embedder.sam)
        self._embedder = embedder
        self._full_size = full_size

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        if image_format != "RGB":
            raise ValueError(f"image_format must be 'RGB', got {image_format!r}")
        is_full_image = tuple(image.shape[:2]) == self._full_size
        # Crops (crop_n_layers > 0) are encoded directly, see the module docstring.
        image = np.ascontiguousarray(image)
        embedding = self._embedder.embed(image) if is_full_image else self._embedder.encode(image)
        self.reset_image()
        self.features = embedding.features
        self.original_size = embedding.original_size
        self.input_size = embedding.input_size
        self.is_image_set = True

    def predict_torch(self, *args, **kwargs):
        out = super().predict_torch(*args, **kwargs)
        step_boundary()  # between the decoder (with the masks' upscaling) and the CPU-side filtering
        return out


class _SharedRle(dict):
    """An RLE dict that ``copy.deepcopy`` shares instead of copying.

    ``MaskData.cat`` deep-copies every RLE each time batches and crops are concatenated; the
    generator never mutates an RLE in place (it replaces list entries), so sharing is safe and
    saves seconds per image when masks are ragged (long run-length lists).
    """

    def __deepcopy__(self, memo: dict) -> _SharedRle:
        return self


class _CachedMaskGenerator(SamAutomaticMaskGenerator):
    def __init__(self, embedder: SamImageEmbedder, full_size: tuple[int, int], **options: object) -> None:
        super().__init__(embedder.sam, **options)
        self.predictor = _CachedPredictor(embedder, full_size)

    def _process_batch(
        self,
        points: np.ndarray,
        im_size: tuple[int, ...],
        crop_box: list[int],
        orig_size: tuple[int, ...],
    ) -> MaskData:
        step_boundary()  # between SAM decoder batches: more urgent work may use the model
        data = super()._process_batch(points, im_size, crop_box, orig_size)
        data["rles"] = [_SharedRle(rle) for rle in data["rles"]]
        return data

    def _generate_masks(self, image: np.ndarray) -> MaskData:
        data = super()._generate_masks(image)
        step_boundary()  # before the post-processing (NMS, clean-up, decoding the RLEs)
        return data


class SamEverything:
    """Finds every object SAM sees in an image, in a stable order.

    Args:
        embedder: supplies (cached) image embeddings; share it with the refiner.
        options: default :class:`EverythingOptions`; :meth:`generate` can override per call.
    """

    def __init__(self, *, embedder: SamImageEmbedder, options: EverythingOptions | None = None) -> None:
        self.embedder = embedder
        self.options = options or EverythingOptions()

    def generate(self, image: np.ndarray, options: EverythingOptions | None = None) -> list[SegmentedRegion]:
        """Segment everything in an HxWx3 uint8 RGB image.

        Returns regions sorted by predicted IoU (descending), then area (descending), then bbox
        (ascending), cut to ``max_masks``. Masks with no pixel, or fewer than
        ``min_mask_region_area`` pixels after SAM's island/hole clean-up, are dropped.
        """
        check_image(image)
        opts = options or self.options
        height, width = int(image.shape[0]), int(image.shape[1])
        generator = _CachedMaskGenerator(
            self.embedder,
            (height, width),
            points_per_side=opts.points_per_side,
            points_per_batch=opts.points_per_batch,
            pred_iou_thresh=opts.pred_iou_thresh,
            stability_score_thresh=opts.stability_score_thresh,
            stability_score_offset=opts.stability_score_offset,
            box_nms_thresh=opts.box_nms_thresh,
            crop_n_layers=opts.crop_n_layers,
            min_mask_region_area=opts.min_mask_region_area,
            output_mode="binary_mask",
        )
        records = generator.generate(image)

        regions = []
        for record in records:
            step_boundary()
            mask = np.asarray(record["segmentation"], dtype=bool)
            area = int(mask.sum())
            if area == 0 or area < opts.min_mask_region_area:
                continue
            x0, y0, x1, y1 = (int(v) for v in mask_bbox_xyxy(mask))
            point = record["point_coords"][0]
            regions.append(
                SegmentedRegion(
                    mask=mask,
                    bbox_xyxy=(x0, y0, x1, y1),
                    area=area,
                    predicted_iou=float(record["predicted_iou"]),
                    stability_score=float(record["stability_score"]),
                    point_xy=(float(point[0]), float(point[1])),
                )
            )
        regions.sort(key=lambda r: (-r.predicted_iou, -r.area, r.bbox_xyxy))
        if opts.max_masks is not None:
            regions = regions[: opts.max_masks]
        logger.debug("segment everything: %d of %d masks kept", len(regions), len(records))
        return regions
