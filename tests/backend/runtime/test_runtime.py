"""The composition root: one Runtime owns every thread it starts and stops them all; pre-label jobs run
beside training; our own errors are 500s with an error id, never blamed on the input; start-up checks
come before any model loads."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from lsapi_fake import FakeLabelStudio
from lsfakes import API_KEY, scene_png

from backend.runtime import startup
from backend.runtime.runtime import build_runtime, owned_threads
from backend.runtime.settings import Settings
from backend.runtime.startup import StartupError
from backend.service.app import create_app
from backend.service.command import main

CONFIGS = Path(__file__).resolve().parents[3] / "label_configs"
VERSION = "tiny+sam-tiny-untrained"


def settings_for(tmp_path, file_store, **extra) -> Settings:
    return Settings.from_env(
        {}, model_dir=tmp_path / "models", label_studio_url=file_store.url, label_studio_api_key=API_KEY,
        osprey_model="tiny", sam_model="tiny", device="cpu", max_caption_tokens=3, max_description_tokens=3,
        points_per_side=4, max_masks=2, pred_iou_thresh=0.0, stability_score_thresh=0.0, min_mask_region_area=0,
        **extra,
    )  # fmt: skip


def test_close_stops_every_thread_the_runtime_started(tiny_models, file_store, tmp_path):
    before = set(owned_threads())  # threads of runtimes that other tests left open
    runtime = build_runtime(settings_for(tmp_path, file_store), models=tiny_models).start()
    runtime.recorder.record("7", 1, VERSION, [{"id": "r", "type": "choices"}])  # the recorder's thread
    done = threading.Event()
    runtime.submit(done.set)  # the background thread
    assert done.wait(10)
    started = {thread.name for thread in set(owned_threads()) - before}
    assert any(name.startswith("osprey-worker-") for name in started)
    assert any(name.startswith("osprey-record") for name in started)
    assert any(name.startswith("osprey-background") for name in started)
    assert set(runtime.threads()) == set(owned_threads()) - before  # it knows what it started
    assert runtime.close(timeout_s=10) is True
    assert set(owned_threads()) - before == set() and runtime.threads() == []
    assert runtime.store.predicted_regions("7", 1)  # what was queued for the store was written first
    assert runtime.close() is True  # closing twice is harmless


def test_a_deferred_prelabel_job_runs_while_a_training_job_is_running(tiny_models, file_store, tmp_path):
    ls = FakeLabelStudio()
    tasks = []
    for i in range(3):
        image = file_store.add(f"/data/upload/7/lanes-{i}.png", scene_png(seed=60 + i))
        ls.add_task(70 + i, image)
        tasks.append({"id": 70 + i, "data": {"image": image}, "annotations": [], "predictions": []})
    settings = settings_for(tmp_path, file_store, predict_budget_s=0.001)  # every task is deferred
    runtime = build_runtime(settings, models=tiny_models, client=ls)
    training_started, release = threading.Event(), threading.Event()

    def long_training(project, kind, payload):  # a LoRA job that takes as long as the test wants
        training_started.set()
        assert release.wait(60)
        return {"status": "done"}

    runtime.workers["training"].handler = long_training
    runtime.queue.enqueue("7", "lora", {"reason": "test"})
    runtime.start()
    try:
        assert training_started.wait(30)
        config = (CONFIGS / "captions_only.xml").read_text()
        answer = runtime.predictor.predict(tasks=tasks, project="7", label_config=config, context=None)
        # a budget below the write reserve predicts nothing inline: every task goes to the prelabel lane
        assert ["result" in r for r in answer["results"]] == [False, False, False]
        deferred = [t["id"] for t in tasks]
        deadline = time.monotonic() + 120
        while not all(ls.of_version(t, VERSION) for t in deferred) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(len(ls.of_version(t, VERSION)) == 1 for t in deferred)
        assert not release.is_set() and runtime.workers["training"].current is not None  # still training
    finally:
        release.set()
        assert runtime.close(timeout_s=30)


def test_an_internal_error_is_a_500_with_an_error_id_in_the_log_not_a_400(
    tiny_models, file_store, tmp_path, caplog, monkeypatch
):
    runtime = build_runtime(settings_for(tmp_path, file_store), models=tiny_models)
    client = create_app(runtime).test_client()

    def broken(*args, **kwargs):
        raise ValueError("an index went wrong inside the backend")  # a bug of ours, not the user's input

    monkeypatch.setattr(runtime.predictor.batch, "predict", broken)
    body = {"tasks": [{"id": 1, "data": {"image": "/data/upload/7/x.png"}}], "project": "7.17",
            "label_config": (CONFIGS / "brush_full.xml").read_text(), "params": {}}  # fmt: skip
    with caplog.at_level(logging.ERROR):
        response = client.post("/predict", json=body)
    assert response.status_code == 500
    error_id = response.json["error_id"]
    assert error_id in response.json["error"] and "index went wrong" not in response.json["error"]
    [record] = [r for r in caplog.records if error_id in r.getMessage()]
    assert record.exc_info is not None and "index went wrong" in str(record.exc_info[1])
    bad = client.post("/predict", json={**body, "tasks": "not a list"})
    assert bad.status_code == 400 and "'tasks'" in bad.json["error"]  # bad input stays a 4xx
    runtime.close()


def test_a_task_that_fails_by_our_bug_says_internal_error_not_bad_input(
    tiny_models, file_store, tmp_path, monkeypatch
):
    from backend.predict import tasks as tasks_module

    runtime = build_runtime(settings_for(tmp_path, file_store, predict_budget_s=600.0), models=tiny_models)
    monkeypatch.setattr(tasks_module, "answer_tasks", lambda *a, **k: [][1])  # an IndexError of ours
    image = file_store.add("/data/upload/7/bug.png", scene_png(seed=3))
    answer = runtime.predictor.predict(
        tasks=[{"id": 5, "data": {"image": image}}], project="7",
        label_config=(CONFIGS / "captions_only.xml").read_text(), context=None,
    )  # fmt: skip
    [error] = answer["errors"]
    assert error["error"].startswith("internal error ") and "index" not in error["error"]
    runtime.close()


@pytest.mark.parametrize("setting", ["MODEL_DIR", "OSPREY_CACHE_DIR"])
def test_an_unwritable_folder_stops_the_server_before_any_model_loads(tmp_path, monkeypatch, capsys, setting):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text(f"a file where {setting} should be")
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv(setting, str(blocker / "folder"))
    monkeypatch.setenv("OSPREY_MODEL", "osprey-7b")  # weights that are not here: loading would fail later
    loaded = []
    monkeypatch.setattr("backend.runtime.runtime.load_models", lambda *a, **k: loaded.append(1))
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert setting in err and str(blocker / "folder") in err and "Traceback" not in err
    assert "weights are missing" not in err and not loaded


def test_a_gpu_that_torch_cannot_use_stops_the_server_with_the_driver_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("OSPREY_MODEL", "tiny")
    monkeypatch.setenv("SAM_MODEL", "tiny")
    monkeypatch.delenv("OSPREY_DEVICE", raising=False)
    monkeypatch.setattr(startup, "gpu_present", lambda: True)
    monkeypatch.setattr(startup, "driver_version", lambda: "535.104.05")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("torch.version.cuda", "13.0")
    loaded = []
    monkeypatch.setattr("backend.runtime.runtime.load_models", lambda *a, **k: loaded.append(1))
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "535.104.05" in err and "13.0" in err and "580.65.06" in err and "OSPREY_DEVICE=cpu" in err
    assert not loaded
    with pytest.raises(StartupError):
        build_runtime(Settings.from_env({}, model_dir=tmp_path, osprey_model="tiny", sam_model="tiny"))
    monkeypatch.setenv("OSPREY_DEVICE", "cpu")  # on the CPU on purpose: the start goes on
    assert startup.resolve_device_from_torch("cpu") == "cpu"
