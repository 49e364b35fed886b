"""Payload caps over real HTTP: Label Studio-shaped webhooks and interactive requests that claim huge
images, long RLE, many vertices, clicks or regions are refused before anything is decoded (the decoder
is never reached, the traced peak stays small) and the service goes on."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import requests
from http_app import parsed, served_tiny_service
from webhook_payloads import POLYGON_CONFIG, annotation_event, box_mask, brush_region, polygon_region

from backend.labelstudio import results as results_module
from backend.labelstudio import rle as rle_codec
from backend.labelstudio.results import mask_from_result
from backend.predict import regions as predict_module

HUGE = 12288  # 151 M pixels claimed, over the default OSPREY_MAX_IMAGE_PIXELS (100 M)


@pytest.fixture(scope="module")
def url(tiny_models, file_store, tmp_path_factory):
    with served_tiny_service(
        tiny_models, file_store, tmp_path_factory.mktemp("models"), "/data/upload/8/scene.png"
    ) as base:
        yield base


@pytest.fixture
def never(monkeypatch):
    """Make the named decoders fail the test if a refused region reaches them."""

    def install(*names):
        for module, name in names:

            def refuse(*args, _name=name, **kwargs):
                raise AssertionError(f"{_name} ran for a region that should have been refused first")

            monkeypatch.setattr(module, name, refuse)

    return install


def post_traced(url: str, body: dict) -> tuple[requests.Response, int]:
    """POST ``body`` and return the response with the peak bytes traced while the server handled it."""
    tracemalloc.start()
    try:
        response = requests.post(url, json=body, timeout=30)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return response, peak


def claiming(items: list[dict], width: int, height: int) -> list[dict]:
    return [{**item, "original_width": width, "original_height": height} for item in items]


def test_polygon_claiming_a_huge_image_is_skipped_before_rasterising(url, never):
    never((results_module, "rasterize_polygon"))
    region = claiming(polygon_region("p1", [[10, 10], [60, 10], [60, 70]], category="car"), HUGE, HUGE)
    body = annotation_event(region, annotation_id=501, label_config=POLYGON_CONFIG)
    response, peak = post_traced(f"{url}/webhook", body)
    outcome = parsed(url, response)
    assert outcome["status"] == "stored" and outcome["regions"] == 0
    [reason] = outcome["skipped"]
    assert f"{HUGE}x{HUGE}" in reason and "OSPREY_MAX_IMAGE_PIXELS=100000000" in reason
    assert peak < HUGE * HUGE // 2  # less than half of what the 12288x12288 mask alone would take


def test_brush_claiming_a_huge_image_is_skipped_before_decoding(url, never):
    never((results_module, "decode_brush_rle"), (rle_codec, "_decode_runs"))
    region = claiming(brush_region("b1", box_mask(4, 20, 4, 30), category="dog"), HUGE, HUGE)
    response, peak = post_traced(f"{url}/webhook", annotation_event(region, annotation_id=502))
    assert "OSPREY_MAX_IMAGE_PIXELS" in parsed(url, response)["skipped"][0]
    assert peak < HUGE * HUGE // 2


def test_brush_rle_longer_than_its_image_can_need_is_refused_before_decoding(url, never):
    never((rle_codec, "_decode_runs"))
    [region, *rest] = brush_region("b2", box_mask(4, 20, 4, 30), category="dog")
    region["value"]["rle"] = region["value"]["rle"] + [0] * (64 * 48 * 4 * 8 + 100)  # past W*H*4 values
    response = requests.post(
        f"{url}/webhook", json=annotation_event([region, *rest], annotation_id=503), timeout=30
    )
    assert "more than any mask of this image can need" in parsed(url, response)["skipped"][0]


def test_polygon_with_too_many_vertices_is_skipped(url, never):
    never((results_module, "rasterize_polygon"))
    ring = [
        [50 + 40 * np.cos(t), 50 + 40 * np.sin(t)] for t in np.linspace(0, 2 * np.pi, 10_001, endpoint=False)
    ]
    body = annotation_event(polygon_region("p2", ring), annotation_id=504, label_config=POLYGON_CONFIG)
    response = requests.post(f"{url}/webhook", json=body, timeout=30)
    assert "10001 points, more than OSPREY_MAX_POLYGON_POINTS=10000" in parsed(url, response)["skipped"][0]


def test_an_annotation_with_too_many_regions_stores_none(url, never):
    never((results_module, "rasterize_polygon"), (results_module, "decode_brush_rle"))
    result = [item for n in range(1001) for item in polygon_region(f"r{n}", [[1, 1], [9, 1], [9, 9]])]
    body = annotation_event(result, annotation_id=505, label_config=POLYGON_CONFIG)
    response = requests.post(f"{url}/webhook", json=body, timeout=30)
    outcome = parsed(url, response)
    assert outcome["regions"] == 0
    assert outcome["skipped"] == [
        "every region: the annotation has 1001 regions, more than OSPREY_MAX_REGIONS=1000"
    ]


def test_rectangle_with_an_absurd_size_is_skipped(url):
    config = (
        '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
        '<Label value="car"/><Label value="dog"/></RectangleLabels></View>'
    )
    item = {"id": "r1", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
            "original_width": 64, "original_height": 48, "image_rotation": 0,
            "value": {"x": 10, "y": 10, "width": 1e30, "height": 20, "rotation": 0, "rectanglelabels": ["car"]}}  # fmt: skip
    response = requests.post(
        f"{url}/webhook", json=annotation_event([item], annotation_id=506, label_config=config), timeout=30
    )
    assert "width is 1e+30% of the image; expected -100..200%" in parsed(url, response)["skipped"][0]


def test_a_rectangle_on_a_4096_photo_is_rasterised_in_bounded_memory():
    item = {"type": "rectanglelabels", "original_width": 4096, "original_height": 4096,
            "value": {"x": 0.5, "y": 0.5, "width": 99, "height": 99, "rotation": 0}}  # fmt: skip
    tracemalloc.start()
    try:
        mask = mask_from_result(item, 4096, 4096)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert mask.sum() == 4056 * 4056 and mask[20:4076, 20:4076].all()  # pixel centres inside
    assert peak < 48 * 2**20  # the 16 MiB mask and a few rows of temporaries (was about 0.8 GB)


def test_rasterising_by_rows_draws_the_same_rotated_rectangle(monkeypatch):
    value = {"x": 20.3, "y": 11.7, "width": 51.9, "height": 33.1, "rotation": 23.5}
    by_rows = results_module.rasterize_rectangle(value, width=517, height=389)
    monkeypatch.setattr(results_module, "_RASTER_ROWS", 10**6)  # one block, as before
    np.testing.assert_array_equal(by_rows, results_module.rasterize_rectangle(value, width=517, height=389))
    assert by_rows.any()


def test_ten_thousand_clicks_are_refused_before_the_image_or_the_model(url, never):
    never((predict_module, "parse_context"))
    click = {"original_width": 160, "original_height": 120, "image_rotation": 0, "from_name": "click",
             "to_name": "image", "type": "keypointlabels", "is_positive": True,
             "value": {"x": 25.0, "y": 50.0, "width": 0.6, "keypointlabels": ["animal"]}}  # fmt: skip
    body = {
        "tasks": [{"id": 1, "data": {"image": "/data/upload/8/scene.png"}}],
        "project": "8.1731000000",
        "label_config": _interactive_config(),
        "params": {"context": {"result": [{**click, "id": f"k{n}"} for n in range(10_000)]}},
    }
    response, peak = post_traced(f"{url}/predict", body)
    assert response.status_code == 413, response.text
    assert response.json()["error"] == (
        "the interactive request (params.context.result) has 10000 regions, more than OSPREY_MAX_REGIONS=1000"
    )
    assert peak < 64 * 2**20
    few = {**body, "params": {"context": {"result": [{**click, "id": f"k{n}"} for n in range(101)]}}}
    response = requests.post(f"{url}/predict", json=few, timeout=30)
    assert response.status_code == 413
    assert "101 keypoints, more than OSPREY_MAX_PROMPT_POINTS=100" in response.json()["error"]
    assert requests.get(f"{url}/health", timeout=5).status_code == 200


def test_an_interactive_brush_claiming_a_huge_image_is_refused(url, never):
    never((results_module, "decode_brush_rle"))
    [stroke, *_] = brush_region("s1", box_mask(4, 20, 4, 30))
    stroke = {**stroke, "from_name": "click", "original_width": HUGE, "original_height": HUGE}
    body = {"tasks": [{"id": 2, "data": {"image": "/data/upload/8/scene.png"}}], "project": "8",
            "label_config": _interactive_config(), "params": {"context": {"result": [stroke]}}}  # fmt: skip
    response = requests.post(f"{url}/predict", json=body, timeout=30)
    assert response.status_code == 413 and "OSPREY_MAX_IMAGE_PIXELS" in response.json()["error"]


def test_a_normal_brush_webhook_still_stores_its_region(url):
    region = brush_region("ok", box_mask(4, 20, 4, 30), category="dog")
    response = requests.post(f"{url}/webhook", json=annotation_event(region, annotation_id=507), timeout=30)
    outcome = parsed(url, response)
    assert outcome["regions"] == 1 and "skipped" not in outcome


def _interactive_config() -> str:
    from pathlib import Path

    return (Path(__file__).resolve().parents[3] / "label_configs" / "interactive_sam.xml").read_text()
