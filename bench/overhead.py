"""The backend's own share of a ``/predict``: everything that is not the model.

Runs the Flask app in-process (JSON in and out included) against images served over real HTTP on
127.0.0.1 as Label Studio serves uploads, so fetching and decoding them counts too: ``--clicks``
interactive requests on ``interactive_sam.xml`` (one image, as an annotator clicks), then
``--batches`` batch requests of ``--tasks`` new images each on ``brush_full.xml`` (segment everything,
brush RLE out). One row per kind, from the service's own ``/metrics`` ``request_times``: seconds holding
the model, waiting for it, and everything else, and that last part's share (target: under 5% on the
``small`` preset).

    python bench/overhead.py                  # 'small' preset + tiny SAM on CPU
    python bench/overhead.py --preset tiny
    python bench/overhead.py --json
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.runtime.models import load_models  # noqa: E402
from backend.runtime.runtime import build_runtime  # noqa: E402
from backend.runtime.settings import Settings  # noqa: E402
from backend.service.app import create_app  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "label_configs"
PROJECT = "1.1700000000"
API_KEY = "bench-token"


def png(seed: int, size=(480, 640)) -> bytes:
    rng = np.random.default_rng(seed)
    rgb = np.full((*size, 3), (70, 130, 70), np.uint8)
    y, x = rng.integers(10, size[0] // 2), rng.integers(10, size[1] // 2)
    rgb[y : y + size[0] // 3, x : x + size[1] // 3] = (210, 40, 40)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(rgb + rng.integers(0, 20, rgb.shape), 0, 255).astype(np.uint8)).save(
        buffer, "PNG"
    )
    return buffer.getvalue()


def serve(files: dict[str, bytes]) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small", help="tiny or small")
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--batches", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=4, help="tasks per batch request")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    files = {f"/data/upload/1/t{i}.png": png(i) for i in range(args.batches * args.tasks + 1)}
    server = serve(files)
    settings = Settings.from_env(
        {}, osprey_model=args.preset, sam_model="tiny", device="cpu", model_dir=Path(tempfile.mkdtemp()),
        label_studio_url=f"http://127.0.0.1:{server.server_port}", label_studio_api_key=API_KEY,
        points_per_side=8, max_masks=6, pred_iou_thresh=0.0, stability_score_thresh=0.0, min_mask_region_area=0,
        max_caption_tokens=8, max_description_tokens=16, predict_budget_s=3600.0, training=False,
    )  # fmt: skip
    runtime = build_runtime(settings, models=load_models(settings, device="cpu"))
    app = create_app(runtime)
    client = app.test_client()
    refs = list(files)
    interactive, brush = (
        (CONFIGS / "interactive_sam.xml").read_text(),
        (CONFIGS / "brush_full.xml").read_text(),
    )

    def post(tasks: list[dict], config: str, context: dict | None) -> None:
        body = {"tasks": tasks, "project": PROJECT, "label_config": config, "params": {"context": context}}
        response = client.post("/predict", json=body)
        assert response.status_code == 200 and all(r["result"] for r in response.json["results"]), (
            response.json
        )

    click = {"result": [{
        "id": "k1", "from_name": "click", "to_name": "image", "type": "keypointlabels", "is_positive": True,
        "original_width": 640, "original_height": 480, "image_rotation": 0,
        "value": {"x": 30.0, "y": 35.0, "width": 0.5, "keypointlabels": ["vehicle"]},
    }]}  # fmt: skip
    click_task = {"id": 999, "data": {"image": refs[-1]}, "annotations": [], "predictions": []}
    post([click_task], interactive, click)  # warm-up: first-call costs are not the backend's overhead
    app.extensions["request_times"].reset()  # the warm-up's first-call costs are not counted
    for _ in range(args.clicks):
        post([click_task], interactive, click)
    for b in range(args.batches):
        tasks = [{"id": b * args.tasks + i + 1, "data": {"image": refs[b * args.tasks + i]}, "annotations": [],
                  "predictions": []} for i in range(args.tasks)]  # fmt: skip
        post(tasks, brush, None)
    server.shutdown()
    stats = app.extensions["request_times"].stats()
    runtime.close()
    rows = [{"kind": kind, "model": args.preset, "sam": "tiny", **row} for kind, row in stats.items()]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"model {args.preset} + SAM tiny on cpu; images over HTTP on 127.0.0.1; JSON in and out included")
    print(
        f"{'request':<12} | {'n':>3} | {'total s':>8} | {'model s':>8} | {'wait s':>7} | {'other s':>8} | overhead"
    )
    print(f"{'-' * 12}-+-----+----------+----------+---------+----------+---------")
    for r in rows:
        print(f"{r['kind']:<12} | {r['requests']:>3} | {r['total_s']:>8.3f} | {r['model_s']:>8.3f} | "
              f"{r['wait_s']:>7.3f} | {r['other_s']:>8.3f} | {100 * r['overhead_share']:>6.2f}%")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
