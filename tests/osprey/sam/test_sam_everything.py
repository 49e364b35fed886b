"""Segment everything on the tiny SAM: order, caps, min area, cached embedding, options."""

from __future__ import annotations

from unittest import mock

import cv2
import numpy as np
import pytest

from osprey.sam import (
    EverythingOptions,
    SamEverything,
    SamImageEmbedder,
    SamRefiner,
    SegmentedRegion,
    mask_bbox_xyxy,
)
from osprey.sam.build import SamAutomaticMaskGenerator
from osprey.sam.everything import order_regions

# Random weights give low, noisy scores: keep every candidate (no thresholds, no NMS) so the
# tests see many masks, with small islands, in a deterministic set.
KEEP_ALL = EverythingOptions(
    points_per_side=3,
    points_per_batch=9,
    pred_iou_thresh=0.0,
    stability_score_thresh=0.0,
    box_nms_thresh=1.0,
    max_masks=None,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(3)
    img = rng.integers(0, 60, (60, 84, 3), dtype=np.uint8)
    cv2.rectangle(img, (5, 5), (35, 40), (230, 40, 40), thickness=-1)
    cv2.circle(img, (60, 30), 14, (40, 40, 230), thickness=-1)
    return img


@pytest.fixture(scope="module")
def everything(sam) -> SamEverything:
    return SamEverything(embedder=SamImageEmbedder(sam=sam, model_id="tiny-seed0"), options=KEEP_ALL)


@pytest.fixture(scope="module")
def all_regions(everything, image):
    return everything.generate(image)


def _sort_key(region):
    return (-region.predicted_iou, -region.area, region.bbox_xyxy)


def test_regions_are_complete_and_in_stable_order(all_regions, image) -> None:
    assert len(all_regions) >= 10
    assert [_sort_key(r) for r in all_regions] == sorted(_sort_key(r) for r in all_regions)
    for region in all_regions:
        assert region.mask.shape == image.shape[:2] and region.mask.dtype == np.bool_
        assert region.area == int(region.mask.sum()) > 0
        assert region.bbox_xyxy == tuple(int(v) for v in mask_bbox_xyxy(region.mask))
        assert np.isfinite(region.predicted_iou) and 0.0 <= region.stability_score <= 1.0
        assert 0 <= region.point_xy[0] <= image.shape[1] and 0 <= region.point_xy[1] <= image.shape[0]


def test_generation_is_deterministic(sam, image, all_regions) -> None:
    again = SamEverything(embedder=SamImageEmbedder(sam=sam, model_id="tiny-seed0")).generate(image, KEEP_ALL)
    assert [(r.bbox_xyxy, r.area, r.predicted_iou) for r in again] == [
        (r.bbox_xyxy, r.area, r.predicted_iou) for r in all_regions
    ]


def test_same_masks_as_segment_anythings_generator(sam, image, all_regions) -> None:
    upstream = SamAutomaticMaskGenerator(
        sam,
        points_per_side=KEEP_ALL.points_per_side,
        points_per_batch=KEEP_ALL.points_per_batch,
        pred_iou_thresh=KEEP_ALL.pred_iou_thresh,
        stability_score_thresh=KEEP_ALL.stability_score_thresh,
        box_nms_thresh=KEEP_ALL.box_nms_thresh,
    ).generate(image)
    upstream = [r for r in upstream if r["area"] > 0]
    assert len(upstream) == len(all_regions)
    ours = {(r.point_xy, round(r.predicted_iou, 5)): r for r in all_regions}
    for record in upstream:
        region = ours[(tuple(record["point_coords"][0]), round(record["predicted_iou"], 5))]
        np.testing.assert_array_equal(region.mask, record["segmentation"])
        assert region.stability_score == pytest.approx(record["stability_score"])
        x, y, w, h = record["bbox"]  # upstream: XYWH with an inclusive right/bottom edge
        assert region.bbox_xyxy == (x, y, x + w + 1, y + h + 1)


def test_ties_on_score_are_broken_by_area_then_bbox(image) -> None:
    def region(x0: int, y0: int, x1: int, y1: int, score: float) -> SegmentedRegion:
        mask = np.zeros(image.shape[:2], dtype=bool)
        mask[y0:y1, x0:x1] = True
        return SegmentedRegion(
            mask=mask,
            bbox_xyxy=(x0, y0, x1, y1),
            area=int(mask.sum()),
            predicted_iou=score,
            stability_score=0.9,
            point_xy=(x0, y0),
        )

    regions = [
        region(0, 0, 4, 4, 0.5),  # area 16
        region(10, 0, 20, 10, 0.5),  # area 100
        region(0, 10, 10, 20, 0.5),  # area 100, smaller bbox than the one above
        region(30, 30, 31, 31, 0.9),  # best score, tiny
        region(40, 0, 44, 4, 0.5),  # area 16, after (0, 0, 4, 4)
    ]
    expected = [(30, 30, 31, 31), (0, 10, 10, 20), (10, 0, 20, 10), (0, 0, 4, 4), (40, 0, 44, 4)]
    assert [r.bbox_xyxy for r in order_regions(regions, None)] == expected
    assert [r.bbox_xyxy for r in order_regions(regions[::-1], 2)] == expected[:2]


def test_max_masks_keeps_the_first_in_order(everything, image, all_regions) -> None:
    capped = everything.generate(image, EverythingOptions(**{**KEEP_ALL.__dict__, "max_masks": 5}))
    assert len(capped) == 5
    assert [(r.bbox_xyxy, r.area, r.predicted_iou) for r in capped] == [
        (r.bbox_xyxy, r.area, r.predicted_iou) for r in all_regions[:5]
    ]


def test_min_mask_region_area_removes_small_masks_and_islands(everything, image, all_regions) -> None:
    min_area = 150

    def smallest_island(mask: np.ndarray) -> int:
        _, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        return int(stats[1:, cv2.CC_STAT_AREA].min())

    # The unfiltered set does contain what the option must remove, so the test can fail.
    assert any(r.area < min_area or smallest_island(r.mask) < min_area for r in all_regions)
    cleaned = everything.generate(
        image, EverythingOptions(**{**KEEP_ALL.__dict__, "min_mask_region_area": min_area})
    )
    assert cleaned
    for region in cleaned:
        assert region.area >= min_area
        assert smallest_island(region.mask) >= min_area


def test_thresholds_filter_by_predicted_iou(everything, image, all_regions) -> None:
    cut = float(np.median([r.predicted_iou for r in all_regions]))
    kept = everything.generate(
        image, EverythingOptions(**{**KEEP_ALL.__dict__, "pred_iou_thresh": max(cut, 0.0)})
    )
    assert all(r.predicted_iou > max(cut, 0.0) for r in kept)
    assert len(kept) < len(all_regions)


def test_segment_everything_reuses_the_cached_embedding(sam, image, all_regions) -> None:
    embedder = SamImageEmbedder(sam=sam, model_id="tiny-seed0")
    refiner, everything = SamRefiner(embedder=embedder), SamEverything(embedder=embedder, options=KEEP_ALL)
    original = sam.image_encoder.forward
    with mock.patch.object(sam.image_encoder, "forward", side_effect=original) as encoder:
        refiner.refine(image, points=[[20, 20]])
        regions = everything.generate(image.copy())
        refiner.refine(image, box_xyxy=[5, 5, 36, 41])
        assert encoder.call_count == 1
    assert refiner.cache.stats()["misses"] == 1
    # The cached embedding gives exactly what a fresh encode gives.
    assert [(r.bbox_xyxy, r.area) for r in regions] == [(r.bbox_xyxy, r.area) for r in all_regions]


def test_crop_layers_encode_crops_without_caching_them(sam, image) -> None:
    embedder = SamImageEmbedder(sam=sam, model_id="tiny-seed0")
    options = EverythingOptions(**{**KEEP_ALL.__dict__, "points_per_side": 2, "crop_n_layers": 1})
    original = sam.image_encoder.forward
    with mock.patch.object(sam.image_encoder, "forward", side_effect=original) as encoder:
        regions = SamEverything(embedder=embedder).generate(image, options)
        assert encoder.call_count == 5  # the whole image + 4 crops
    assert len(embedder.cache) == 1  # only the whole image is cached
    assert regions and all(r.mask.shape == image.shape[:2] for r in regions)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"points_per_side": 0}, "points_per_side"),
        ({"points_per_batch": 0}, "points_per_batch"),
        ({"pred_iou_thresh": 1.5}, "pred_iou_thresh"),
        ({"stability_score_thresh": -0.1}, "stability_score_thresh"),
        ({"min_mask_region_area": -1}, "min_mask_region_area"),
        ({"max_masks": 0}, "max_masks"),
        ({"crop_n_layers": -1}, "crop_n_layers"),
    ],
)
def test_bad_options(change, message) -> None:
    with pytest.raises(ValueError, match=message):
        EverythingOptions(**change)


def test_bad_image(everything) -> None:
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        everything.generate(np.zeros((10, 10, 4), np.uint8))
