"""A batch /predict Label Studio gave up on (it closed the connection at its ML_TIMEOUT_PREDICT) is
noticed: nothing more is predicted, and every task goes to the deferred job instead of being counted as
answered. Waitress, with our server options, tells the app that the client left."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
from lsapi_fake import FakeLabelStudio
from lsfakes import API_KEY, scene_png

from backend.runtime.runtime import build_runtime
from backend.runtime.settings import Settings
from backend.service.server import server_options

CONFIG = (Path(__file__).resolve().parents[3] / "label_configs" / "captions_only.xml").read_text()


@pytest.fixture
def svc(tiny_models, file_store, tmp_path):
    settings = Settings.from_env(
        {}, model_dir=tmp_path / "models", label_studio_url=file_store.url, label_studio_api_key=API_KEY,
        osprey_model="tiny", sam_model="tiny", predict_budget_s=600.0, prelabel_batch_tasks=2,
        max_caption_tokens=2, max_description_tokens=2, training=False,
    )  # fmt: skip
    runtime = build_runtime(settings, models=tiny_models, client=FakeLabelStudio())
    yield runtime
    runtime.close()


@pytest.fixture
def tasks(file_store):
    return [
        {"id": 60 + i, "data": {"image": file_store.add(f"/data/upload/7/gone-{i}.png", scene_png(seed=50 + i))},
         "annotations": [], "predictions": []}
        for i in range(4)
    ]  # fmt: skip


def test_a_batch_whose_client_left_defers_every_task_and_answers_none(svc, tasks):
    checks = []

    def disconnected() -> bool:  # Label Studio leaves after the first cross-task batch
        checks.append(len(checks))
        return len(checks) > 1

    answer = svc.predictor.predict(
        tasks=tasks, project="7", label_config=CONFIG, context=None, disconnected=disconnected
    )
    [job] = [j for j in svc.queue.jobs("7") if j.kind.startswith("prelabel-")]
    assert job.payload["task_ids"] == [60, 61, 62, 63]  # the one predicted before it left too
    assert not any("result" in r for r in answer["results"])
    counts = svc.counts.snapshot()
    assert counts["batches abandoned by Label Studio"] == 1 and counts["tasks deferred"] == 4
    assert svc.claims.held() == {}  # the job claims them when it runs


def test_a_batch_skips_tasks_another_writer_holds(svc, tasks):
    other = svc.claimer("7", svc.projects.version("7"), "command")
    assert other.claim([60, 61]) == {60, 61}
    answer = svc.predictor.predict(tasks=tasks, project="7", label_config=CONFIG, context=None)
    assert [("result" in r) for r in answer["results"]] == [False, False, True, True]
    assert svc.counts.snapshot()["tasks left to another writer"] == 2
    # the answered tasks stay claimed while Label Studio stores the answer; nobody else writes them
    assert other.claim([62, 63]) == set()


def test_waitress_tells_the_app_that_the_client_closed_the_connection():
    from waitress import create_server

    seen = threading.Event()
    gone: list[bool] = []

    def app(environ, start_response):
        check = environ["waitress.client_disconnected"]
        seen.set()
        for _ in range(200):  # a long batch, looking between its steps
            if check():
                gone.append(True)
                break
            time.sleep(0.05)
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps({"results": []}).encode()]

    settings = Settings.from_env({}, host="127.0.0.1", port=0, training=False)
    server = create_server(app, **server_options(settings))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        client = socket.create_connection(("127.0.0.1", server.effective_port))
        body = b'{"tasks": []}'
        client.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        assert seen.wait(10)
        client.close()  # Label Studio's timeout
        for _ in range(200):
            if gone:
                break
            time.sleep(0.05)
        assert gone == [True]
    finally:
        server.close()
