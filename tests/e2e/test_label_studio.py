"""Label Studio itself drives the backend: projects for every shipped label config, images uploaded,
the backend connected, predictions retrieved and stored, an interactive click, annotations submitted,
the webhook received, training started from Label Studio and the new model version seen by it."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import requests
from labelstudio import scene_png
from serving import ROOT

pytestmark = pytest.mark.slow

CONFIGS = sorted((ROOT / "label_configs").glob("*.xml"))


def config_expectations(path: Path) -> tuple[set[str], dict[str, tuple[str, set[str]]]]:
    """From a label config: the result types of its region tools (batch predictions use the tools
    that are not ``smartOnly``), and each per-region field as ``from_name -> (type, allowed values)``."""
    root = ET.fromstring(path.read_text())
    region_types = {
        tag.tag.lower()
        for tag in root.iter()
        if tag.tag.endswith("Labels") and tag.get("smartOnly", "false") != "true"
    }
    fields = {}
    for tag in root.iter():
        if tag.get("perRegion") == "true" and tag.tag in ("Choices", "TextArea"):
            values = {choice.get("value") for choice in tag.iter("Choice")}
            fields[tag.get("name")] = (tag.tag.lower(), values)
    return region_types, fields


def connected_project(label_studio, osprey_backend, config: Path, images: dict[str, bytes]):
    api = label_studio.api
    project = api.create_project(f"e2e {config.stem}", config.read_text())
    tasks = api.import_images(project["id"], images)
    assert len(tasks) == len(images)
    ml = api.connect_backend(project["id"], osprey_backend.url)
    return project, tasks, ml


def check_prediction(prediction: dict, config: Path, model_version: str, size: tuple[int, int]) -> list[str]:
    """Everything Label Studio stored for one task is well formed; returns the region ids."""
    region_types, fields = config_expectations(config)
    assert prediction["model_version"] == model_version
    assert 0.0 < prediction["score"] <= 1.0
    result = prediction["result"]
    regions = [item for item in result if item["type"] in region_types]
    assert regions, f"no region in the stored prediction: {result}"
    width, height = size
    for item in result:
        assert 0.0 <= item["score"] <= 1.0, item
    for region in regions:
        assert (region["original_width"], region["original_height"]) == (width, height)
    by_region = {region["id"]: {} for region in regions}
    for item in result:
        if item["from_name"] in fields:
            assert item["id"] in by_region, f"{item['from_name']} is linked to no region"
            by_region[item["id"]][item["from_name"]] = item
    for region_id, linked in by_region.items():
        assert set(linked) == set(fields), f"region {region_id} lacks fields: {set(fields) - set(linked)}"
        for name, item in linked.items():
            kind, allowed = fields[name]
            assert item["type"] == kind
            if kind == "choices":
                assert item["value"]["choices"] and set(item["value"]["choices"]) <= allowed
            else:
                assert [text for text in item["value"]["text"] if isinstance(text, str)]
    return list(by_region)


@pytest.mark.parametrize("config", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_label_studio_retrieves_and_stores_predictions(label_studio, osprey_backend, config):
    api = label_studio.api
    images = {f"{config.stem}-{seed}.png": scene_png(seed) for seed in (1, 2)}
    project, tasks, ml = connected_project(label_studio, osprey_backend, config, images)
    assert ml["state"] == "CO", ml
    version = requests.get(f"{osprey_backend.url}/health", timeout=5).json()["model_version"]
    assert ml["model_version"] == version

    answer = api.retrieve_predictions(project["id"])
    assert answer["processed_items"] == 2, answer
    predictions = api.wait_for_predictions(project["id"], 2)
    assert sorted(p["task"] for p in predictions) == [task["id"] for task in tasks]
    for prediction in predictions:
        check_prediction(prediction, config, version, (320, 240))

    # the model version answered by /setup is the one in the predictions, so Label Studio does not
    # store a second copy when predictions are retrieved again
    api.retrieve_predictions(project["id"])
    assert len(api.predictions(project["id"])) == 2


def test_interactive_click_through_label_studio(label_studio, osprey_backend):
    config = ROOT / "label_configs" / "interactive_sam.xml"
    project, tasks, ml = connected_project(label_studio, osprey_backend, config, {"click.png": scene_png(3)})
    click = {
        "id": "click1",
        "from_name": "click",
        "to_name": "image",
        "type": "keypointlabels",
        "original_width": 320,
        "original_height": 240,
        "image_rotation": 0,
        "is_positive": True,
        "value": {"x": 30.0, "y": 40.0, "width": 0.6, "keypointlabels": ["vehicle"]},
    }
    answer = label_studio.api.interactive(ml["id"], tasks[0]["id"], {"result": [click]})
    assert not answer.get("errors"), answer
    result = answer["data"]["result"]
    [mask] = [item for item in result if item["type"] == "brushlabels"]
    assert mask["from_name"] == "mask" and mask["value"]["format"] == "rle" and mask["value"]["rle"]
    linked = {item["from_name"] for item in result if item["id"] == mask["id"] and item is not mask}
    assert linked == {"category", "caption"}


def wait_for_training(backend, project_id: int, timeout_s: float = 300) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        queue = backend.metrics()["training"]["queue"]
        finished = queue.get("last_finished")
        if finished and finished["project_id"] == str(project_id):
            return finished
        assert not queue.get("failed"), queue
        time.sleep(1)
    raise AssertionError(f"no training job finished in {timeout_s} s:\n{backend.log.read_text()[-3000:]}")


def test_annotations_train_a_version_that_label_studio_then_uses(label_studio, osprey_backend):
    api = label_studio.api
    config = ROOT / "label_configs" / "brush_full.xml"
    images = {f"train-{seed}.png": scene_png(seed) for seed in range(10, 15)}
    project, tasks, ml = connected_project(label_studio, osprey_backend, config, images)
    base_version = ml["model_version"]
    api.retrieve_predictions(project["id"])
    predictions = {p["task"]: p for p in api.wait_for_predictions(project["id"], len(tasks))}
    assert set(predictions) == {task["id"] for task in tasks}

    # The annotator accepts every predicted region and sets its closed-set fields to fixed answers
    answers = {"category": ["car"], "part": ["whole object"], "attributes": ["red"]}
    regions = 0
    for task in tasks:
        result = []
        for item in predictions[task["id"]]["result"]:
            item = {key: value for key, value in item.items() if key != "score"}
            if item["from_name"] in answers:
                item["value"] = {"choices": answers[item["from_name"]]}
            regions += item["type"] == "brushlabels"
            result.append(item)
        api.annotate(task["id"], result)

    # Label Studio's webhook delivered every annotation: the backend compared each with its prediction
    deadline = time.time() + 60
    while True:
        acceptance = osprey_backend.metrics()["training"]["acceptance"].get(str(project["id"]), {})
        fields = acceptance.get("fields", {})
        if fields.get("region", {}).get("kept") == regions or time.time() > deadline:
            break
        time.sleep(0.5)
    assert fields["region"]["kept"] == regions, acceptance
    assert fields["caption"]["kept"] == regions
    assert fields["category"]["kept"] + fields["category"]["edited"] == regions
    assert acceptance["matches"]["id"]["regions"] == regions
    assert set(acceptance["by_model_version"]) == {base_version}

    # Start Training in Label Studio -> START_TRAINING webhook -> a job trains and promotes a head
    api.train(ml["id"])
    finished = wait_for_training(osprey_backend, project["id"])
    assert finished["result"]["status"] == "promoted", finished
    new_version = finished["result"]["model_version"]
    assert new_version != base_version and new_version.startswith(base_version)

    # Label Studio reads the backend again (/setup) and from then on shows and stores the new version
    assert api.ml_backend(ml["id"])["model_version"] == new_version
    [new_task] = [
        task
        for task in api.import_images(project["id"], {"after-training.png": scene_png(20)})
        if task["id"] not in predictions
    ]
    api.retrieve_predictions(project["id"], [new_task["id"]])
    [fresh] = [
        p for p in api.wait_for_predictions(project["id"], len(tasks) + 1) if p["task"] == new_task["id"]
    ]
    check_prediction(fresh, config, new_version, (320, 240))


def test_the_client_reads_only_the_tasks_label_studio_selects(label_studio):
    """The sweeps' listings, filtered by Label Studio's own Data Manager across pages: tasks after an id
    (auto pre-label), annotated tasks, submitted or skipped, and the others (``prelabel --unannotated``),
    and tasks changed after a time (the reconciliation: saving or deleting an annotation touches its
    task)."""
    from datetime import datetime, timedelta

    from backend.labelstudio.api import LabelStudioAPIError, LabelStudioClient

    api = label_studio.api
    project = api.create_project("selected", (ROOT / "label_configs" / "captions_only.xml").read_text())
    api.import_tasks(project["id"], [{"image": f"/data/upload/none-{i}.png"} for i in range(7)])
    ids = [task["id"] for task in api.tasks(project["id"])]
    client = LabelStudioClient(url=label_studio.url, api_key=label_studio.token)
    listed = lambda **filters: [t["id"] for t in client.tasks(project["id"], page_size=2, **filters)]  # noqa: E731
    assert listed(after=ids[2]) == ids[3:]
    api.import_tasks(project["id"], [{"image": "/data/upload/none-late.png"}])
    [late] = listed(after=ids[-1])
    assert late > ids[-1] and listed() == [*ids, late]

    assert listed(annotated=True) == []
    newest = max(datetime.fromisoformat(t["updated_at"]) for t in client.tasks(project["id"]))
    time.sleep(1.1)
    submitted = api.annotate(ids[1], [])
    api.call("POST", f"/api/tasks/{ids[4]}/annotations/", expect=201,
             json={"result": [], "was_cancelled": True, "ground_truth": False})  # fmt: skip
    assert listed(annotated=True) == [ids[1], ids[4]]
    still = [i for i in [*ids, late] if i not in (ids[1], ids[4])]
    assert listed(unannotated=True) == still
    assert client.count_tasks(project["id"], unannotated=True) == len(still)
    assert listed(updated_after=newest) == [ids[1], ids[4]]
    changed = max(datetime.fromisoformat(t["updated_at"]) for t in client.tasks(project["id"]))
    time.sleep(1.1)
    api.call("DELETE", f"/api/annotations/{submitted['id']}/", expect=204)
    assert listed(updated_after=changed) == [ids[1]]  # its only annotation deleted: touched, listed
    assert listed(annotated=True) == [ids[4]]
    assert listed(updated_after=changed + timedelta(hours=1)) == []
    assert listed(annotated=True, after=ids[1]) == [ids[4]]

    # annotated while the unannotated tasks are listed: it leaves the selection, no other task is lost
    listing, read = client.tasks(project["id"], unannotated=True, page_size=2), []
    for task in listing:
        read.append(task["id"])
        if len(read) == 2:
            api.annotate(read[0], [])
    assert read == [i for i in [*ids, late] if i != ids[4]]

    # a view "no predictions yet", newest first, pre-labelled as it is read: every task read, its order kept
    view = api.call("POST", "/api/dm/views/", expect=201, json={"project": project["id"], "data": {
        "filters": {"conjunction": "and", "items": [
            {"filter": "filter:tasks:total_predictions", "operator": "equal", "type": "Number", "value": 0}]},
        "ordering": ["-tasks:id"]}})  # fmt: skip
    assert client.count_tasks(project["id"], view=view["id"]) == len(ids) + 1
    assert client.view(project["id"], view["id"])["project"] == project["id"]  # prelabel --view checks it
    other = api.create_project("other", (ROOT / "label_configs" / "captions_only.xml").read_text())
    with pytest.raises(LabelStudioAPIError, match=f"has no Data Manager tab {view['id']} .it is a tab of"):
        client.view(other["id"], view["id"])
    with pytest.raises(LabelStudioAPIError, match=f"has no Data Manager tab {view['id'] + 100};"):
        client.view(project["id"], view["id"] + 100)
    read = []
    for task in client.tasks(project["id"], view=view["id"], page_size=2):
        read.append(task["id"])
        client.create_predictions(project["id"], [{"task": task["id"], "result": [], "model_version": "v"}])
    assert read == sorted([*ids, late], reverse=True)
    assert list(client.tasks(project["id"], view=view["id"])) == []

    # a task deleted meanwhile: the whole import is refused (400, saying which) and none of it stored,
    # which the pre-label engine relies on when it leaves the deleted task out and writes the rest again
    api.call("DELETE", f"/api/tasks/{ids[0]}/", expect=204)
    with pytest.raises(LabelStudioAPIError, match=f"HTTP 400: .*{ids[0]}") as refused:
        client.create_predictions(
            project["id"], [{"task": t, "result": [], "model_version": "w"} for t in ids[2:0:-1] + ids[:1]]
        )
    assert refused.value.kind == "refused" and not refused.value.outcome_unknown
    assert not [
        p
        for t in client.tasks(project["id"], ids=ids[1:3])
        for p in t["predictions"]
        if p["model_version"] == "w"
    ]
