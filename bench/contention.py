"""A click while the model is busy: an annotator's interactive request alone, during a 20-task
Retrieve Predictions, and during a bulk pre-label, on the same runtime and models.

The click is a ``/predict`` with a keypoint ``context`` on ``interactive_sam.xml`` (SAM's decoder on a
cached embedding, then Osprey's category and caption for the mask); the batch is a ``/predict`` of
``--tasks`` tasks on ``brush_full.xml`` with segment everything (all inline: the budget is large); the
bulk pre-label is the pre-label engine over the same tasks. Each background run starts, the clicks
are timed while it runs, and the click's answer is checked to be the one it gets alone. One row per
situation: median click latency and the ratio to the click alone.

    python bench/contention.py                       # 'tiny' preset + tiny SAM on CPU
    python bench/contention.py --preset small        # 'small' preset
    python bench/contention.py --json                # one JSON object per row
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.runtime.models import load_models  # noqa: E402
from backend.runtime.runtime import build_runtime  # noqa: E402
from backend.runtime.settings import Settings  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "label_configs"
PROJECT = "1.1700000000"


class Images:
    """A loader serving generated images by reference (no network in the timing)."""

    def __init__(self, images: dict[str, np.ndarray]) -> None:
        self.images = images

    def load(self, reference: str):
        return type("Loaded", (), {"rgb": self.images[reference]})()


def make_images(n: int, size=(240, 320), seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        rgb = np.full((*size, 3), (70, 130, 70), np.uint8)
        y, x = rng.integers(10, size[0] // 2), rng.integers(10, size[1] // 2)
        rgb[y : y + size[0] // 3, x : x + size[1] // 3] = (210, 40, 40)
        out[f"/data/upload/1/c{i}.png"] = np.clip(rgb + rng.integers(0, 20, rgb.shape), 0, 255).astype(
            np.uint8
        )
    return out


def click_context(width: int, height: int) -> dict:
    return {"result": [{
        "id": "k1", "from_name": "click", "to_name": "image", "type": "keypointlabels", "is_positive": True,
        "original_width": width, "original_height": height, "image_rotation": 0,
        "value": {"x": 30.0, "y": 35.0, "width": 0.5, "keypointlabels": ["vehicle"]},
    }]}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", help="tiny, small or osprey-7b (random weights)")
    parser.add_argument("--sam", default="tiny", help="tiny, vit_b, vit_l or vit_h (random weights)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    settings = Settings.from_env(
        {}, osprey_model=args.preset, sam_model=args.sam, device=args.device, model_dir=Path(tempfile.mkdtemp()),
        points_per_side=4, max_masks=3, pred_iou_thresh=0.0, stability_score_thresh=0.0, min_mask_region_area=0,
        max_caption_tokens=8, max_description_tokens=16, predict_budget_s=3600.0, training=False,
    )  # fmt: skip
    images = make_images(args.tasks + 1)
    runtime = build_runtime(
        settings, models=load_models(settings, device=args.device, random_weights=True), loader=Images(images)
    )
    refs = list(images)
    click_task = {"id": 9999, "data": {"image": refs[-1]}, "annotations": [], "predictions": []}
    batch_tasks = [
        {"id": i + 1, "data": {"image": r}, "annotations": [], "predictions": []}
        for i, r in enumerate(refs[:-1])
    ]
    interactive, brush = (
        (CONFIGS / "interactive_sam.xml").read_text(),
        (CONFIGS / "brush_full.xml").read_text(),
    )
    height, width = images[refs[-1]].shape[:2]
    context = click_context(width, height)

    waits: list[float] = []

    def click() -> tuple[float, list]:
        started = time.perf_counter()
        answer = runtime.predictor.predict(
            tasks=[click_task], project=PROJECT, label_config=interactive, context=context
        )
        waits.append(runtime.scheduler.last_wait_s["interactive"])  # of that time, waiting for the model
        return time.perf_counter() - started, answer["results"][0]["result"]

    _, reference = click()  # warm-up (and the click's embedding is cached from here on)
    waits.clear()
    alone = [click()[0] for _ in range(args.clicks)]

    def retrieve():
        runtime.predictor.predict(tasks=batch_tasks, project=PROJECT, label_config=brush, context=None)

    def bulk():
        schema = runtime.projects.schema_for(brush)
        runtime.tasks_for(PROJECT.split(".")[0]).predict(batch_tasks, schema)

    rows = [{"situation": "click alone", "clicks": alone, "waits": list(waits)}]
    for name, background in (
        (f"click during a {args.tasks}-task batch", retrieve),
        ("click during a bulk pre-label", bulk),
    ):
        waits.clear()
        thread = threading.Thread(target=background, daemon=True)
        thread.start()
        while runtime.scheduler.stats()["holder"] is None and thread.is_alive():
            time.sleep(0.005)
        latencies, same = [], True
        for _ in range(args.clicks):
            if not thread.is_alive():
                break
            seconds, result = click()
            latencies.append(seconds)
            same &= _strip(result) == _strip(reference)
            time.sleep(0.05)  # let the background work take the model again
        thread.join()
        print(
            f"{name}: longest batch step {runtime.scheduler.stats()['max_step_s']['batch']:.3f} s",
            file=sys.stderr,
        )
        if len(latencies) < args.clicks:
            print(
                f"warning: the background work ended after {len(latencies)} clicks; give more --tasks",
                file=sys.stderr,
            )
        rows.append({"situation": name, "clicks": latencies, "waits": list(waits), "same_answer": same})
    base = statistics.median(alone)
    cfg = runtime.models.region_model.config
    for row in rows:
        median = statistics.median(row["clicks"]) if row["clicks"] else float("nan")
        row.update(model=cfg.name, sam=args.sam, device=args.device, median_s=round(median, 3), ratio=round(median / base, 2),
                   clicks=[round(c, 3) for c in row["clicks"]], same_answer=row.get("same_answer", True),
                   model_wait_s=round(statistics.median(row["waits"]), 3) if row["waits"] else float("nan"),
                   handovers=runtime.scheduler.stats()["handovers"])  # fmt: skip
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(f"model {cfg.name} + SAM {args.sam} on {args.device}; a click on interactive_sam.xml; background: {args.tasks} "
              f"segment-everything tasks of brush_full.xml")  # fmt: skip
        print(
            f"{'situation':<30} | {'median s':>8} | {'ratio':>6} | {'model wait s':>12} | same answer | clicks (s)"
        )
        print(f"{'-' * 30}-+-{'-' * 8}-+-{'-' * 6}-+-{'-' * 12}-+-------------+-----------")
        for r in rows:
            print(f"{r['situation']:<30} | {r['median_s']:>8.3f} | {r['ratio']:>5.2f}x | {r['model_wait_s']:>12.3f} | "
                  f"{'yes' if r['same_answer'] else 'NO':<11} | {r['clicks']}")  # fmt: skip
    return 0 if all(r["same_answer"] for r in rows) else 1


def _strip(result: list) -> list:
    """A result without its random region ids and float noise."""
    out = []
    for item in result:
        item = {k: v for k, v in item.items() if k not in ("id",)}
        if "score" in item:
            item["score"] = round(item["score"], 4)
        out.append(item)
    return out


if __name__ == "__main__":
    sys.exit(main())
