"""Stand-ins for Label Studio used by the backend tests: its upload storage over real HTTP."""

from __future__ import annotations

import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

API_KEY = "0123456789abcdef0123456789abcdef01234567"  # a legacy Label Studio token


def scene_png(width: int = 160, height: int = 120, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[:, : width // 2] = (200, 50, 40)
    rgb[height // 3 :, width // 2 :] = (40, 60, 210)
    rgb = np.clip(rgb + rng.integers(0, 30, rgb.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def send_png(handler: BaseHTTPRequestHandler, body: bytes) -> None:
    """Answer 200 with ``body`` as a PNG."""
    handler.send_response(200)
    handler.send_header("Content-Type", "image/png")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class ImageHost:
    """A plain image host (a bucket behind presigned URLs): every path answers ``body`` as a PNG, with
    no token; ``seen`` records the paths asked for. ``port``, ``close()``."""

    def __init__(self, body: bytes) -> None:
        self.seen: list[str] = []
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                host.seen.append(self.path)
                send_png(self, body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FileStore:
    """Serves ``/data/upload/<project>/<name>`` like Label Studio, only with the API token."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.auth_seen: list[str | None] = []
        store = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                store.auth_seen.append(self.headers.get("Authorization"))
                body = store.files.get(self.path)
                accept = self.headers.get("Accept", "*/*")
                if "*/*" not in accept:  # as Label Studio 1.23 does for a bare "image/*"
                    self.send_response(406)
                    self.end_headers()
                    return
                if self.headers.get("Authorization") != f"Token {API_KEY}":
                    self.send_response(401)
                    self.end_headers()
                    return
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                send_png(self, body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, path: str, body: bytes) -> str:
        self.files[path] = body
        return path

    def close(self) -> None:
        self.server.shutdown()
