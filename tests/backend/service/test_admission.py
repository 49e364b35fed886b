"""Admission over real HTTP: the bound on concurrent webhooks (the app under waitress in this process,
with a runtime whose webhooks block until released), basic-auth decoding, and putting the webhook
secret on Label Studio's webhooks (against a local stand-in of Label Studio's webhook API)."""

from __future__ import annotations

import base64
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import requests
from waitress import create_server

from backend.labelstudio.api import LabelStudioClient
from backend.labelstudio.webhooks import WebhookHeaderRegistrar, WebhookRegistrationError
from backend.runtime.scheduler import ModelScheduler
from backend.runtime.settings import Settings
from backend.service.admission import ConcurrencyLimit, basic_auth_matches, webhook_secret
from backend.service.app import create_app
from backend.service.server import server_options


class BlockingRuntime:
    """The parts of a runtime the app calls, with webhooks that hold their slot until ``release``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = None  # no Label Studio API: no webhook header registration
        self.scheduler = ModelScheduler()
        self.models = SimpleNamespace(warning=lambda: None)
        self.intake = SimpleNamespace(receive=self.webhook)
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

    def submit(self, function, *args) -> None:
        function(*args)

    def health(self) -> dict:
        return {"model_version": "test"}

    def metrics(self) -> dict:
        return {}

    def webhook(self, action: str, payload: dict) -> dict:
        self.entered.release()
        self.release.wait(30)
        return {"status": "stored"}


@pytest.fixture
def served_app(tmp_path):
    settings = Settings.from_env(
        {}, model_dir=tmp_path, host="127.0.0.1", port=0, threads=8, webhook_concurrency=1
    )
    runtime = BlockingRuntime(settings)
    server = create_server(create_app(runtime), **server_options(settings))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}", runtime
    finally:
        runtime.release.set()
        server.close()


def test_webhooks_over_the_bound_get_503_with_retry_after_and_health_still_answers(served_app, caplog):
    url, runtime = served_app
    caplog.set_level(logging.WARNING, logger="backend.service.admission")
    event = {"action": "ANNOTATION_CREATED", "annotation": {"id": 1}}
    with ThreadPoolExecutor(6) as pool:
        first = pool.submit(requests.post, f"{url}/webhook", json=event, timeout=30)
        assert runtime.entered.acquire(timeout=30)  # the one slot is taken and held
        others = [pool.submit(requests.post, f"{url}/webhook", json=event, timeout=30) for _ in range(4)]
        refused = [future.result() for future in others]  # each waits 0.8 s for the held slot, then gives up
        health = requests.get(f"{url}/health", timeout=30)
        metrics = requests.get(f"{url}/metrics", timeout=30).json()
        runtime.release.set()
        assert first.result().status_code == 201
    assert [r.status_code for r in refused] == [503] * 4
    assert all(r.headers["Retry-After"] == "1" and "too many webhooks" in r.json()["error"] for r in refused)
    assert health.status_code == 200
    assert metrics["webhooks"] == {"limit": 1, "running": 1, "waiting": 0, "refused": 4}
    logged = [
        r.getMessage() for r in caplog.records if "refused webhook ANNOTATION_CREATED" in r.getMessage()
    ]
    assert len(logged) == 4 and all("OSPREY_WEBHOOK_CONCURRENCY" in line for line in logged)


def test_a_concurrency_limit_needs_a_positive_limit():
    with pytest.raises(ValueError, match="limit >= 1"):
        ConcurrencyLimit(name="webhooks", limit=0, max_waiting=0, wait_s=0.1)


def basic(raw: bytes) -> str:
    return "Basic " + base64.b64encode(raw).decode()


def test_basic_auth_takes_utf8_or_latin1_credentials_but_not_a_mix():
    user, password = "zoë", "pässwörd"
    assert basic_auth_matches(basic("zoë:pässwörd".encode()), user=user, password=password)
    assert basic_auth_matches(basic("zoë:pässwörd".encode("latin-1")), user=user, password=password)
    assert not basic_auth_matches(basic(b"zo\xc3\xab:p\xe4ssw\xf6rd"), user=user, password=password)
    assert not basic_auth_matches(basic("zoë:pässwörd!".encode()), user=user, password=password)
    assert basic_auth_matches(basic("ü:秘密:with colon".encode()), user="ü", password="秘密:with colon")
    assert not basic_auth_matches("Basic zoë", user=user, password=password)  # not base64 (nor ASCII)
    assert not basic_auth_matches(None, user=user, password=password)


def test_the_webhook_secret_is_configured_or_derived_from_the_password():
    assert webhook_secret(configured="s", basic_auth_pass="p") == "s"
    derived = webhook_secret(configured=None, basic_auth_pass="pässwörd")
    assert derived == webhook_secret(configured=None, basic_auth_pass="pässwörd") and len(derived) == 64
    assert "pässwörd" not in derived and webhook_secret(configured=None, basic_auth_pass=None) is None


class WebhookAPI:
    """Label Studio's ``/api/webhooks/`` list and update, on a free port, checking the token."""

    def __init__(self, hooks: list[dict], *, refuse_updates: bool = False) -> None:
        self.hooks = {hook["id"]: hook for hook in hooks}
        self.patches: list[tuple[int, dict]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, status: int, body) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                if self.headers.get("Authorization") != "Token legacy-key":
                    return self._answer(401, {"detail": "no"})
                project = self.path.split("project=", 1)[1]
                self._answer(200, [h for h in api.hooks.values() if str(h["project"]) == project])

            def do_PATCH(self):  # noqa: N802
                if refuse_updates:
                    return self._answer(403, {"detail": "You do not have permission"})
                hook_id = int(self.path.strip("/").split("/")[-1])
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.patches.append((hook_id, body))
                api.hooks[hook_id] = {**api.hooks[hook_id], **body}
                self._answer(200, api.hooks[hook_id])

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def registrar_for(api: WebhookAPI) -> WebhookHeaderRegistrar:
    client = LabelStudioClient(url=api.url, api_key="legacy-key")  # a legacy key goes as "Token <key>"
    return WebhookHeaderRegistrar(
        client=client,
        header="X-Osprey-Webhook-Secret",
        value="s3",
        submit=lambda function, *args: function(*args),
    )


def test_the_secret_goes_only_on_this_backends_webhook_and_only_once():
    api = WebhookAPI(
        [
            {"id": 1, "project": 7, "url": "http://backend:9090/webhook", "headers": {"X-Team": "a"}},
            {
                "id": 2,
                "project": 7,
                "url": "http://hooks.example.com/webhook",
                "headers": {},
            },  # a third party
            {"id": 3, "project": 7, "url": "http://backend:9090/other", "headers": {}},
            {"id": 4, "project": 8, "url": "http://backend:9090/webhook", "headers": {}},  # another project
        ]
    )
    registrar = registrar_for(api)
    assert registrar.ensure("7", "backend:9090") == [1]
    assert api.patches == [(1, {"headers": {"X-Team": "a", "X-Osprey-Webhook-Secret": "s3"}})]
    assert registrar.ensure("7", "backend:9090") == []  # already there: nothing sent
    assert len(api.patches) == 1


def test_a_refused_update_is_logged_with_what_to_do_and_retried_later(caplog):
    api = WebhookAPI(
        [{"id": 1, "project": 7, "url": "http://backend:9090/webhook", "headers": {}}], refuse_updates=True
    )
    registrar = registrar_for(api)
    with pytest.raises(WebhookRegistrationError, match="update webhook 1: HTTP 403"):
        registrar.ensure("7", "backend:9090")
    with caplog.at_level(logging.WARNING):
        registrar._ensure_logged("7", "backend:9090")
    [record] = [r for r in caplog.records if "could not add X-Osprey-Webhook-Secret" in r.getMessage()]
    assert "add the header by hand" in record.getMessage() and "s3" not in record.getMessage()
    assert registrar.ensure_in_background("7", "backend:9090")  # a failed project is tried again
