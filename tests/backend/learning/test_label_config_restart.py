"""Label configs live in the training store: a training job retried after a restart (a new runtime on
the same MODEL_DIR, no ``/setup`` since) still finds its project's label config."""

from __future__ import annotations

import time

import numpy as np
from lsfakes import API_KEY, scene_png
from webhook_payloads import annotation_event, delivered

from backend.jobs import TRAINING_LANE
from backend.labelstudio.results import choices_result, region_result
from backend.runtime.runtime import build_runtime
from backend.runtime.settings import Settings
from backend.service.app import create_app

PROJECT = 51
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="label" toName="image">
    <Label value="left"/><Label value="right"/>
  </BrushLabels>
  <Choices name="colour_attributes" toName="image" perRegion="true" choice="multiple">
    <Choice value="red"/><Choice value="blue"/>
  </Choices>
</View>"""


def halves(task_id: int) -> list[dict]:
    """The left (red) and right (blue) halves of ``scene_png``'s 160x120 picture, as an annotator submits them."""
    left = np.zeros((120, 160), bool)
    left[:, :80] = True
    items = []
    for name, mask, colour in (("left", left, "red"), ("right", ~left, "blue")):
        rid = f"t{task_id}{name}"
        items.append(region_result(mask=mask, tool="BrushLabels", from_name="label", to_name="image", width=160,
                                   height=120, label=name, score=1.0, region_id=rid))  # fmt: skip
        items.append(choices_result(region_id=rid, from_name="colour_attributes", to_name="image",
                                    choices=[colour], score=1.0))  # fmt: skip
    return items


def test_a_job_retried_after_a_restart_finds_its_label_config(tiny_models, file_store, tmp_path):
    settings = Settings.from_env(
        {}, model_dir=tmp_path, label_studio_url=file_store.url, label_studio_api_key=API_KEY,
        osprey_model="tiny", sam_model="tiny", train_every=0, lora="false",
    )  # fmt: skip
    before = build_runtime(settings, models=tiny_models)
    client = create_app(before).test_client()
    # Label Studio sends the label config at /setup only; the webhooks below carry none.
    assert (
        client.post("/setup", json={"project": f"{PROJECT}.1700000000", "schema": CONFIG}).status_code == 200
    )
    for i in range(8):
        path = file_store.add(f"/data/upload/{PROJECT}/half{i}.png", scene_png(seed=i))
        event = annotation_event(halves(5100 + i), annotation_id=51000 + i, task_id=5100 + i, project_id=PROJECT,
                                 label_config=None, image=path)  # fmt: skip
        assert delivered(client, before, event)["status"] == "stored"
    job_id = before.queue.enqueue(str(PROJECT), "train", {"reason": "test"})
    claimed = before.queue.claim(
        "worker-killed-mid-job", lease_s=0.05, lane=TRAINING_LANE
    )  # its process dies with the job
    assert claimed is not None and claimed.job_id == job_id
    time.sleep(0.1)  # the lease runs out

    after = build_runtime(
        settings, models=tiny_models
    ).start()  # the restart: requeues the stale job, runs it
    try:
        deadline = time.monotonic() + 120
        while after.queue.job(job_id).status in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for worker in after.workers.values():
            assert worker.stop()
    job = after.queue.job(job_id)
    assert job.status == "done", job.error
    assert job.attempts == 2 and job.result["status"] in ("promoted", "not promoted"), job.result
    assert after.registry.info(str(PROJECT), job.result["version"]).train_examples > 0
    assert after.projects.label_config(str(PROJECT)) == CONFIG

    # /predict without a label_config also finds it after the restart (Label Studio may leave it out).
    restarted = create_app(after).test_client()
    task = {"id": 5100, "data": {"image": f"/data/upload/{PROJECT}/half0.png"}}
    body = {"tasks": [task], "project": f"{PROJECT}.1700000000", "params": {}}
    response = restarted.post("/predict", json=body)
    assert response.status_code == 200, response.json
    assert response.json["results"][0]["model_version"].startswith("tiny+sam-tiny")
