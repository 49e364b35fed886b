"""Bulk pre-label: tasks per minute one task at a time against the cross-task batched engine.

The same tasks (random images, each with ``--regions`` drawn regions, or SAM's segment everything with
``--segment-everything``) go through :class:`backend.predict.tasks.TaskPredictor` with
``batch_tasks=1`` and with each ``--batch`` size, on the same models, with every field of
``label_configs/brush_full.xml``; the answers are checked to be the same, and one row per setting
gives the rate and the ratio to one task at a time. The settings run in turn ``--repeat`` times and
each row shows the median run, so a machine that drifts slows every setting alike.

    python bench/prelabel.py                                   # 'small' preset + tiny SAM on CPU
    python bench/prelabel.py --preset osprey-7b --sam vit_h --device cuda --tasks 32 --batch 4,8
    python bench/prelabel.py --json                            # one JSON object per row

``--pipeline``: the whole engine (task pages, claims, image fetch and decode, model, results, chunked
writes) against a stand-in Label Studio in its own process (``bench/standin_ls.py``: 50 ms per image,
50 ms per write, 10 ms per other read), serial vs pipelined, on each ``--presets`` preset: tasks/minute,
the ratio, model busy time / wall time, whether both wrote the same predictions, and the model alone on
the same tasks (images decoded in advance; the pipelined rate as a share of it). ``--memory``
adds the pipelined engine's resident memory on 1,000 and 10,000 tasks with the model left out (images
still fetched and decoded, results still built and written).

    python bench/prelabel.py --pipeline --presets tiny,small --tasks 48
    python bench/prelabel.py --pipeline --presets none --tasks 400   # the engine without a model (I/O only)
    python bench/prelabel.py --pipeline --memory --presets ""        # memory only

``--ray``: the whole ``osprey-label prelabel`` command through Ray Data on a local Ray (``--ray-cpus``
CPUs, ``--ray-actors`` model actors) against the in-process engine, on the same stand-in Label Studio,
each ``--presets`` preset: tasks/minute, the ratio, and whether both wrote the same predictions
(``bench/prelabel_ray.py``).

    python bench/prelabel.py --ray --presets tiny --tasks 64 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.labelstudio.results import region_result  # noqa: E402
from backend.labelstudio.schema import parse_label_config  # noqa: E402
from backend.predict.options import PredictOptions  # noqa: E402
from backend.predict.tasks import TaskPredictor  # noqa: E402
from backend.runtime.models import Models  # noqa: E402
from osprey import Osprey  # noqa: E402
from osprey.sam import EverythingOptions, SamEverything, SamImageEmbedder, SamRefiner, build_sam  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "label_configs" / "brush_full.xml"


class Images:
    """A loader serving generated images by reference (no network in the timing)."""

    def __init__(self, images: dict[str, np.ndarray]) -> None:
        self.images = images

    def load(self, reference: str):
        return type("Loaded", (), {"rgb": self.images[reference]})()


def make_tasks(n: int, regions: int, schema, size=(480, 640), seed: int = 0) -> tuple[list[dict], dict]:
    rng = np.random.default_rng(seed)
    height, width = size
    yy, xx = np.mgrid[:height, :width]
    tasks, images = [], {}
    for t in range(n):
        image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        ref = f"/data/upload/1/bench-{t}.png"
        images[ref] = image
        result = []
        for r in range(regions):
            cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
            ry, rx = rng.uniform(0.05, 0.15) * height, rng.uniform(0.05, 0.15) * width
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            tool = schema.output_tool
            result.append(region_result(
                mask=mask, tool=tool.tag_type, from_name=tool.from_name, to_name=schema.image_name, width=width,
                height=height, label=tool.labels[0] if tool.labels else None, score=1.0, region_id=f"t{t}r{r}",
            ))  # fmt: skip
        annotations = [{"id": t, "result": result, "was_cancelled": False}] if regions else []
        tasks.append({"id": t + 1, "data": {"image": ref}, "annotations": annotations, "predictions": []})
    return tasks, images


def build_models(preset: str, sam: str, device: str | None, max_masks: int) -> Models:
    osprey = Osprey.from_pretrained(preset, device=device, random_weights=preset == "osprey-7b")
    sam_model = build_sam(sam, random_weights=sam != "tiny", device=osprey.device)
    return models_from(osprey, sam_model, sam, max_masks=max_masks)


def models_from(osprey: Osprey, sam_model, sam: str, *, max_masks: int, points_per_side: int = 8,
                points_per_batch: int = 64) -> Models:  # fmt: skip
    """The service's model bundle around already built models (a fresh, empty SAM embedding cache)."""
    embedder = SamImageEmbedder(sam=sam_model, model_id=f"sam_{sam}", max_images=2)
    options = EverythingOptions(points_per_side=points_per_side, points_per_batch=points_per_batch,
                                pred_iou_thresh=0.0, stability_score_thresh=0.0, min_mask_region_area=0,
                                max_masks=max_masks)  # fmt: skip
    return Models(region_model=osprey, refiner=SamRefiner(embedder=embedder),
                  everything=SamEverything(embedder=embedder, options=options), sam_model=sam, untrained=True)  # fmt: skip


def same(a, b, tol: float = 1e-3) -> bool:
    for x, y in zip(a, b, strict=True):
        if x.status != y.status or len(x.result or []) != len(y.result or []):
            return False
        for i, j in zip(x.result or [], y.result or [], strict=True):
            if {k: v for k, v in i.items() if k not in ("score", "id")} != {
                k: v for k, v in j.items() if k not in ("score", "id")
            }:
                return False
            if abs(i["score"] - j["score"]) > tol:
                return False
    return True


def timed_predict(engine, tasks, schema, device) -> tuple[float, list]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = engine.predict(tasks, schema)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small", help="tiny, small or osprey-7b (random weights)")
    parser.add_argument("--sam", default="tiny", help="tiny, vit_b, vit_l or vit_h (random weights)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument(
        "--regions", type=int, default=6, help="drawn regions per task (0: segment everything)"
    )
    parser.add_argument(
        "--segment-everything", action="store_true", help="SAM finds the regions (--regions 0)"
    )
    parser.add_argument("--max-masks", type=int, default=6)
    parser.add_argument("--batch", default="2,4,8", help="batch sizes to compare with one task at a time")
    parser.add_argument("--caption-tokens", type=int, default=8)
    parser.add_argument("--description-tokens", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each setting (the median is shown)")
    parser.add_argument(
        "--only", type=int, metavar="N", help="run batch_tasks=N alone (whole-process timers)"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--pipeline", action="store_true", help="the whole engine, serial vs pipelined")
    parser.add_argument(
        "--presets", default="tiny,small", help="with --pipeline: presets to run ('none': no model)"
    )
    parser.add_argument(
        "--memory", action="store_true", help="with --pipeline: RSS on 1,000 and 10,000 tasks"
    )
    parser.add_argument("--ray", action="store_true", help="the command through Ray Data vs in process")
    parser.add_argument("--ray-cpus", type=int, default=2, help="with --ray: CPUs of the local Ray")
    parser.add_argument("--ray-actors", type=int, default=1, help="with --ray: model actors")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, models: Models) -> list[dict]:
    """One row per setting (one task at a time, then each ``--batch`` size), on ``models``; with
    ``--only N`` one row of ``batch_tasks=N`` alone."""
    schema = parse_label_config(CONFIG.read_text())
    regions = 0 if args.segment_everything else args.regions
    device = models.region_model.device
    options = PredictOptions(
        max_caption_tokens=args.caption_tokens, max_description_tokens=args.description_tokens
    )
    tasks, images = make_tasks(args.tasks, regions, schema)
    loader = Images(images)

    def engine(batch: int) -> TaskPredictor:
        return TaskPredictor(models=models, loader=loader, options=options, batch_tasks=batch)

    engine(2).predict(tasks[:2], schema)  # warm-up: kernels, allocator
    if args.only is not None:
        seconds, _ = timed_predict(engine(args.only), tasks, schema, device)
        return [{"batch_tasks": args.only, "seconds": round(seconds, 2)}]
    sizes = [1, *(int(b) for b in args.batch.split(","))]
    times: dict[int, list[float]] = {size: [] for size in sizes}
    outputs: dict[int, list] = {}
    for _ in range(args.repeat):  # settings in turn (1, 2, 4, ..., 1, 2, 4, ...): drift hits all alike
        for size in sizes:
            seconds, outputs[size] = timed_predict(engine(size), tasks, schema, device)
            times[size].append(seconds)
    base_s = float(np.median(times[1]))
    rows = [
        {"setting": "one task at a time" if size == 1 else f"batched, {size} tasks", "batch_tasks": size,
         "seconds": float(np.median(times[size])), "runs": [round(t, 2) for t in times[size]],
         "same": same(outputs[size], outputs[1])}
        for size in sizes
    ]  # fmt: skip
    cfg = models.region_model.config
    for row in rows:
        row.update(
            model=cfg.name, sam=args.sam, device=str(device), tasks=args.tasks,
            regions_per_task=regions if regions else f"everything (<= {args.max_masks})",
            tasks_per_min=round(60 * args.tasks / row["seconds"], 2), ratio=round(base_s / row["seconds"], 2),
            seconds=round(row["seconds"], 2),
        )  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ray:
        from prelabel_ray import main as ray_main

        return ray_main(args)
    if args.pipeline:
        from prelabel_pipeline import main as pipeline_main

        return pipeline_main(args)
    models = build_models(args.preset, args.sam, args.device, args.max_masks)
    rows = run(args, models)
    if args.only is not None:
        print(json.dumps(rows[0]))
        return 0
    cfg, device = models.region_model.config, models.region_model.device
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(f"model {cfg.name} + SAM {args.sam} on {device}, dtype {models.region_model.model.dtype}; {args.tasks} tasks, "
              f"regions per task: {rows[0]['regions_per_task']}, all five fields of brush_full.xml")  # fmt: skip
        print(f"{'setting':<22} | {'seconds':>8} | {'tasks/min':>9} | {'ratio':>6} | same answers")
        print(f"{'-' * 22}-+-{'-' * 8}-+-{'-' * 9}-+-{'-' * 6}-+-------------")
        for r in rows:
            print(f"{r['setting']:<22} | {r['seconds']:>8.2f} | {r['tasks_per_min']:>9.1f} | {r['ratio']:>5.2f}x | "
                  f"{'yes' if r['same'] else 'NO'}")  # fmt: skip
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
