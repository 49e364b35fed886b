"""The learning loop with PixelRefer-Lite (tiny) as the region model: accepted regions train a head on
its region features (the whole image's tower features pooled in the mask, geometry, colour), and LoRA
jobs fine-tune its own language model, as they do Osprey's."""

from __future__ import annotations

import json

from lsfakes import API_KEY
from test_retraining import CONFIG, accepted_result, learning_curve_module, png, train_head_and_lora
from webhook_payloads import annotation_event, delivered

from backend.runtime.budgets import request_peak
from backend.runtime.models import load_models
from backend.runtime.runtime import build_runtime
from backend.runtime.settings import Settings
from backend.service.app import create_app
from osprey.learning.adapters import LORA_TARGETS, LoraSettings
from osprey.learning.memory import adapter_parameters

PROJECT = 8
BASE = "pixelrefer-lite-tiny+sam-tiny-untrained"


def serving_accepted(file_store, tmp_path, scenes, *, lora: str, stem: str, first_task: int):
    """A runtime serving the tiny PixelRefer-Lite (``OSPREY_LORA=lora``) whose project PROJECT holds each
    scene as an accepted annotation (image ``<stem><i>.png``, task ``first_task + i``); and its client."""
    models = load_models(
        Settings.from_env({}, region_model="pixelrefer-lite-tiny", sam_model="tiny"), device="cpu"
    )
    settings = Settings.from_env(
        {}, model_dir=tmp_path, label_studio_url=file_store.url, label_studio_api_key=API_KEY,
        region_model="pixelrefer-lite-tiny", sam_model="tiny", train_every=0, lora=lora,
        max_caption_tokens=3, max_description_tokens=3,
    )  # fmt: skip
    runtime = build_runtime(settings, models=models)
    client = create_app(runtime).test_client()
    for i, scene in enumerate(scenes):
        image = file_store.add(f"/data/upload/{PROJECT}/{stem}{i}.png", png(scene.image))
        task = first_task + i
        event = annotation_event(accepted_result(scene, task), annotation_id=9000 + task, task_id=task,
                                 project_id=PROJECT, label_config=CONFIG, image=image)  # fmt: skip
        assert delivered(client, runtime, event)["status"] == "stored"
    return runtime, client


def test_accepted_labels_train_a_head_on_pixelrefer_features(file_store, tmp_path):
    scenes = learning_curve_module().make_scenes(30, seed=4)
    runtime, client = serving_accepted(
        file_store, tmp_path, scenes, lora="false", stem="shapes", first_task=800
    )
    assert delivered(client, runtime, {"action": "START_TRAINING", "project": {"id": PROJECT}})["train"]
    job = runtime.workers["training"].run_once()
    result = runtime.queue.job(job.job_id)
    assert result.status == "done", result
    [version] = runtime.registry.versions(str(PROJECT))
    outcome = result.result
    assert version.version == outcome["version"] == "v0001" and outcome["status"] in (
        "promoted",
        "not promoted",
    )
    assert outcome["model_version"] == "pixelrefer-lite-tiny+sam-tiny-untrained+p8-v0001"
    assert version.heldout_examples > 0 and "category_accuracy" in outcome["metrics"]
    runtime.close()


def test_lora_jobs_on_pixelrefer_write_an_adapter_version_that_is_served(file_store, tmp_path):
    """OSPREY_LORA works whichever model serves: the job fine-tunes PixelRefer-Lite's own LLM on samples
    in its own prompts, on the served model, and the project then serves the new adapter."""
    scenes = learning_curve_module().make_scenes(12, seed=11)
    runtime, client = serving_accepted(file_store, tmp_path, scenes, lora="true", stem="lora", first_task=600)
    try:
        assert runtime.trainer.lora is not None  # on, as OSPREY_LORA says
        runtime.trainer.lora.settings = LoraSettings(rank=4, learning_rate=1e-2, epochs=1, grad_accum=1)
        first = {"id": 600, "data": {"image": f"/data/upload/{PROJECT}/lora0.png"},
                 "predictions": [{"result": accepted_result(scenes[0], 600)}]}  # fmt: skip
        body = {"tasks": [first], "project": f"{PROJECT}.1", "label_config": CONFIG, "params": {}}
        before = client.post("/predict", json=body).json["results"][0]
        assert before["model_version"] == BASE

        head_result, folder = train_head_and_lora(client, runtime, PROJECT)
        saved = json.loads((folder / "lora" / "lora.json").read_text())
        assert saved["target_modules"] == list(LORA_TARGETS["qwen2"])  # Qwen2's layers, not Llama's
        head = head_result["status"] == "promoted"  # then carried along
        assert (folder / "head" / "head.json").is_file() == head
        assert runtime.registry.info(str(PROJECT), "v0002").kind == ("head+lora" if head else "lora")

        served = client.post("/predict", json=body).json["results"][0]
        assert served["model_version"] == f"{BASE}+p{PROJECT}-v0002"
        assert runtime.sessions._adapters.active == f"p{PROJECT}-v0002"
        scores = [item["score"] for item in served["result"]]
        assert scores != [item["score"] for item in before["result"]]  # the adapter answers
        other = {**body, "project": "99.1"}  # another project: the base model, its adapter switched off
        assert client.post("/predict", json=other).json["results"][0] == {**before}
        assert runtime.sessions._adapters.active is None
    finally:
        runtime.close()


def test_the_budget_counts_a_lora_job_on_pixelrefer():
    """A LoRA step and the adapter's state (all seven Qwen2 projections) are in PixelRefer's peak."""
    models = load_models(
        Settings.from_env({}, region_model="pixelrefer-lite-tiny", sam_model="tiny"), device="cpu"
    )
    settings = Settings.from_env({}, region_model="pixelrefer-lite-tiny", sam_model="tiny")
    model = models.region_model
    off = request_peak(settings, model, chunk_tokens=256, decode_rows=4, lora=False)
    on = request_peak(settings, model, chunk_tokens=256, decode_rows=4, lora=True)
    assert off.lora_state == off.lora_step == 0
    assert on.lora_state == 16 * adapter_parameters(model.model.llm.config, LoraSettings()) > 0
    assert on.lora_step > 0 and on.peak == max(on.sam, on.vision, on.labelling, on.lora_step) + on.lora_state
