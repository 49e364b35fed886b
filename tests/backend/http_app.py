"""The Flask app served on a loopback port in this process (werkzeug's threaded server), so tests send
real HTTP requests and can still look inside: patch a function, count allocations."""

from __future__ import annotations

import threading
from contextlib import contextmanager

from werkzeug.serving import make_server


@contextmanager
def served_tiny_service(tiny_models, file_store, model_dir, upload: str):
    """The real app and runtime on the tiny models, with ``scene_png()`` stored in the fake Label Studio
    at ``upload``; yields the base URL."""
    from lsfakes import API_KEY, scene_png

    from backend.runtime.runtime import build_runtime
    from backend.runtime.settings import Settings
    from backend.service.app import create_app

    settings = Settings.from_env(
        {}, model_dir=model_dir, label_studio_url=file_store.url, label_studio_api_key=API_KEY,
        osprey_model="tiny", sam_model="tiny",
    )  # fmt: skip
    file_store.add(upload, scene_png())
    with served(create_app(build_runtime(settings, models=tiny_models))) as base:
        yield base


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
