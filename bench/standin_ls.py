"""A stand-in Label Studio for ``bench/prelabel.py --pipeline``: the API calls the pre-label engine
makes, over real HTTP, with Label Studio's latency added, in its own process (so the bench's memory
figures are the engine's alone).

    python bench/standin_ls.py --tasks 1000 --image-ms 50 --write-ms 50 --read-ms 10

Prints ``PORT <n>`` once it listens. One project (id 1) of ``--tasks`` tasks, ids 1..N, generated on the
fly (nothing per task is kept but the predictions written); each task's image is one of 16 PNG scenes
(random shapes on a noisy background, ``--size`` pixels), served after ``--image-ms``; prediction
imports answer after ``--write-ms``; task pages and other reads after ``--read-ms``. ``GET /bench/dump``
returns every task's predictions (to compare answers), ``POST /bench/reset`` forgets them.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image

CONFIG = (Path(__file__).resolve().parents[1] / "label_configs" / "brush_full.xml").read_text()
SCENES = 16


def scenes(size: int, count: int = SCENES) -> list[bytes]:
    """``count`` PNG images: a few filled ellipses and boxes on a noisy background."""
    out = []
    yy, xx = np.mgrid[:size, :size]
    for seed in range(count):
        rng = np.random.default_rng(seed)
        image = rng.integers(60, 120, (size, size, 3), dtype=np.uint8)
        for _ in range(4):
            cy, cx, ry, rx = rng.uniform(0.2, 0.8, 2).tolist() + rng.uniform(0.05, 0.2, 2).tolist()
            mask = ((yy / size - cy) / ry) ** 2 + ((xx / size - cx) / rx) ** 2 <= 1
            image[mask] = rng.integers(0, 255, 3, dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


class StandIn:
    def __init__(self, *, tasks: int, size: int, image_s: float, write_s: float, read_s: float) -> None:
        self.tasks, self.image_s, self.write_s, self.read_s = tasks, image_s, write_s, read_s
        self.pngs = scenes(size)
        self.predictions: dict[int, list[dict]] = {}
        self.next_id = 0
        self.lock = threading.Lock()

    def task(self, task_id: int) -> dict:
        with self.lock:
            predictions = [dict(p) for p in self.predictions.get(task_id, [])]
        return {"id": task_id, "data": {"image": f"/data/upload/1/{task_id}.png"}, "annotations": [],
                "predictions": predictions, "project": 1, "meta": {}, "updated_at": None}  # fmt: skip

    def route(self, method: str, path: str, query: dict, body: bytes):
        if method == "GET" and (match := re.fullmatch(r"/data/upload/1/(\d+)\.png", path)):
            time.sleep(self.image_s)
            return 200, self.pngs[int(match[1]) % SCENES]
        if method == "POST" and path == "/api/projects/1/import/predictions":
            time.sleep(self.write_s)
            items = json.loads(body)
            with self.lock:
                for item in items:
                    self.next_id += 1
                    self.predictions.setdefault(int(item["task"]), []).append({"id": self.next_id, **item})
            return 201, {"created": len(items)}
        if method == "POST" and path == "/bench/reset":
            with self.lock:
                self.predictions.clear()
            return 200, {}
        if method == "GET" and path == "/bench/dump":
            with self.lock:
                return 200, {str(k): v for k, v in self.predictions.items()}
        time.sleep(self.read_s)
        if method == "GET" and path == "/api/projects/1/":
            return 200, {"id": 1, "label_config": CONFIG}
        if method == "GET" and path == "/api/tasks/":
            return 200, self.page(query)
        if method == "DELETE" and (match := re.fullmatch(r"/api/predictions/(\d+)/", path)):
            with self.lock:
                for task, found in self.predictions.items():
                    self.predictions[task] = [p for p in found if p["id"] != int(match[1])]
            return 204, None
        return 404, {"detail": f"no route {method} {path}"}

    def page(self, query: dict) -> dict:
        ids = range(1, self.tasks + 1)
        if query.get("query"):  # the backend asks for chosen ids, or for those above an id (in id order)
            asked = json.loads(query["query"])
            if not asked["selectedItems"].get("all"):
                ids = [i for i in asked["selectedItems"]["included"] if 1 <= i <= self.tasks]
            for item in (asked.get("filters") or {}).get("items", []):
                if item["filter"] != "filter:tasks:id" or item["operator"] != "greater":
                    raise ValueError(f"the stand-in has no filter {item}")
                ids = [i for i in ids if i > int(item["value"])]
        page, size = int(query.get("page", 1)), int(query.get("page_size", 100))
        chosen = list(ids)[(page - 1) * size : page * size]
        return {"tasks": [self.task(i) for i in chosen], "total": len(ids)}


def serve(standin: StandIn) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def handle_any(self, method: str) -> None:
            parts = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, answer = standin.route(method, parts.path, query, body)
            data = (
                answer
                if isinstance(answer, bytes)
                else b""
                if answer is None
                else json.dumps(answer).encode()
            )
            self.send_response(status)
            self.send_header("Content-Type", "image/png" if isinstance(answer, bytes) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            self.handle_any("GET")

        def do_POST(self):  # noqa: N802
            self.handle_any("POST")

        def do_DELETE(self):  # noqa: N802
            self.handle_any("DELETE")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    return server


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--image-ms", type=float, default=50.0)
    parser.add_argument("--write-ms", type=float, default=50.0)
    parser.add_argument("--read-ms", type=float, default=10.0)
    args = parser.parse_args()
    server = serve(StandIn(tasks=args.tasks, size=args.size, image_s=args.image_ms / 1000,
                           write_s=args.write_ms / 1000, read_s=args.read_ms / 1000))  # fmt: skip
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
