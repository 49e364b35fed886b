"""``osprey-label label``: label the regions of one image with Osprey. Registered by :mod:`backend.cli`."""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from PIL import Image, ImageOps


def _labels(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_label_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "label",
        help="label regions of one image with Osprey",
        description="Label each mask of an image. Masks are PNG files at the image's size; any "
        "non-zero pixel is inside the region.",
    )
    parser.add_argument(
        "--model", default="osprey-7b", help="preset (osprey-7b, tiny, small) or checkpoint dir"
    )
    parser.add_argument("--image", required=True, help="image file (EXIF orientation is applied)")
    parser.add_argument("--mask", action="append", required=True, help="mask PNG; repeat for more regions")
    parser.add_argument("--categories", help="comma-separated category label set ('' = open vocabulary)")
    parser.add_argument("--parts", help="comma-separated part label set")
    parser.add_argument("--attributes", help="comma-separated attributes (multi-label)")
    parser.add_argument("--caption", action="store_true", help="short caption")
    parser.add_argument("--description", action="store_true", help="detailed description")
    parser.add_argument("--max-caption-tokens", type=int, default=32)
    parser.add_argument("--max-description-tokens", type=int, default=256)
    parser.add_argument("--baseline", action="store_true", help="use the slow upstream-style flow")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.set_defaults(func=run_label)


def _read_mask(path: str) -> np.ndarray:
    with Image.open(path) as mask:
        return np.asarray(mask.convert("L")) > 0


def run_label(args: argparse.Namespace) -> int:
    from .api import Osprey
    from .fields import LabelRequest

    request = LabelRequest(
        categories=_labels(args.categories),
        parts=_labels(args.parts),
        attributes=_labels(args.attributes),
        caption=args.caption,
        description=args.description,
        max_caption_tokens=args.max_caption_tokens,
        max_description_tokens=args.max_description_tokens,
    )
    with Image.open(args.image) as raw:
        image = np.asarray(ImageOps.exif_transpose(raw).convert("RGB"))
    masks = [_read_mask(path) for path in args.mask]
    osprey = Osprey.from_pretrained(args.model, device=args.device)
    start = time.perf_counter()
    label = osprey.label_baseline if args.baseline else osprey.label
    results = label(image, masks, request)
    seconds = time.perf_counter() - start
    regions = [{"mask": path, **result.to_dict()} for path, result in zip(args.mask, results, strict=True)]
    if args.json:
        doc = {
            "model": osprey.model_id,
            "untrained": osprey.untrained,
            "seconds": seconds,
            "regions": regions,
        }
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if osprey.untrained:
        print(f"WARNING: {osprey.model_id} has random weights; these answers are meaningless.")
    for region in regions:
        print(f"{region.pop('mask')}:")
        region.pop("warning", None)
        for field, value in region.items():
            if isinstance(value, dict) and "label" in value:
                value = f"{value['label']} ({value['score']:.3f})"
            elif isinstance(value, dict):
                value = ", ".join(f"{k} {v:.3f}" for k, v in value.items())
            print(f"  {field}: {value}")
    print(f"{len(regions)} regions in {seconds:.2f} s ({'baseline' if args.baseline else 'fast'} path)")
    return 0
