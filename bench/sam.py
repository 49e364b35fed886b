"""Benchmark SAM refinement with cached image embeddings against re-encoding every click.

Measures, on one synthetic image:

- first click: encoder + decoder (empty cache);
- re-encode every click: the upstream flow (``SamPredictor.set_image`` per request), measured
  here by clearing the cache before each click;
- following clicks: decoder only, on the cached embedding (points, box, brush, polygon in turn);
- segment everything: on the cached embedding, and cold (encode + generate).

The speedup column is the median re-encode click divided by the row's median, both measured in
the same run. Weights are random (``--checkpoint`` loads real ones): timings do not depend on
them. Examples::

    .venv/bin/python bench/sam.py --model vit_b --device cpu
    .venv/bin/python bench/sam.py --model tiny --json
    .venv/bin/python bench/sam.py --model vit_h --device cuda --points-per-side 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from osprey.sam import (  # noqa: E402
    EverythingOptions,
    SamEverything,
    SamImageEmbedder,
    SamRefiner,
    build_sam,
    known_model_types,
)
from osprey.sam.embedding import ImageEmbedding  # noqa: E402
from osprey.sam.prompts import build_sam_prompt  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", nargs="+", default=["tiny"], choices=known_model_types())
    parser.add_argument("--checkpoint", default=None, help="real weights (one --model only); default random")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="image encoder dtype")
    parser.add_argument("--image-size", default="768x1024", help="HxW of the synthetic image")
    parser.add_argument("--reencode-clicks", type=int, default=2, help="clicks timed with a re-encode each")
    parser.add_argument(
        "--cached-clicks", type=int, default=10, help="following clicks on the cached embedding"
    )
    parser.add_argument(
        "--points-per-side", type=int, default=None, help="segment everything grid (cpu 8, gpu 32)"
    )
    parser.add_argument(
        "--points-per-batch", type=int, default=None, help="segment everything batch (cpu 16, gpu 64)"
    )
    parser.add_argument(
        "--pred-iou-thresh",
        type=float,
        default=None,
        help="segment everything filter (SAM's 0.88 with --checkpoint; 0 with random weights)",
    )
    parser.add_argument(
        "--stability-score-thresh",
        type=float,
        default=None,
        help="segment everything filter (SAM's 0.95 with --checkpoint; 0 with random weights)",
    )
    parser.add_argument("--no-everything", action="store_true", help="skip the segment-everything rows")
    parser.add_argument(
        "--no-cold-everything", action="store_true", help="skip the cold segment-everything row"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="JSON lines on stdout (one object per row)")
    args = parser.parse_args(argv)
    if args.checkpoint and len(args.model) != 1:
        parser.error("--checkpoint needs exactly one --model")
    if args.reencode_clicks < 1 or args.cached_clicks < 1:
        parser.error("--reencode-clicks and --cached-clicks must be >= 1")
    try:
        height, width = (int(v) for v in args.image_size.lower().split("x"))
    except ValueError:
        parser.error(f"--image-size must be HxW, e.g. 768x1024, got {args.image_size!r}")
    args.height, args.width = height, width
    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        parser.error("--device cuda given but torch sees no CUDA device")
    args.points_per_side = args.points_per_side or (32 if on_gpu else 8)
    args.points_per_batch = args.points_per_batch or (64 if on_gpu else 16)
    # Random weights pass no quality filter; without one, masks still flow through the whole
    # pipeline (NMS, RLE, sorting), so the time is representative of real weights.
    if args.pred_iou_thresh is None:
        args.pred_iou_thresh = 0.88 if args.checkpoint else 0.0
    if args.stability_score_thresh is None:
        args.stability_score_thresh = 0.95 if args.checkpoint else 0.0
    return args


def synthetic_image(height: int, width: int) -> np.ndarray:
    """A photo-sized RGB image with a few solid shapes over a noisy gradient."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 50, (height, width, 3), dtype=np.uint8)
    image[..., 1] += np.linspace(0, 150, width, dtype=np.uint8)[None, :]
    cv2.rectangle(image, (width // 10, height // 8), (width // 2, height // 2), (220, 40, 40), -1)
    cv2.circle(image, (3 * width // 4, height // 3), min(height, width) // 6, (40, 40, 220), -1)
    cv2.ellipse(
        image, (width // 2, 3 * height // 4), (width // 5, height // 10), 15, 0, 360, (240, 220, 60), -1
    )
    return image


def click_prompts(height: int, width: int) -> list[dict]:
    """Annotator inputs cycled through by the clicks: clicks, a box, a brush, a polygon."""
    brush = np.zeros((height, width), dtype=bool)
    cv2.circle(brush.view(np.uint8), (3 * width // 4, height // 3), min(height, width) // 7, 1, -1)
    return [
        {"points": [[0.3 * width, 0.3 * height]], "point_labels": [1]},
        {"points": [[0.3 * width, 0.3 * height], [0.75 * width, 0.33 * height]], "point_labels": [1, 0]},
        {"box_xyxy": [0.1 * width, 0.125 * height, 0.5 * width, 0.5 * height]},
        {"mask": brush},
        {
            "polygon": [
                (0.3 * width, 0.65 * height),
                (0.7 * width, 0.68 * height),
                (0.5 * width, 0.85 * height),
            ]
        },
    ]


def timed(fn: Callable[[], object], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def warm_up(refiner: SamRefiner, image: np.ndarray, device: str) -> None:
    """Run the decoder once on a dummy embedding (no encode); on a GPU also encode once."""
    sam = refiner.sam
    emb_hw = sam.prompt_encoder.image_embedding_size
    dummy = ImageEmbedding(
        features=torch.zeros(1, sam.prompt_encoder.embed_dim, *emb_hw, device=sam.device),
        original_size=image.shape[:2],
        input_size=refiner.embedder.transform.get_preprocess_shape(
            *image.shape[:2], refiner.embedder.encoder_size
        ),
    )
    prompt = build_sam_prompt(image.shape[:2], points=[[10, 10]])
    refiner._decode(dummy, prompt, multimask_output=True)
    if device.startswith("cuda"):
        refiner.embedder.encode(image[:64, :64].copy())


def bench_model(model_type: str, args: argparse.Namespace, sam=None) -> list[dict]:
    """The rows of one SAM model; ``sam`` is an already built one of ``model_type`` (else built here
    from ``args``)."""
    if sam is None:
        sam = build_sam(
            model_type,
            checkpoint=args.checkpoint,
            random_weights=args.checkpoint is None,
            device=args.device,
            dtype=DTYPES[args.dtype],
        )
    embedder = SamImageEmbedder(sam=sam, model_id=f"bench-{model_type}", max_images=4)
    refiner = SamRefiner(embedder=embedder)
    image = synthetic_image(args.height, args.width)
    prompts = click_prompts(args.height, args.width)
    warm_up(refiner, image, args.device)

    times: dict[str, list[float]] = {}
    refiner.cache.clear()
    times["first click (encode + decode)"] = [timed(lambda: refiner.refine(image, **prompts[0]), args.device)]

    baseline = []
    for i in range(args.reencode_clicks):
        refiner.cache.clear()
        baseline.append(timed(lambda i=i: refiner.refine(image, **prompts[i % len(prompts)]), args.device))
    times["re-encode every click (baseline)"] = baseline

    refiner.refine(image, **prompts[0])  # cache the embedding again
    times["following click (cached embedding)"] = [
        timed(lambda i=i: refiner.refine(image, **prompts[i % len(prompts)]), args.device)
        for i in range(args.cached_clicks)
    ]
    stats = refiner.cache.stats()
    if stats["misses"] != 1 or stats["hits"] < args.cached_clicks:
        raise RuntimeError(f"following clicks were expected to hit the cache, got {stats}")

    found = {}
    if not args.no_everything:
        options = EverythingOptions(
            points_per_side=args.points_per_side,
            points_per_batch=args.points_per_batch,
            pred_iou_thresh=args.pred_iou_thresh,
            stability_score_thresh=args.stability_score_thresh,
            max_masks=None,
        )
        everything = SamEverything(embedder=embedder, options=options)
        times["segment everything (cached embedding)"] = [
            timed(lambda: found.setdefault("cached", everything.generate(image)), args.device)
        ]
        if not args.no_cold_everything:
            refiner.cache.clear()
            times["segment everything (cold: encode + generate)"] = [
                timed(lambda: found.setdefault("cold", everything.generate(image)), args.device)
            ]

    reference = statistics.median(baseline)
    rows = []
    for case, samples in times.items():
        median = statistics.median(samples)
        row = {
            "model": model_type,
            "weights": "checkpoint" if args.checkpoint else "random",
            "device": str(sam.device),
            "dtype": args.dtype,
            "image_hw": [args.height, args.width],
            "case": case,
            "n": len(samples),
            "median_ms": round(1000 * median, 2),
            "min_ms": round(1000 * min(samples), 2),
            "max_ms": round(1000 * max(samples), 2),
            "speedup_vs_reencode": round(reference / median, 2),
            "torch_threads": torch.get_num_threads(),
        }
        if case.startswith("segment everything"):
            row["points_per_side"] = args.points_per_side
            row["masks"] = len(found["cached" if "cached" in case else "cold"])
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    header = ["model", "device", "case", "n", "median ms", "min ms", "speedup vs re-encode"]
    lines = [header]
    for row in rows:
        case = row["case"] + (
            f" [{row['points_per_side']}^2 pts, {row['masks']} masks]" if "masks" in row else ""
        )
        lines.append(
            [
                row["model"],
                row["device"],
                case,
                str(row["n"]),
                f"{row['median_ms']:.1f}",
                f"{row['min_ms']:.1f}",
                f"{row['speedup_vs_reencode']:.1f}x",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [
        "| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) + " |"
        for line in lines
    ]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for model_type in args.model:
        rows.extend(bench_model(model_type, args))
    table = format_table(rows)
    if args.json:
        for row in rows:
            print(json.dumps(row), flush=True)
        print(table, file=sys.stderr)
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
