"""Every route with payloads shaped like Label Studio 1.23's, good and bad, on the tiny models."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from lsfakes import API_KEY, scene_png

from backend.labelstudio.rle import decode_brush_rle, encode_brush_rle
from backend.runtime.runtime import build_runtime
from backend.runtime.scheduler import BACKGROUND
from backend.runtime.settings import Settings
from backend.service.app import create_app

CONFIGS = Path(__file__).resolve().parents[3] / "label_configs"
PROJECT = "7.1731000000"


def config(name: str) -> str:
    return (CONFIGS / name).read_text()


@pytest.fixture(scope="module")
def client(tiny_models, file_store, tmp_path_factory):
    settings = Settings.from_env(
        {}, model_dir=tmp_path_factory.mktemp("models"), label_studio_url=file_store.url, label_studio_api_key=API_KEY, osprey_model="tiny", sam_model="tiny",
        points_per_side=4, max_masks=3, pred_iou_thresh=0.0, stability_score_thresh=0.0, min_mask_region_area=0,
        predict_budget_s=3600.0,  # these tests read answers: a slow task on a loaded machine must not defer one
    )  # fmt: skip
    runtime = build_runtime(settings, models=tiny_models)
    file_store.add("/data/upload/7/scene.png", scene_png())
    return create_app(runtime).test_client()


def task(task_id: int = 1, image: str = "/data/upload/7/scene.png", **extra) -> dict:
    return {"id": task_id, "data": {"image": image}, "annotations": [], "predictions": [], **extra}


def predict(client, label_config: str, tasks: list[dict], context: dict | None = None):
    body = {
        "tasks": tasks,
        "model_version": None,
        "project": PROJECT,
        "label_config": label_config,
        "params": {"login": None, "password": None, "context": context},
    }
    return client.post("/predict", json=body)


def by_type(results: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for item in results:
        out.setdefault(item["type"], []).append(item)
    return out


# ---- health, setup ----


def test_health_answers_with_version_and_untrained_warning(client):
    for path in ("/", "/health"):
        response = client.get(path)
        assert response.status_code == 200
        assert response.json["status"] == "UP"
        assert response.json["model_version"] == "tiny+sam-tiny-untrained"
        assert "untrained" in response.json["warning"]
        assert "untrained" in response.headers["X-Osprey-Warning"]


@pytest.mark.parametrize(
    "name", ["brush_full.xml", "polygon_full.xml", "interactive_sam.xml", "captions_only.xml"]
)
def test_setup_accepts_each_shipped_config(client, name):
    body = {"project": PROJECT, "schema": config(name), "hostname": "http://localhost:8080", "access_token": "x",
            "extra_params": None}  # fmt: skip
    response = client.post("/setup", json=body)
    assert response.status_code == 200, response.json
    assert response.json["model_version"] == "tiny+sam-tiny-untrained"


def test_setup_refuses_configs_it_cannot_serve(client):
    response = client.post(
        "/setup", json={"project": PROJECT, "schema": '<View><Image name="i" value="$i"/></View>'}
    )
    assert response.status_code == 422
    assert "no region tool" in response.json["error"] and response.json["request_id"]
    assert client.post("/setup", json={"project": PROJECT}).status_code == 400


# ---- the three prediction modes ----


def test_segment_everything_labels_every_region_with_linked_fields(client):
    response = predict(client, config("brush_full.xml"), [task()])
    assert response.status_code == 200, response.json
    [prediction] = response.json["results"]
    assert prediction["model_version"] == "tiny+sam-tiny-untrained"
    groups = by_type(prediction["result"])
    regions = groups["brushlabels"]
    assert 1 <= len(regions) <= 3
    ids = {r["id"] for r in regions}
    for region in regions:
        assert region["original_width"] == 160 and region["original_height"] == 120
        assert decode_brush_rle(region["value"]["rle"], 160, 120).any()
        assert region["value"]["brushlabels"][0] in {"person", "vehicle", "animal", "furniture", "food", "plant",
                                                      "building", "other"}  # fmt: skip
    for kind in ("choices", "textarea"):
        assert {item["id"] for item in groups[kind]} <= ids  # linked to a region
    names = {item["from_name"] for item in prediction["result"]}
    assert {"label", "category", "part", "caption", "description"} <= names
    assert all(0.0 <= item["score"] <= 1.0 for item in prediction["result"])
    assert 0.0 < prediction["score"] <= 1.0


def test_interactive_click_refines_and_labels_one_region(client):
    context = {"result": [{
        "original_width": 160, "original_height": 120, "image_rotation": 0,
        "value": {"x": 25.0, "y": 50.0, "width": 0.625, "keypointlabels": ["animal"]},
        "is_positive": True, "id": "Xy12abCD", "from_name": "click", "to_name": "image", "type": "keypointlabels",
        "origin": "manual",
    }]}  # fmt: skip
    response = predict(client, config("interactive_sam.xml"), [task()], context)
    assert response.status_code == 200, response.json
    groups = by_type(response.json["results"][0]["result"])
    [region] = groups["brushlabels"]
    assert region["value"]["brushlabels"] == ["animal"]  # the label the annotator picked
    assert [c["id"] for c in groups["choices"]] == [region["id"]]
    assert groups["choices"][0]["value"]["choices"][0] in config("interactive_sam.xml")
    assert [t["id"] for t in groups["textarea"]] == [region["id"]]


def test_existing_polygon_regions_are_labelled_in_place(client):
    annotation = {"id": 31, "result": [{
        "id": "poly1", "from_name": "label", "to_name": "image", "type": "polygonlabels",
        "original_width": 160, "original_height": 120, "image_rotation": 0,
        "value": {"points": [[10, 10], [45, 10], [45, 80], [10, 80]], "closed": True, "polygonlabels": ["person"]},
    }], "was_cancelled": False, "created_at": "2026-11-20T10:00:00Z"}  # fmt: skip
    response = predict(client, config("polygon_full.xml"), [task(annotations=[annotation])])
    assert response.status_code == 200, response.json
    groups = by_type(response.json["results"][0]["result"])
    [region] = groups["polygonlabels"]
    assert region["id"] == "poly1"
    xs = [p[0] for p in region["value"]["points"]]
    assert min(xs) == pytest.approx(10, abs=2) and max(xs) == pytest.approx(45, abs=2)
    assert all(item["id"] == "poly1" for item in groups["choices"] + groups["textarea"])


def test_captions_only_config_fills_texts_for_existing_brush_regions(client):
    mask = np.zeros((120, 160), bool)
    mask[30:90, 90:150] = True
    prediction = {"id": 5, "model_version": "old", "result": [{
        "id": "b1", "from_name": "region", "to_name": "image", "type": "brushlabels",
        "original_width": 160, "original_height": 120, "image_rotation": 0,
        "value": {"format": "rle", "rle": encode_brush_rle(mask), "brushlabels": ["object"]},
    }]}  # fmt: skip
    xml = config("captions_only.xml")
    prediction["result"][0]["from_name"] = _output_tool(xml)
    response = predict(client, xml, [task(predictions=[prediction])])
    assert response.status_code == 200, response.json
    groups = by_type(response.json["results"][0]["result"])
    [region] = groups["brushlabels"]
    assert np.array_equal(decode_brush_rle(region["value"]["rle"], 160, 120), mask)
    assert sorted(t["from_name"] for t in groups["textarea"]) == sorted(
        s.from_name for s in _schema(xml).fields if s.field in ("caption", "description")
    )


def _schema(xml: str):
    from backend.labelstudio.schema import parse_label_config

    return parse_label_config(xml)


def _output_tool(xml: str) -> str:
    return _schema(xml).output_tool.from_name


# ---- batches, bad input, the runtime keeps serving ----


def test_a_failing_task_gets_no_result_and_a_reason(client):
    """An empty prediction of the current version would block the task in every later retrieve;
    without a ``result`` key Label Studio stores nothing for it, and the count stays one per task."""
    tasks = [task(1), task(2, image="/data/upload/7/missing.png"), task(3)]
    response = predict(client, config("captions_only.xml"), tasks)
    assert response.status_code == 200
    results = response.json["results"]
    assert len(results) == 3
    assert results[1] == {"score": 0.0, "model_version": "tiny+sam-tiny-untrained"}
    assert results[0]["result"] and results[2]["result"]
    [error] = response.json["errors"]
    assert error["index"] == 1 and error["task"] == 2 and "404" in error["error"]
    assert API_KEY not in str(response.json)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ("not json", 400, "must be JSON"),
        ({"tasks": "x"}, 400, "'tasks' in request body must be list"),
        ({"label_config": "<View/>"}, 400, "missing 'tasks'"),
        ({"tasks": [], "params": {"context": "x"}}, 400, "params.context"),
        (
            {"tasks": [task()], "label_config": "<View><Image name='i' value='$i'/></View>"},
            422,
            "no region tool",
        ),
        ({"tasks": [task()], "label_config": "<View><Image"}, 422, "cannot be served"),
    ],
)
def test_malformed_requests_get_4xx_with_a_message(client, body, status, message):
    response = (
        client.post("/predict", data=body) if isinstance(body, str) else client.post("/predict", json=body)
    )
    assert response.status_code == status
    assert message in response.json["error"]
    assert "Traceback" not in response.get_data(as_text=True)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"type": "keypointlabels", "value": {"x": 150.0, "y": 50.0, "width": 1, "keypointlabels": ["animal"]}},
         "outside"),
        ({"type": "brushlabels", "value": {"format": "rle", "rle": [0, 0, 0, 9, 1, 2, 3], "brushlabels": ["animal"]}},
         "rle"),
        ({"type": "ellipselabels", "value": {"x": 1, "y": 1, "radiusX": 2, "radiusY": 2}}, "ellipselabels"),
    ],
)  # fmt: skip
def test_bad_interactive_prompts_are_refused_and_the_service_goes_on(client, item, message):
    context = {"result": [{"original_width": 160, "original_height": 120, "image_rotation": 0, "id": "q",
                           "from_name": "click", "to_name": "image", **item}]}  # fmt: skip
    response = predict(client, config("interactive_sam.xml"), [task()], context)
    assert response.status_code == 400
    assert message in response.json["error"].lower()
    assert client.get("/health").status_code == 200
    good = predict(client, config("captions_only.xml"), [task()])
    assert good.status_code == 200 and good.json["results"][0]["result"]


def test_image_from_a_disallowed_host_is_refused_without_crashing(client):
    response = predict(
        client, config("captions_only.xml"), [task(image="http://169.254.169.254/latest/meta-data")]
    )
    assert response.status_code == 200
    assert "result" not in response.json["results"][0]  # nothing for Label Studio to store
    assert "169.254.169.254" in response.json["errors"][0]["error"]


def test_inline_data_uri_images_work(client):
    uri = "data:image/png;base64," + base64.b64encode(scene_png(seed=3)).decode()
    response = predict(client, config("captions_only.xml"), [task(image=uri)])
    assert response.status_code == 200 and response.json["results"][0]["result"]


# ---- webhook, metrics, auth ----


def test_webhook_answers_like_label_studio_ml(client):
    ignored = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 7}})
    assert ignored.status_code == 200 and ignored.json["status"] == "Unknown event"
    assert client.post("/webhook", json={"nothing": 1}).status_code == 400
    malformed = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "annotation": {"id": "x"}})
    assert malformed.status_code == 400 and malformed.json["error"]
    assert client.get("/health").status_code == 200  # and the runtime goes on


def test_metrics_count_requests_and_cache_use(client):
    metrics = client.get("/metrics").json
    assert metrics["model_version"] == "tiny+sam-tiny-untrained"
    assert metrics["routes"]["requests"]["/predict 200"] >= 1
    assert metrics["osprey_image_cache"]["misses"] >= 1 and metrics["osprey_image_cache"]["hits"] >= 1
    assert metrics["predictions"]["tasks ok"] >= 1
    for cache in ("osprey_image_cache", "sam_image_cache"):  # every tier in bytes and items
        stats = metrics[cache]
        assert stats["bytes"] > 0 and stats["items"] >= 1 and stats["max_bytes"] > 0
        assert {"host_bytes", "host_items", "host_hits", "disk_bytes", "disk_items", "evictions"} <= set(
            stats
        )
    assert metrics["cache_budgets"]["osprey_device"] > 0
    assert metrics["device_memory"] is None  # on a CPU; allocated/reserved bytes on CUDA
    times = metrics["request_times"]  # where /predict time went, by kind of request
    batch = times["batch"]
    assert batch["requests"] >= 1 and batch["model_s"] > 0 and 0.0 <= batch["overhead_share"] < 1.0
    assert batch["total_s"] >= batch["model_s"] + batch["other_s"] - 1e-3


def test_basic_auth_is_enforced_when_configured(tiny_models, tmp_path):
    settings = Settings.from_env(
        {}, model_dir=tmp_path, basic_auth_user="ls", basic_auth_pass="s3cret", osprey_model="tiny"
    )
    client = create_app(build_runtime(settings, models=tiny_models)).test_client()
    assert client.get("/health").status_code == 401
    good = "Basic " + base64.b64encode(b"ls:s3cret").decode()
    bad = "Basic " + base64.b64encode(b"ls:wrong").decode()
    assert client.get("/health", headers={"Authorization": bad}).status_code == 401
    assert client.get("/health", headers={"Authorization": good}).status_code == 200


def test_health_and_setup_answer_at_once_while_the_model_is_busy(tiny_models, file_store, tmp_path):
    import threading
    import time

    settings = Settings.from_env(
        {},
        model_dir=tmp_path,
        label_studio_url=file_store.url,
        label_studio_api_key=API_KEY,
        osprey_model="tiny",
        threads=3,
    )
    runtime = build_runtime(settings, models=tiny_models)
    client = create_app(runtime).test_client()
    file_store.add("/data/upload/7/scene.png", scene_png())
    xml = config("captions_only.xml")
    outcome = {}

    def long_prediction():
        outcome["response"] = runtime.predictor.predict(
            tasks=[task()], project=PROJECT, label_config=xml, context=None
        )

    release = threading.Event()

    def training_step():  # the model is busy: a training job holds it
        with runtime.scheduler.session(BACKGROUND):
            release.wait(60)

    holder = threading.Thread(target=training_step, daemon=True)
    holder.start()
    while runtime.scheduler.stats()["holder"] is None:
        time.sleep(0.01)
    try:
        waiting = threading.Thread(target=long_prediction, daemon=True)
        waiting.start()
        deadline = time.time() + 20
        while runtime.predictor._slots._value > 0:  # threads=3 leaves one slot; wait until it is taken
            assert time.time() < deadline and waiting.is_alive(), (
                f"the queued prediction did not start: {outcome}"
            )
            time.sleep(0.05)
        assert client.get("/health").status_code == 200  # answered while a training step holds the model
        assert client.post("/setup", json={"project": PROJECT, "schema": xml}).status_code == 200
        busy = predict(client, xml, [task()])
        assert busy.status_code == 503 and "busy" in busy.json["error"]
    finally:
        release.set()
    waiting.join(timeout=60)
    assert outcome["response"]["results"][0]["result"]
    assert predict(client, xml, [task()]).status_code == 200


def test_a_task_runs_the_vision_tower_once_even_without_a_cache(tiny_models):
    from backend.labelstudio.results import region_result
    from backend.labelstudio.schema import parse_label_config
    from backend.predict.options import PredictOptions
    from backend.predict.tasks import predict_task

    schema = parse_label_config(config("brush_full.xml"))
    mask = np.zeros((60, 80), bool)
    mask[10:40, 10:50] = True
    region = region_result(mask=mask, tool="BrushLabels", from_name="label", to_name="image", width=80,
                           height=60, label="person", score=1.0, region_id="r1")  # fmt: skip
    calls = []
    osprey, cache = tiny_models.region_model, tiny_models.region_model.cache
    hook = osprey.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    osprey.cache = None
    try:
        items, _ = predict_task(
            task={"predictions": [{"result": [region]}]}, rgb=np.zeros((60, 80, 3), np.uint8), schema=schema,
            context=None, models=tiny_models, options=PredictOptions(max_caption_tokens=2, max_description_tokens=2),
        )  # fmt: skip
    finally:
        osprey.cache = cache
        hook.remove()
    assert len(calls) == 1
    assert {item["from_name"] for item in items} >= {"label", "category", "caption"}
