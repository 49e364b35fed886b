"""The service with PixelRefer-Lite (tiny, random weights) as the region model: the same routes, configs,
clicks and head training as with Osprey, through the one region-model interface."""

from __future__ import annotations

import pytest
from lsfakes import API_KEY, scene_png
from test_api import CONFIGS, by_type, config, predict, task

from backend.runtime.runtime import build_runtime
from backend.runtime.settings import Settings
from backend.service.app import create_app

VERSION = "pixelrefer-lite-tiny+sam-tiny-untrained"


@pytest.fixture(scope="module")
def pixelrefer_models():
    from backend.runtime.models import load_models

    settings = Settings.from_env(
        {}, region_model="pixelrefer-lite-tiny", sam_model="tiny", device="cpu", points_per_side=4, max_masks=3,
        pred_iou_thresh=0.0, stability_score_thresh=0.0, min_mask_region_area=0,
    )  # fmt: skip
    return load_models(settings, device="cpu")


@pytest.fixture(scope="module")
def client(pixelrefer_models, file_store, tmp_path_factory):
    settings = Settings.from_env(
        {}, model_dir=tmp_path_factory.mktemp("models"), label_studio_url=file_store.url, label_studio_api_key=API_KEY,
        region_model="pixelrefer-lite-tiny", sam_model="tiny", points_per_side=4, max_masks=3, pred_iou_thresh=0.0,
        stability_score_thresh=0.0, min_mask_region_area=0, max_caption_tokens=4, max_description_tokens=6,
    )  # fmt: skip
    runtime = build_runtime(settings, models=pixelrefer_models)
    file_store.add("/data/upload/7/scene.png", scene_png())
    return create_app(runtime).test_client()


def test_region_model_setting_falls_back_to_osprey_model():
    assert Settings.from_env({"OSPREY_MODEL": "tiny"}).model_name == "tiny"
    assert Settings.from_env({"OSPREY_MODEL": "tiny", "REGION_MODEL": "pixelrefer-lite-2b"}).model_name == (
        "pixelrefer-lite-2b"
    )


def test_health_names_the_model(client):
    assert client.get("/health").json["model_version"] == VERSION


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.xml")))
def test_predict_with_each_shipped_config(client, name):
    response = predict(client, config(name), [task()])
    assert response.status_code == 200, response.json
    [prediction] = response.json["results"]
    assert prediction["model_version"] == VERSION
    groups = by_type(prediction["result"])
    regions = [r for kind in ("brushlabels", "polygonlabels") for r in groups.get(kind, [])]
    assert regions, prediction["result"]
    ids = {r["id"] for r in regions}
    for kind in ("choices", "textarea"):
        assert {item["id"] for item in groups.get(kind, [])} <= ids
    assert groups.get("textarea") or groups.get("choices")  # the region model answered
    assert all(0.0 <= item["score"] <= 1.0 for item in prediction["result"])


def test_interactive_click_refines_and_labels_one_region(client):
    context = {"result": [{
        "original_width": 160, "original_height": 120, "image_rotation": 0,
        "value": {"x": 25.0, "y": 50.0, "width": 0.625, "keypointlabels": ["animal"]},
        "is_positive": True, "id": "Xy12abCD", "from_name": "click", "to_name": "image", "type": "keypointlabels",
    }]}  # fmt: skip
    response = predict(client, config("interactive_sam.xml"), [task()], context)
    assert response.status_code == 200, response.json
    groups = by_type(response.json["results"][0]["result"])
    [region] = groups["brushlabels"]
    assert region["value"]["brushlabels"] == ["animal"]
    assert [c["id"] for c in groups["choices"]] == [region["id"]]
    assert groups["choices"][0]["value"]["choices"][0] in config("interactive_sam.xml")
