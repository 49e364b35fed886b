"""The learning loop with PixelRefer-Lite (tiny) as the region model: accepted regions train a head on
its region features (the whole image's tower features pooled in the mask, geometry, colour)."""

from __future__ import annotations

from lsfakes import API_KEY
from test_retraining import CONFIG, accepted_result, learning_curve_module, png
from webhook_payloads import annotation_event, delivered

from backend.runtime.models import load_models
from backend.runtime.runtime import build_runtime
from backend.runtime.settings import Settings
from backend.service.app import create_app

PROJECT = 8


def test_accepted_labels_train_a_head_on_pixelrefer_features(file_store, tmp_path):
    models = load_models(
        Settings.from_env({}, region_model="pixelrefer-lite-tiny", sam_model="tiny"), device="cpu"
    )
    scenes = learning_curve_module().make_scenes(30, seed=4)
    settings = Settings.from_env(
        {}, model_dir=tmp_path, label_studio_url=file_store.url, label_studio_api_key=API_KEY,
        region_model="pixelrefer-lite-tiny", sam_model="tiny", train_every=0, lora="false",
        max_caption_tokens=3, max_description_tokens=3,
    )  # fmt: skip
    runtime = build_runtime(settings, models=models)
    client = create_app(runtime).test_client()
    for i, scene in enumerate(scenes):
        image = file_store.add(f"/data/upload/{PROJECT}/shapes{i}.png", png(scene.image))
        event = annotation_event(accepted_result(scene, 800 + i), annotation_id=9500 + i, task_id=800 + i,
                                 project_id=PROJECT, label_config=CONFIG, image=image)  # fmt: skip
        assert delivered(client, runtime, event)["status"] == "stored"
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


def test_lora_jobs_are_off_for_pixelrefer_even_when_asked_and_the_log_says_why(tmp_path, caplog):
    """LoRA jobs train on Osprey's prompts; with PixelRefer-Lite serving, only the head trains."""
    models = load_models(
        Settings.from_env({}, region_model="pixelrefer-lite-tiny", sam_model="tiny"), device="cpu"
    )
    settings = Settings.from_env(
        {}, model_dir=tmp_path, region_model="pixelrefer-lite-tiny", sam_model="tiny", lora="true"
    )
    with caplog.at_level("WARNING", logger="backend.runtime.runtime"):
        runtime = build_runtime(settings, models=models)
    try:
        assert runtime.trainer.lora is None
        assert (
            "LoRA jobs are off: they fine-tune Osprey, and the region model is pixelrefer-lite" in caplog.text
        )
    finally:
        runtime.close()
