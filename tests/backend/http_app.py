"""The Flask app served on a loopback port in this process (werkzeug's threaded server), so tests send
real HTTP requests and can still look inside: patch a function, count allocations."""

from __future__ import annotations

import threading
from contextlib import contextmanager

from werkzeug.serving import make_server


@contextmanager
def served_tiny_service(tiny_models, file_store, model_dir, upload: str):
    """The real app and runtime on the tiny models, with ``scene_png()`` stored in the fake Label Studio
    at ``upload``; yields the base URL (a :class:`ServedURL`, whose ``runtime`` is the runtime)."""
    from lsfakes import API_KEY, scene_png

    from backend.runtime.runtime import build_runtime
    from backend.runtime.settings import Settings
    from backend.service.app import create_app

    settings = Settings.from_env(
        {}, model_dir=model_dir, label_studio_url=file_store.url, label_studio_api_key=API_KEY,
        osprey_model="tiny", sam_model="tiny",
    )  # fmt: skip
    file_store.add(upload, scene_png())
    runtime = build_runtime(settings, models=tiny_models)
    with served(create_app(runtime)) as base:
        url = ServedURL(base)
        url.runtime = runtime
        yield url
    runtime.close()


class ServedURL(str):
    """The base URL of an app served here, with ``runtime``: the runtime behind it."""

    runtime = None


def parsed(url: ServedURL, response) -> dict:
    """What the intake made of a webhook that ``/webhook`` answered with ``response`` (it parses after
    answering): waits for it, then returns its outcome."""
    assert response.status_code == 201, response.text
    assert url.runtime.intake.drain(timeout_s=60)
    return url.runtime.intake.outcome(response.json()["inbox_id"])


@contextmanager
def served(app):
    """Yield the base URL of ``app`` served on 127.0.0.1; the server stops on exit."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)
