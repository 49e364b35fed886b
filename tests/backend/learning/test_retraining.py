"""The active-learning loop through the routes: predict, accept by webhook, train, serve the new version."""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path

import numpy as np
import pytest
from lsfakes import API_KEY
from PIL import Image
from webhook_payloads import annotation_event, delivered

from backend.labelstudio.results import choices_result, region_result
from backend.runtime.runtime import build_runtime
from backend.runtime.settings import Settings
from backend.service.app import create_app

ROOT = Path(__file__).resolve().parents[3]
PROJECT = 5
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="label" toName="image" smart="true">
    <Label value="circle"/><Label value="square"/><Label value="triangle"/>
  </BrushLabels>
  <Choices name="colour_attributes" toName="image" perRegion="true" choice="multiple">
    <Choice value="red"/><Choice value="green"/><Choice value="blue"/><Choice value="yellow"/>
  </Choices>
</View>"""


def learning_curve_module():
    spec = importlib.util.spec_from_file_location(
        "bench_learning_curve", ROOT / "bench" / "learning_curve.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def accepted_result(scene, task_id: int) -> list[dict]:
    """What the annotator submits: each region with its true shape and colour, linked by id."""
    items = []
    height, width = scene.masks[0].shape
    for i, (mask, shape, colour) in enumerate(zip(scene.masks, scene.shapes, scene.colours, strict=True)):
        rid = f"t{task_id}r{i}"
        items.append(region_result(mask=mask, tool="BrushLabels", from_name="label", to_name="image", width=width,
                                   height=height, label=shape, score=1.0, region_id=rid))  # fmt: skip
        items.append(choices_result(region_id=rid, from_name="colour_attributes", to_name="image",
                                    choices=[colour], score=1.0))  # fmt: skip
    return items


@pytest.fixture(scope="module")
def loop(tiny_models, file_store, tmp_path_factory):
    scenes = learning_curve_module().make_scenes(60, seed=4)
    tasks = []
    for i, scene in enumerate(scenes):
        path = file_store.add(f"/data/upload/{PROJECT}/shapes{i}.png", png(scene.image))
        tasks.append({"id": 500 + i, "data": {"image": path}})
    settings = Settings.from_env(
        {}, model_dir=tmp_path_factory.mktemp("models"), label_studio_url=file_store.url,
        label_studio_api_key=API_KEY, osprey_model="tiny", sam_model="tiny", train_every=0,
    )  # fmt: skip
    runtime = build_runtime(settings, models=tiny_models)
    return runtime, create_app(runtime).test_client(), scenes, tasks


def predict(client, task) -> dict:
    body = {
        "tasks": [task],
        "project": f"{PROJECT}.1700000000",
        "label_config": CONFIG,
        "params": {"context": None},
    }
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    return response.json["results"][0]


def test_accepted_labels_train_a_version_that_is_promoted_and_served(loop):
    runtime, client, scenes, tasks = loop
    base = client.post("/setup", json={"project": f"{PROJECT}.1700000000", "schema": CONFIG}).json[
        "model_version"
    ]
    assert base == "tiny+sam-tiny-untrained"

    # The first task already has regions (an imported prediction): the backend labels them and
    # remembers what it said, so the annotation below is scored for acceptance.
    first = dict(
        tasks[0], predictions=[{"result": accepted_result(scenes[0], 500), "model_version": "import"}]
    )
    before = predict(client, first)
    assert before["model_version"] == base

    for i, (scene, task) in enumerate(zip(scenes, tasks, strict=True)):
        event = annotation_event(accepted_result(scene, task["id"]), annotation_id=9000 + i, task_id=task["id"],
                                 project_id=PROJECT, label_config=CONFIG, image=task["data"]["image"])  # fmt: skip
        outcome = delivered(client, runtime, event)
        assert outcome["status"] == "stored", outcome
    assert runtime.store.count_accepted(str(PROJECT)) == sum(len(s.masks) for s in scenes)

    acceptance = client.get("/metrics").json["training"]["acceptance"][str(PROJECT)]
    category = acceptance["fields"]["category"]
    assert category["kept"] + category["edited"] == len(scenes[0].masks)  # only task 500 had a pre-label

    queued = delivered(client, runtime, {"action": "START_TRAINING", "project": {"id": PROJECT}})
    assert queued["train"] is True
    job = runtime.workers["training"].run_once()
    assert job is not None
    result = runtime.queue.job(job.job_id)
    assert result.status == "done", result
    version = runtime.registry.current(str(PROJECT))
    assert version is not None and version.version == "v0001", runtime.registry.versions(str(PROJECT))
    outcome = result.result
    print("training job:", outcome)
    assert outcome["status"] == "promoted" and version.heldout_examples > 0
    # The gate compared what would be served with what is served now, on held-out accepted labels.
    for name, value in outcome["current_metrics"].items():
        assert version.metrics[name] >= value
    assert version.metrics["category_accuracy"] > outcome["current_metrics"]["category_accuracy"] + 0.2

    served = client.post("/setup", json={"project": f"{PROJECT}.1700000000", "schema": CONFIG}).json
    assert served["model_version"] == "tiny+sam-tiny-untrained+p5-v0001"
    after = predict(client, first)
    assert after["model_version"] == served["model_version"]
    labels = [item["value"]["brushlabels"][0] for item in after["result"] if item["type"] == "brushlabels"]
    assert labels == scenes[0].shapes  # the project's own labels now decide

    # Rolling back serves the base model again, everywhere at once.
    runtime.registry.rollback(str(PROJECT))
    assert predict(client, first)["model_version"] == base


def test_a_worse_head_is_written_but_not_promoted(loop):
    from backend.learning.heldout import heldout

    runtime, client, scenes, tasks = loop
    project = str(PROJECT)
    if runtime.registry.current(project) is None:  # the first test ends with a rollback: promote again
        runtime.registry.promote(project, "v0001")
    before = runtime.registry.current(project)
    # The annotator "relabels" every training task with the wrong shapes; held-out tasks keep the truth.
    wrong = {"circle": "square", "square": "triangle", "triangle": "circle"}
    for i, (scene, task) in enumerate(zip(scenes, tasks, strict=True)):
        if heldout(task["id"], 9000 + i):
            continue
        bad = type(scene)(image=scene.image, masks=scene.masks, shapes=[wrong[s] for s in scene.shapes],
                          colours=scene.colours)  # fmt: skip
        event = annotation_event(accepted_result(bad, task["id"]), action="ANNOTATION_UPDATED",
                                 annotation_id=9000 + i, task_id=task["id"], project_id=PROJECT,
                                 label_config=CONFIG, image=task["data"]["image"], updated_at="2025-06-01T11:00:00.000000Z")  # fmt: skip
        assert delivered(client, runtime, event)["status"] == "stored"
    delivered(client, runtime, {"action": "START_TRAINING", "project": {"id": PROJECT}})
    job = runtime.workers["training"].run_once()
    outcome = runtime.queue.job(job.job_id).result
    assert outcome["status"] == "not promoted", outcome
    assert "category_accuracy" in outcome["reason"]
    assert runtime.registry.current(project).version == before.version  # still served
    assert [v.version for v in runtime.registry.versions(project)][-1] == outcome["version"]  # but kept


def train_head_and_lora(client, runtime, project: int):
    """START_TRAINING for ``project``, then the training lane's two jobs (head, then LoRA), which must
    promote an adapter version ``v0002``; returns the head job's result and that version's folder."""
    queued = delivered(client, runtime, {"action": "START_TRAINING", "project": {"id": project}})
    assert queued["job_id"] and queued["lora_job_id"]
    head_job, lora_job = runtime.workers["training"].run_once(), runtime.workers["training"].run_once()
    assert (head_job.kind, lora_job.kind) == ("train", "lora")
    outcome = runtime.queue.job(lora_job.job_id).result
    assert runtime.queue.job(lora_job.job_id).status == "done", outcome
    assert outcome["heldout_answer_loss"] < outcome["served_answer_loss"], outcome
    assert outcome["status"] == "promoted" and outcome["version"] == "v0002"
    folder = runtime.registry.path(str(project), "v0002")
    assert (folder / "lora" / "adapter.safetensors").is_file()
    return runtime.queue.job(head_job.job_id).result, folder


def test_lora_jobs_write_head_and_adapter_versions_that_are_served(tiny_models, file_store, tmp_path):
    scenes = learning_curve_module().make_scenes(20, seed=11)
    settings = Settings.from_env(
        {}, model_dir=tmp_path, label_studio_url=file_store.url, label_studio_api_key=API_KEY,
        osprey_model="tiny", sam_model="tiny", train_every=0, lora="true",
    )  # fmt: skip
    runtime = build_runtime(settings, models=tiny_models)
    client = create_app(runtime).test_client()
    project = 6
    for i, scene in enumerate(scenes):
        path = file_store.add(f"/data/upload/{project}/l{i}.png", png(scene.image))
        event = annotation_event(accepted_result(scene, 700 + i), annotation_id=7700 + i, task_id=700 + i,
                                 project_id=project, label_config=CONFIG, image=path)  # fmt: skip
        assert delivered(client, runtime, event)["status"] == "stored"
    _, folder = train_head_and_lora(client, runtime, project)
    assert (folder / "head" / "head.json").is_file()
    assert runtime.registry.info(str(project), "v0002").kind == "head+lora"

    first = {"id": 700, "data": {"image": f"/data/upload/{project}/l0.png"},
             "predictions": [{"result": accepted_result(scenes[0], 700)}]}  # fmt: skip
    body = {"tasks": [first], "project": f"{project}.1", "label_config": CONFIG, "params": {}}
    served = client.post("/predict", json=body).json["results"][0]
    assert served["model_version"] == "tiny+sam-tiny-untrained+p6-v0002"
    assert runtime.sessions._adapters.active == "p6-v0002"
    # Another project is served by the base model: its adapter is switched off for it.
    other = {"tasks": [first], "project": "99.1", "label_config": CONFIG, "params": {}}
    assert (
        client.post("/predict", json=other).json["results"][0]["model_version"] == "tiny+sam-tiny-untrained"
    )
    assert runtime.sessions._adapters.active is None


def test_a_damaged_promoted_head_falls_back_to_osprey_alone(tiny_models, file_store, tmp_path, caplog):
    settings = Settings.from_env({}, model_dir=tmp_path, osprey_model="tiny", sam_model="tiny", lora="false")
    runtime = build_runtime(settings, models=tiny_models)

    def damaged(folder):
        (folder / "head").mkdir()
        (folder / "head" / "head.json").write_text("{not json")
        return {}

    info = runtime.registry.create("8", kind="head", base_model_version=tiny_models.version, write=damaged)
    runtime.registry.promote("8", info.version)
    assert runtime.projects.head("8") is None
    assert "cannot load head v0001" in caplog.text
