"""The blend a training job fits is saved with its head version: a restarted backend serves the same
weights and the same answers."""

from __future__ import annotations

import json

from lsfakes import API_KEY
from test_retraining import CONFIG, accepted_result, learning_curve_module, png
from webhook_payloads import annotation_event, delivered

from backend.runtime.runtime import build_runtime
from backend.runtime.settings import Settings
from backend.service.app import create_app

PROJECT = 6


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


def test_the_fitted_blend_is_served_again_after_a_restart(tiny_models, file_store, tmp_path):
    scenes = learning_curve_module().make_scenes(16, seed=11)
    tasks = [
        {"id": 700 + i, "data": {"image": file_store.add(f"/data/upload/{PROJECT}/s{i}.png", png(s.image))}}
        for i, s in enumerate(scenes)
    ]
    settings = Settings.from_env(
        {}, model_dir=tmp_path / "models", label_studio_url=file_store.url, label_studio_api_key=API_KEY,
        osprey_model="tiny", sam_model="tiny", train_every=0, lora="false",
    )  # fmt: skip
    runtime = build_runtime(settings, models=tiny_models)
    client = create_app(runtime).test_client()
    for i, (scene, task) in enumerate(zip(scenes, tasks, strict=True)):
        event = annotation_event(accepted_result(scene, task["id"]), annotation_id=7000 + i, task_id=task["id"],
                                 project_id=PROJECT, label_config=CONFIG, image=task["data"]["image"])  # fmt: skip
        assert delivered(client, runtime, event)["status"] == "stored"
    delivered(client, runtime, {"action": "START_TRAINING", "project": {"id": PROJECT}})
    job = runtime.workers["training"].run_once()
    outcome = runtime.queue.job(job.job_id).result
    version = outcome["version"]
    if outcome["status"] != "promoted":  # the gate's verdict is not what this test is about
        runtime.registry.promote(str(PROJECT), version)

    meta = json.loads((tmp_path / "models" / str(PROJECT) / version / "head" / "head.json").read_text())
    saved = {field["name"]: field["blend"] for field in meta["fields"]}
    assert saved["category"]["method"] == "cross-validation" and saved["category"]["examples"] >= 10
    assert outcome["blend"] == {name: blend["weight"] for name, blend in saved.items()}
    weights = runtime.projects.head(str(PROJECT)).head_weights()
    assert weights == outcome["blend"]
    # A task with regions already drawn (ids kept), so both answers can be compared item by item.
    task = dict(
        tasks[0], predictions=[{"result": accepted_result(scenes[0], 700), "model_version": "import"}]
    )
    before = predict(client, task)
    assert runtime.close()

    restarted = build_runtime(settings, models=tiny_models)
    try:
        assert restarted.projects.head(str(PROJECT)).head_weights() == weights
        # The same image and regions under another task id: this version already answered task 700.
        after = predict(create_app(restarted).test_client(), dict(task, id=799))
    finally:
        restarted.close()
    assert after["model_version"] == before["model_version"] == outcome["model_version"]
    assert after["result"] == before["result"] and after["score"] == before["score"]
