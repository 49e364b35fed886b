"""Prompt construction from annotator input: exact boxes, points, rasterisation, errors."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from osprey.sam.masks import rasterize_polygon
from osprey.sam.prompts import (
    MaskPromptConfig,
    build_sam_prompt,
    check_box,
    check_points,
    mask_bbox_xyxy,
    mask_interior_points,
    mask_to_low_res_logits,
    polygon_prompt_mask,
)


def _l_shape(height: int = 64, width: int = 80) -> np.ndarray:
    """An L: its box centre lies OUTSIDE the mask, so naive 'centre of the box' clicks would miss."""
    mask = np.zeros((height, width), dtype=bool)
    mask[10:50, 12:24] = True  # vertical bar, cols 12..23, rows 10..49
    mask[38:50, 12:60] = True  # horizontal bar, cols 12..59, rows 38..49
    return mask


# Polygons as prompts (the fill itself: test_polygon_fill.py) --------------------------------------


@pytest.mark.parametrize(
    ("vertices", "message"),
    [
        ([(1, 1), (5, 5)], "at least 3 vertices"),
        ([(1, 1), (5, 1), (30, 4)], "outside the 10x10 image"),
        ([(1, 1), (3, 3), (6, 6)], "covers no pixel centre"),
        ([(1, 1), (5, 1), (np.nan, 4)], "finite"),
    ],
)
def test_a_polygon_prompt_must_lie_inside_the_image_and_cover_a_pixel(vertices, message) -> None:
    with pytest.raises(ValueError, match=message):
        polygon_prompt_mask(vertices, (10, 10))
    with pytest.raises(ValueError, match=message):
        build_sam_prompt((10, 10), polygon=vertices)


def test_a_polygon_prompt_on_the_image_edges_is_the_plain_fill() -> None:
    vertices = [(0, 0), (7, 0), (7.0004, 5), (-0.0002, 5)]  # a hair outside: percent rounding
    mask = polygon_prompt_mask(vertices, (5, 7))
    assert mask.all()
    np.testing.assert_array_equal(mask, rasterize_polygon(vertices, width=7, height=5))


# Rough masks ------------------------------------------------------------------------------------


def test_mask_prompt_box_points_and_labels() -> None:
    mask = _l_shape()
    cfg = MaskPromptConfig(n_positive=3, n_negative=4, use_mask_input=False)
    prompt = build_sam_prompt(mask.shape, mask=mask, config=cfg)

    np.testing.assert_array_equal(prompt.box_xyxy, [12, 10, 60, 50])  # min col, min row, max + 1
    np.testing.assert_array_equal(mask_bbox_xyxy(mask), prompt.box_xyxy)
    assert prompt.point_labels.tolist() == [1, 1, 1, 0, 0, 0, 0]
    xy = prompt.point_coords.astype(int)
    np.testing.assert_array_equal(prompt.point_coords, xy)  # whole pixel indices
    positives, negatives = xy[prompt.point_labels == 1], xy[prompt.point_labels == 0]
    assert all(mask[y, x] for x, y in positives)
    assert len({tuple(p) for p in positives}) == 3  # distinct, spread
    assert not any(mask[y, x] for x, y in negatives)

    # Negatives are near the mask: inside the box expanded by the margin, at least the gap away.
    long_side = 48.0
    gap, margin = (
        max(cfg.min_gap_px, cfg.gap_frac * long_side),
        max(cfg.min_margin_px, cfg.margin_frac * long_side),
    )
    dist_to_mask = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 5)
    for x, y in negatives:
        assert 12 - margin <= x < 60 + margin and 10 - margin <= y < 50 + margin
        assert dist_to_mask[y, x] >= gap
    assert prompt.rough_mask is not None and prompt.mask_input is None


def test_first_positive_point_is_the_distance_transform_maximum() -> None:
    mask = _l_shape()
    dist = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    x, y = mask_interior_points(mask, 1)[0]
    assert dist[y, x] == pytest.approx(dist.max())
    # A plain rectangle: the ridge of maxima is resolved to its middle.
    rect = np.zeros((40, 60), dtype=bool)
    rect[10:20, 5:55] = True  # centroid (29.5, 14.5)
    x, y = mask_interior_points(rect, 1)[0]
    assert abs(x - 29.5) <= 1 and abs(y - 14.5) <= 1


def test_mask_filling_the_image_has_no_negatives() -> None:
    prompt = build_sam_prompt((6, 8), mask=np.ones((6, 8), dtype=bool))
    assert prompt.point_labels.tolist() == [1, 1, 1]
    np.testing.assert_array_equal(prompt.box_xyxy, [0, 0, 8, 6])


def test_polygon_becomes_a_rough_mask_prompt() -> None:
    vertices = [(10, 8), (40, 8), (40, 30), (10, 30)]
    prompt = build_sam_prompt((48, 64), polygon=vertices)
    np.testing.assert_array_equal(prompt.rough_mask, rasterize_polygon(vertices, width=64, height=48))
    np.testing.assert_array_equal(prompt.box_xyxy, [10, 8, 40, 30])
    assert prompt.mask_input is not None and prompt.mask_input.shape == (1, 256, 256)


def test_low_res_mask_input_is_in_sams_padded_frame() -> None:
    # 96x128 -> SAM input 768x1024 -> low-res 192x256 valid, rows 192.. are padding.
    mask = np.zeros((96, 128), dtype=bool)
    mask[:, :64] = True  # left half
    logits = mask_to_low_res_logits(mask, encoder_size=1024, low_res_size=(256, 256), logit_scale=10.0)
    assert logits.shape == (1, 256, 256) and logits.dtype == np.float32
    assert (logits[0, :192, :126] == 10.0).all()
    assert (logits[0, :192, 130:] == -10.0).all()
    assert (logits[0, 194:, :] == -10.0).all()


def test_combined_inputs_keep_user_points_first_and_explicit_box() -> None:
    mask = _l_shape()
    prompt = build_sam_prompt(
        mask.shape,
        points=[[30.5, 44.0], [70.0, 5.0]],
        point_labels=[1, 0],
        box_xyxy=[5, 5, 70, 60],
        mask=mask,
        config=MaskPromptConfig(n_positive=2, n_negative=2),
    )
    np.testing.assert_array_equal(prompt.box_xyxy, [5, 5, 70, 60])
    np.testing.assert_array_equal(prompt.point_coords[:2], [[30.5, 44.0], [70.0, 5.0]])
    assert prompt.point_labels.tolist() == [1, 0, 1, 1, 0, 0]


def test_brush_and_polygon_are_united() -> None:
    brush = np.zeros((20, 30), dtype=bool)
    brush[2:6, 2:6] = True
    prompt = build_sam_prompt((20, 30), mask=brush, polygon=[(20, 10), (28, 10), (28, 18), (20, 18)])
    assert prompt.rough_mask.sum() == 16 + 64
    np.testing.assert_array_equal(prompt.box_xyxy, [2, 2, 28, 18])


# Validation -------------------------------------------------------------------------------------


def test_points_on_the_far_edge_are_accepted_and_labels_default_to_positive() -> None:
    coords, labels = check_points([[0, 0], [80, 64]], None, (64, 80))
    assert coords.dtype == np.float32 and labels.tolist() == [1, 1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "no prompt given"),
        ({"points": [[81, 10]]}, "outside the 80x64 image"),
        ({"points": [[10, -1]]}, "outside"),
        ({"points": [[10, 10]], "point_labels": [2]}, "1 \\(positive\\) or 0"),
        ({"points": [[10, 10]], "point_labels": [1, 0]}, "shape"),
        ({"points": [10, 10]}, "Nx2"),
        ({"point_labels": [1]}, "without points"),
        ({"box_xyxy": [10, 10, 10, 30]}, "non-zero area"),
        ({"box_xyxy": [30, 10, 10, 30]}, "x0 < x1"),
        ({"box_xyxy": [0, 0, 90, 30]}, "outside"),
        ({"box_xyxy": [0, 0, 10]}, "4 finite numbers"),
        ({"mask": np.zeros((64, 80), bool)}, "empty"),
        ({"mask": np.ones((32, 40), bool)}, "does not match the image 64x80"),
        ({"mask": np.ones((64, 80, 3), bool)}, "2-D"),
        ({"polygon": [(1, 1), (5, 5)]}, "at least 3 vertices"),
    ],
)
def test_bad_inputs_raise_clear_value_errors(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        build_sam_prompt((64, 80), **kwargs)


def test_check_box_clips_rounding_overshoot() -> None:
    np.testing.assert_allclose(check_box([0, 0, 80.0000001, 64], (64, 80)), [0, 0, 80, 64])


def test_bad_mask_prompt_config() -> None:
    with pytest.raises(ValueError, match="n_positive"):
        MaskPromptConfig(n_positive=0)
    with pytest.raises(ValueError, match="min_gap_px"):
        MaskPromptConfig(min_gap_px=0)
