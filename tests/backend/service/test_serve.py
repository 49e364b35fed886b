"""``osprey-label serve`` in its own process answers real HTTP requests from this one."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
import requests
from lsfakes import API_KEY, scene_png
from serving import start_backend, tiny_backend_env

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def server(file_store, tmp_path_factory):
    env = tiny_backend_env(
        tmp_path_factory.mktemp("models"), LABEL_STUDIO_URL=file_store.url, LABEL_STUDIO_API_KEY=API_KEY
    )
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    try:
        process, url = start_backend(env, log, timeout_s=120)
    except RuntimeError as error:
        pytest.fail(str(error))
    try:
        yield url, log
    finally:  # never leave a server behind
        process.stop()


def test_serve_answers_health_setup_and_predict_over_http(server, file_store):
    url, log = server
    file_store.add("/data/upload/9/street.png", scene_png(seed=5))
    xml = (ROOT / "label_configs" / "brush_full.xml").read_text()
    health = requests.get(f"{url}/health", timeout=1)
    assert health.json()["model_version"] == "tiny+sam-tiny-untrained"
    setup = requests.post(f"{url}/setup", json={"project": "9.1700000000", "schema": xml}, timeout=3)
    assert setup.status_code == 200
    body = {
        "tasks": [{"id": 41, "data": {"image": "/data/upload/9/street.png"}}],
        "project": "9.1700000000",
        "label_config": xml,
        "params": {"login": None, "password": None, "context": None},
    }
    response = requests.post(f"{url}/predict", json=body, timeout=100)
    assert response.status_code == 200, response.text
    [prediction] = response.json()["results"]
    assert prediction["model_version"] == setup.json()["model_version"]
    assert any(item["type"] == "brushlabels" for item in prediction["result"])
    bad = requests.post(f"{url}/predict", data="{", headers={"Content-Type": "application/json"}, timeout=5)
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]
    assert requests.get(f"{url}/health", timeout=1).status_code == 200
    logged = log.read_text()
    assert API_KEY not in logged and "Traceback" not in logged


def test_sigterm_finishes_the_running_request_then_stops_every_thread(file_store, tmp_path):
    env = tiny_backend_env(tmp_path / "models", LABEL_STUDIO_URL=file_store.url, LABEL_STUDIO_API_KEY=API_KEY)
    process, url = start_backend(env, tmp_path / "serve.log", timeout_s=120)
    try:
        images = [file_store.add(f"/data/upload/9/term-{i}.png", scene_png(seed=70 + i)) for i in range(2)]
        body = {
            "tasks": [{"id": 50 + i, "data": {"image": image}} for i, image in enumerate(images)],
            "project": "9.1700000000",
            "label_config": (ROOT / "label_configs" / "captions_only.xml").read_text(),
            "params": {"login": None, "password": None, "context": None},
        }
        answers: list = []
        request = threading.Thread(
            target=lambda: answers.append(requests.post(f"{url}/predict", json=body, timeout=60)), daemon=True
        )
        request.start()
        deadline = time.monotonic() + 30
        while (
            "busy_s" in (health := requests.get(f"{url}/health", timeout=1).json()) and not health["busy_s"]
        ):
            assert time.monotonic() < deadline, "the prediction never started"
            time.sleep(0.02)
        process.popen.send_signal(signal.SIGTERM)
        assert process.popen.wait(timeout=60) == 0
        request.join(timeout=60)
        [answer] = answers
        assert answer.status_code == 200 and all(r.get("result") for r in answer.json()["results"])
    finally:
        process.stop()
    logged = (tmp_path / "serve.log").read_text()
    assert "stopped serving" in logged and "runtime closed: every thread it started has stopped" in logged
    assert "Traceback" not in logged
