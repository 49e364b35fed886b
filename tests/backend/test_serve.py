"""``osprey-label serve`` in its own process answers real HTTP requests from this one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from lsfakes import API_KEY, scene_png

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(file_store, tmp_path_factory):
    port = free_port()
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        LABEL_STUDIO_URL=file_store.url,
        LABEL_STUDIO_API_KEY=API_KEY,
        OSPREY_MODEL="tiny",
        SAM_MODEL="tiny",
        OSPREY_DEVICE="cpu",
        OSPREY_POINTS_PER_SIDE="4",
        OSPREY_MAX_MASKS="2",
        OSPREY_PRED_IOU_THRESH="0",
        OSPREY_STABILITY_SCORE_THRESH="0",
        OSPREY_MIN_MASK_AREA="0",
        MODEL_DIR=str(tmp_path_factory.mktemp("models")),
        THREADS="4",
    )
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "backend.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process, log)
        yield url, log
    finally:  # also when start-up failed: never leave a server behind
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            time.sleep(0.5)
        if process.poll() is not None:
            pytest.fail(f"osprey-label serve exited early:\n{log.read_text()}")
    pytest.fail(f"osprey-label serve did not come up:\n{log.read_text()}")


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
