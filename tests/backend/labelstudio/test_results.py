"""Label Studio <-> mask conversions: percent geometry, context parsing and result building."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter.utils import convert_annotation_to_yolo_obb
from label_studio_sdk.label_interface import LabelInterface

from backend.labelstudio.results import (
    choices_result,
    keypoint_to_pixels,
    mask_from_result,
    mask_to_polygon_value,
    mask_to_rectangle_value,
    parse_context,
    polygon_to_pixels,
    rectangle_corners,
    rectangle_to_xyxy,
    region_geometry,
    region_result,
    textarea_result,
)
from backend.labelstudio.rle import BadRegionError, encode_brush_rle
from osprey.sam.masks import rasterize_polygon

CONFIGS = Path(__file__).resolve().parents[3] / "label_configs"
W, H = 160, 120


def ellipse(center_xy, radii_xy, shape=(H, W)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((xx - center_xy[0]) / radii_xy[0]) ** 2 + ((yy - center_xy[1]) / radii_xy[1]) ** 2 <= 1


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


# --- percent geometry ---------------------------------------------------------------------------------


def test_keypoint_percent_to_pixels():
    assert keypoint_to_pixels({"x": 25.0, "y": 50.0, "width": 0.5}, width=200, height=100) == (50.0, 50.0)
    for bad, message in [
        ({"x": 101, "y": 5}, "outside the image"),
        ({"x": True, "y": 5}, "number"),
        ({"y": 5}, "'x'"),
    ]:
        with pytest.raises(BadRegionError, match=message):
            keypoint_to_pixels(bad, width=200, height=100)
    with pytest.raises(BadRegionError, match="finite"):
        keypoint_to_pixels({"x": float("nan"), "y": 5}, width=200, height=100)


@pytest.mark.parametrize("rotation", [0, 30, 90, 200, -45])
def test_rectangle_corners_match_the_sdk_converter(rotation):
    value = {"x": 40.0, "y": 20.0, "width": 15.0, "height": 25.0, "rotation": rotation}
    ours = rectangle_corners(value, width=W, height=H)
    sdk = convert_annotation_to_yolo_obb(
        {**value, "original_width": W, "original_height": H}, normalize=False
    )
    np.testing.assert_allclose(ours, np.array(sdk), atol=1e-9)


def test_rectangle_to_xyxy_handles_rotation_and_clipping():
    plain = {"x": 50.0, "y": 10.0, "width": 10.0, "height": 20.0, "rotation": 0, "rectanglelabels": ["car"]}
    assert rectangle_to_xyxy(plain, width=200, height=100) == (100.0, 10.0, 120.0, 30.0)
    turned = {**plain, "rotation": 90}  # about the top-left corner: the box swings to the left
    np.testing.assert_allclose(rectangle_to_xyxy(turned, width=200, height=100), (80.0, 10.0, 100.0, 30.0))
    corner = {"x": 95.0, "y": 90.0, "width": 20.0, "height": 30.0, "rotation": 0}
    assert rectangle_to_xyxy(corner, width=200, height=100) == (190.0, 90.0, 200.0, 100.0)
    with pytest.raises(BadRegionError, match="zero area"):
        rectangle_to_xyxy({**plain, "width": 0}, width=200, height=100)
    with pytest.raises(BadRegionError, match="outside the image"):
        rectangle_to_xyxy({**plain, "x": 120.0}, width=200, height=100)


def test_mask_box_percent_round_trip():
    mask = np.zeros((H, W), bool)
    mask[30:71, 12:100] = True
    value = mask_to_rectangle_value(mask)
    assert value["rotation"] == 0 and value["x"] == pytest.approx(12 / W * 100)
    assert rectangle_to_xyxy(value, width=W, height=H) == pytest.approx((12, 30, 100, 71))
    back = mask_from_result({"type": "rectanglelabels", "value": value}, W, H)
    np.testing.assert_array_equal(back, mask)
    with pytest.raises(BadRegionError, match="empty"):
        mask_to_rectangle_value(np.zeros((4, 4), bool))


def test_rotated_rectangle_mask():
    value = {
        "x": 50.0,
        "y": 25.0,
        "width": 25.0,
        "height": 25.0,
        "rotation": 90,
    }  # 40 x 30 px, turned about (80, 30)
    mask = mask_from_result(
        {"type": "rectangle", "value": value, "original_width": W, "original_height": H}, W, H
    )
    ys, xs = np.nonzero(mask)
    # corners (80,30), (80,70), (50,70), (50,30) in pixels: x from 50 to 80, y from 30 to 70
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (50, 79, 30, 69)
    assert mask.sum() == 30 * 40


def test_a_box_mask_polygon_reads_back_as_the_same_pixels():
    box = np.zeros((H, W), bool)
    box[20:60, 30:90] = True
    value = mask_to_polygon_value(box)
    assert len(value["points"]) == 4 and value["closed"] is True
    np.testing.assert_array_equal(mask_from_result({"type": "polygonlabels", "value": value}, W, H), box)


@pytest.mark.parametrize("shape", ["ellipse", "diagonal", "one_pixel_wide"])
def test_an_unsimplified_outline_reads_back_as_exactly_its_pixels(shape):
    if shape == "ellipse":
        mask = ellipse((71, 43), (37, 21))
    elif shape == "diagonal":  # a staircase: pixels touch only at corners along the slope
        mask = np.zeros((H, W), bool)
        for i in range(40):
            mask[10 + i, 20 + i : 26 + i] = True
    else:
        mask = np.zeros((H, W), bool)
        mask[12, 30:70] = True
    value = mask_to_polygon_value(mask, max_points=100_000, tolerance_px=0.0)
    np.testing.assert_array_equal(mask_from_result({"type": "polygonlabels", "value": value}, W, H), mask)


def test_polygon_round_trips():
    blob = ellipse((80, 60), (55, 35))
    value = mask_to_polygon_value(blob, max_points=40)
    assert 3 <= len(value["points"]) <= 40
    assert all(0 <= c <= 100 for point in value["points"] for c in point)
    vertices = polygon_to_pixels(value, width=W, height=H)
    assert iou(rasterize_polygon(vertices, width=W, height=H), blob) > 0.97
    assert len(mask_to_polygon_value(blob, max_points=8)["points"]) <= 8


@pytest.mark.parametrize("rotation", [0, 30, 55])
def test_polygons_and_rectangles_share_the_pixel_centre_rule(rotation):
    value = {"x": 40.3, "y": 11.7, "width": 31.9, "height": 33.1, "rotation": rotation}
    corners = rectangle_corners(value, width=W, height=H)
    assert ((corners >= 0) & (corners <= (W, H))).all()  # polygon_to_pixels clamps vertices outside
    polygon = {"points": (corners / (W, H) * 100).tolist()}
    as_rectangle = mask_from_result({"type": "rectangle", "value": value}, W, H)
    as_polygon = mask_from_result({"type": "polygon", "value": polygon}, W, H)
    np.testing.assert_array_equal(as_polygon, as_rectangle)
    area = value["width"] / 100 * W * value["height"] / 100 * H
    assert abs(int(as_polygon.sum()) - area) < 0.03 * area  # boundary pixels are not added


def test_polygon_keeps_the_biggest_component():
    mask = ellipse((40, 40), (30, 30)) | ellipse((130, 90), (10, 10))
    value = mask_to_polygon_value(mask)
    assert max(p[0] for p in value["points"]) < 50  # nothing from the small blob on the right
    single = np.zeros((H, W), bool)
    single[5, 7] = True
    assert mask_from_result({"type": "polygon", "value": mask_to_polygon_value(single)}, W, H)[5, 7]


def test_polygon_points_are_validated_and_clipped():
    vertices = polygon_to_pixels({"points": [[-0.001, 0], [100.0000001, 0], [50, 100]]}, width=W, height=H)
    assert vertices[0] == (0.0, 0.0) and vertices[1] == (W, 0.0)
    for bad in [
        {"points": [[1, 1], [2, 2]]},
        {"points": [[1, 1], [2, 2], [3]]},
        {"points": [[1, 1], [2, 2], ["a", 3]]},
    ]:
        with pytest.raises(BadRegionError):
            polygon_to_pixels(bad, width=W, height=H)


# --- context from Label Studio 1.23 ----------------------------------------------------------------


def kp(item_id, x, y, positive=None, label="person"):
    item = {
        "original_width": W,
        "original_height": H,
        "image_rotation": 0,
        "value": {"x": x, "y": y, "width": 0.625, "keypointlabels": [label]},
        "id": item_id,
        "from_name": "click",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
    }
    if positive is not None:
        item["is_positive"] = positive
    return item


def rect(item_id, x, y, w, h, rotation=0):
    return {
        "original_width": W,
        "original_height": H,
        "image_rotation": 0,
        "value": {
            "x": x,
            "y": y,
            "width": w,
            "height": h,
            "rotation": rotation,
            "rectanglelabels": ["vehicle"],
        },
        "id": item_id,
        "from_name": "box",
        "to_name": "image",
        "type": "rectanglelabels",
        "origin": "manual",
    }


def brush(item_id, mask, label="animal"):
    return {
        "original_width": W,
        "original_height": H,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": encode_brush_rle(mask), "brushlabels": [label]},
        "id": item_id,
        "from_name": "mask",
        "to_name": "image",
        "type": "brushlabels",
        "origin": "manual",
    }


def test_context_keypoints():
    context = {
        "result": [kp("fBWv1t0S2L", 25.0, 50.0, True), kp("a2", 50.0, 25.0, False), kp("a3", 75.0, 75.0)]
    }
    parsed = parse_context(context, width=W, height=H)
    np.testing.assert_allclose(parsed.points_xy, [[40, 60], [80, 30], [120, 90]])
    assert parsed.points_xy.shape == (3, 2) and parsed.point_labels.tolist() == [1, 0, 1]
    assert (parsed.label, parsed.region_id, parsed.from_name) == ("person", "fBWv1t0S2L", "click")
    assert parsed.box_xyxy is None and parsed.brush_mask is None and parsed.mask_prompt() is None


def test_context_boxes_brushes_and_polygons():
    first, second = ellipse((40, 40), (20, 20)), ellipse((120, 80), (15, 15))
    context = {
        "result": [
            rect("r1", 10, 10, 20, 20),
            rect("r2", 25.0, 50.0, 50.0, 25.0),
            brush("b1", first),
            brush("b2", second),
            kp("k1", 50, 50, True),
        ]
    }
    parsed = parse_context(context, width=W, height=H)
    np.testing.assert_allclose(parsed.box_xyxy, [40, 60, 120, 90])  # the last rectangle wins
    np.testing.assert_array_equal(parsed.brush_mask, first | second)
    assert parsed.label == "vehicle" and parsed.region_id == "r1" and len(parsed.points_xy) == 1
    polygon_item = {
        "original_width": W,
        "original_height": H,
        "image_rotation": 0,
        "value": {
            "points": [[10, 10], [50, 10], [50, 50], [10, 50]],
            "polygonlabels": ["animal"],
            "closed": True,
        },
        "id": "p1",
        "from_name": "outline",
        "to_name": "image",
        "type": "polygonlabels",
    }
    parsed = parse_context({"result": [polygon_item]}, width=W, height=H)
    assert parsed.polygon == [(16.0, 12.0), (80.0, 12.0), (80.0, 60.0), (16.0, 60.0)]
    assert parsed.points_xy.shape == (0, 2) and parsed.mask_prompt()[30, 40]


def test_context_tolerates_missing_sizes():
    item = kp("k", 50, 50)
    del item["original_width"], item["original_height"], item["image_rotation"]
    assert parse_context({"result": [item]}, width=W, height=H).points_xy.tolist() == [[80.0, 60.0]]


@pytest.mark.parametrize(
    ("context", "message"),
    [
        ({"result": []}, "at least one item"),
        ({}, "at least one item"),
        ([kp("k", 1, 1)], "at least one item"),
        ({"result": ["x"]}, "item 0 .*'value' dict"),
        ({"result": [{**kp("k", 1, 1), "type": "choices"}]}, "'choices' is not a prompt"),
        ({"result": [kp("k", 1, 1), kp("k2", 100.5, 3)]}, "item 1 .*outside the image"),
        ({"result": [rect("r", 10, 10, 0, 5)]}, "zero area"),
        ({"result": [brush("b", np.zeros((H, W), bool))]}, "brush stroke is empty"),
        (
            {"result": [{**kp("k", 1, 1), "original_width": W * 2}]},
            "320x120 image but the task image loads as 160x120",
        ),
        ({"result": [{**kp("k", 1, 1), "image_rotation": 90}]}, "rotated by 90 degrees"),
        (
            {
                "result": [
                    {**brush("b", np.ones((H, W), bool)), "original_width": None, "original_height": None}
                ]
            },
            None,
        ),
    ],
)
def test_bad_context_is_refused(context, message):
    if message is None:  # sizes omitted: accepted
        assert parse_context(context, width=W, height=H).brush_mask.all()
        with pytest.raises(BadRegionError, match="another size"):
            parse_context(context, width=W, height=H - 1)
        return
    with pytest.raises(BadRegionError, match=message):
        parse_context(context, width=W, height=H)


# --- results --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "tool", "from_name", "label"),
    [
        ("brush_full.xml", "BrushLabels", "label", "person"),
        ("polygon_full.xml", "PolygonLabels", "label", "vehicle"),
        ("interactive_sam.xml", "brushlabels", "mask", "animal"),
    ],
)
def test_results_are_valid_label_studio_predictions(config, tool, from_name, label):
    interface = LabelInterface((CONFIGS / config).read_text())
    mask = ellipse((70, 55), (40, 25))
    region = region_result(
        mask=mask,
        tool=tool,
        from_name=from_name,
        to_name="image",
        width=W,
        height=H,
        label=label,
        score=0.91,
        region_id="osp1",
    )
    assert region["type"] == tool.lower() and region["value"][tool.lower()] == [label]
    assert (region["original_width"], region["original_height"], region["image_rotation"]) == (W, H, 0)
    assert region["readonly"] is False and region["score"] == pytest.approx(0.91)
    category = choices_result(
        region_id="osp1", from_name="category", to_name="image", choices=["person"], score=0.8
    )
    caption = textarea_result(
        region_id="osp1", from_name="caption", to_name="image", text="a man in a red coat", score=0.6
    )
    assert category == {
        "id": "osp1",
        "from_name": "category",
        "to_name": "image",
        "type": "choices",
        "score": 0.8,
        "value": {"choices": ["person"]},
        "readonly": False,
    }
    assert caption["value"] == {"text": ["a man in a red coat"]} and caption["type"] == "textarea"
    prediction = {"result": [region, category, caption], "score": 0.8, "model_version": "osprey-7b@1"}
    assert interface.validate_prediction(prediction, return_errors=True) == []
    json.dumps(prediction)
    back = mask_from_result(region, W, H)
    assert iou(back, mask) > (0.999 if tool.lower().startswith("brush") else 0.97)


def test_rectangle_and_plain_tools():
    mask = np.zeros((H, W), bool)
    mask[10:20, 30:50] = True
    box = region_result(
        mask=mask,
        tool="RectangleLabels",
        from_name="box",
        to_name="image",
        width=W,
        height=H,
        label="car",
        score=1,
        region_id="r",
    )
    value = box["value"]
    assert value.pop("rectanglelabels") == ["car"]
    assert value == pytest.approx(
        {"x": 18.75, "y": 10 / H * 100, "width": 12.5, "height": 10 / H * 100, "rotation": 0}
    )
    np.testing.assert_array_equal(mask_from_result(box, W, H), mask)
    plain = region_result(
        mask=mask,
        tool="Brush",
        from_name="b",
        to_name="image",
        width=W,
        height=H,
        label=None,
        score=0.5,
        region_id="p",
    )
    assert plain["type"] == "brush" and set(plain["value"]) == {"format", "rle"}


def test_per_region_results_can_carry_the_geometry_as_label_studio_stores_it():
    mask = ellipse((70, 55), (30, 20))
    region = region_result(
        mask=mask,
        tool="PolygonLabels",
        from_name="label",
        to_name="image",
        width=W,
        height=H,
        label="animal",
        score=0.7,
        region_id="g1",
    )
    geometry = region_geometry(region)
    assert set(geometry) == {"points", "closed"}
    attributes = choices_result(
        region_id="g1",
        from_name="attributes",
        to_name="image",
        choices=["red", "metal"],
        score=0.4,
        geometry=geometry,
    )
    assert (
        attributes["value"]["choices"] == ["red", "metal"]
        and attributes["value"]["points"] == region["value"]["points"]
    )
    stored = {**attributes, "original_width": W, "original_height": H, "image_rotation": 0}
    np.testing.assert_array_equal(mask_from_result(stored, W, H), mask_from_result(region, W, H))
    with pytest.raises(BadRegionError, match="no area"):
        mask_from_result(
            choices_result(region_id="g1", from_name="a", to_name="image", choices=["red"], score=1), W, H
        )


@pytest.mark.parametrize(
    "call",
    [
        lambda: choices_result(region_id="r", from_name="c", to_name="image", choices="person", score=1),
        lambda: choices_result(region_id="r", from_name="c", to_name="image", choices=[], score=1),
        lambda: choices_result(region_id="", from_name="c", to_name="image", choices=["a"], score=1),
        lambda: choices_result(
            region_id="r", from_name="c", to_name="image", choices=["a"], score=float("nan")
        ),
        lambda: textarea_result(region_id="r", from_name="t", to_name="image", text="  ", score=1),
        lambda: textarea_result(region_id="r", from_name="", to_name="image", text="a dog", score=1),
    ],
)
def test_bad_result_arguments_raise(call):
    with pytest.raises(ValueError):
        call()


def test_mask_from_result_refuses_keypoints_and_other_formats():
    with pytest.raises(BadRegionError, match="no area"):
        mask_from_result(kp("k", 10, 10), W, H)
    with pytest.raises(BadRegionError, match="format 'png'"):
        mask_from_result({"type": "brushlabels", "value": {"format": "png", "rle": [0]}}, W, H)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"tool": "BrushLabels", "label": None}, ValueError, "needs one of the tool's labels"),
        ({"tool": "brush", "label": "car"}, ValueError, "has no labels"),
        ({"cut": True}, ValueError, "does not match the image"),
        ({"empty": True}, BadRegionError, "empty"),
        ({"tool": "KeyPointLabels", "label": "a"}, ValueError, "cannot hold a region"),
    ],
)
def test_region_result_refuses_inconsistent_arguments(overrides, error, message):
    mask = np.zeros((H, W), bool)
    mask[2:6, 3:9] = True
    if overrides.pop("cut", False):
        mask = mask[1:]
    if overrides.pop("empty", False):
        mask = mask & False
    args = dict(mask=mask, tool="brush", from_name="b", to_name="image", width=W, height=H, label=None, score=1,
                region_id="x")  # fmt: skip
    with pytest.raises(error, match=message):
        region_result(**{**args, **overrides})
