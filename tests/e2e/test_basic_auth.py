"""A backend behind basic auth, connected to a real Label Studio 1.23 with its credentials.

Answers: does Label Studio's automatically created webhook reach the backend once basic auth is on?
No: Label Studio calls ``/health``, ``/setup`` and ``/predict`` with the ML backend's credentials but
sends the webhook it created (``<url>/webhook``) with only the webhook's own extra headers, so the
backend refuses it (401) and the annotation would be lost. The backend therefore registers its
webhook secret header on that webhook at ``/setup``; with it, annotations arrive.
"""

from __future__ import annotations

import time

import pytest
import requests
from labelstudio import scene_png
from serving import ROOT, start_backend, tiny_backend_env

from backend.service.admission import WEBHOOK_SECRET_HEADER

pytestmark = pytest.mark.slow

USER = "label-studio"
PASSWORD = "pässwörd"  # non-ASCII; Label Studio (requests) sends it Latin-1 encoded


@pytest.fixture(scope="module")
def guarded_backend(label_studio, tmp_path_factory):
    env = tiny_backend_env(
        tmp_path_factory.mktemp("models"),
        LABEL_STUDIO_URL=label_studio.url,
        LABEL_STUDIO_API_KEY=label_studio.token,
        BASIC_AUTH_USER=USER,
        BASIC_AUTH_PASS=PASSWORD,
        OSPREY_TRAIN_EVERY="0",
        OSPREY_LORA="false",
    )
    log = tmp_path_factory.mktemp("guarded") / "serve.log"
    process, url = start_backend(env, log, auth=(USER, PASSWORD))
    try:
        yield url, log
    finally:
        process.stop()
    assert PASSWORD not in log.read_text() and label_studio.token not in log.read_text()


def polygon_annotation() -> list[dict]:
    return [
        {
            "id": "car1", "from_name": "label", "to_name": "image", "type": "polygonlabels",
            "origin": "manual", "original_width": 320, "original_height": 240, "image_rotation": 0,
            "value": {"points": [[10, 10], [40, 10], [40, 40], [10, 40]], "closed": True,
                      "polygonlabels": ["vehicle"]},
        }
    ]  # fmt: skip


def webhook_answers(url: str) -> dict[str, int]:
    """``/webhook`` answers by status, from the backend's ``/metrics``."""
    counts = requests.get(f"{url}/metrics", auth=(USER, PASSWORD), timeout=10).json()["routes"]["requests"]
    return {key.split()[1]: value for key, value in counts.items() if key.startswith("/webhook ")}


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} did not happen within {timeout_s:.0f} s")


def test_label_studio_webhooks_reach_a_backend_behind_basic_auth(label_studio, guarded_backend):
    api = label_studio.api
    url, log = guarded_backend
    project = api.create_project("e2e basic auth", (ROOT / "label_configs" / "polygon_full.xml").read_text())
    tasks = api.import_images(project["id"], {f"auth-{seed}.png": scene_png(seed) for seed in (40, 41)})
    ml = api.call(
        "POST", "/api/ml/", expect=201,
        json={"url": url, "project": project["id"], "title": "osprey", "is_interactive": True,
              "auth_method": "BASIC_AUTH", "basic_auth_user": USER, "basic_auth_pass": PASSWORD},
    )  # fmt: skip
    assert api.ml_backend(ml["id"])["state"] == "CO"  # connected: /health and /setup passed basic auth

    # Label Studio created the webhook with no headers; the backend added its secret after /setup
    def registered():
        hooks = api.call("GET", f"/api/webhooks/?project={project['id']}")
        mine = [hook for hook in hooks if hook["url"] == f"{url}/webhook"]
        return mine if mine and WEBHOOK_SECRET_HEADER in mine[0]["headers"] else None

    [hook] = wait_for(registered, 60, "registering the webhook secret on Label Studio's webhook")

    api.annotate(tasks[0]["id"], polygon_annotation())
    wait_for(lambda: webhook_answers(url).get("201"), 30, "the annotation webhook")

    # the question itself: without that header, Label Studio's webhook is refused
    api.call("PATCH", f"/api/webhooks/{hook['id']}/", json={"headers": {}})
    api.annotate(tasks[1]["id"], polygon_annotation())
    wait_for(lambda: webhook_answers(url).get("401"), 30, "the refused webhook")
    assert webhook_answers(url).get("201") == 1
    assert f"refused POST /webhook: bad or missing basic auth or {WEBHOOK_SECRET_HEADER}" in log.read_text()
