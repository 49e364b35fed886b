"""Many regions, one image: the fast path against the upstream-style flow on the same model.

For 1, 5 and 20 regions and all five fields (category and part label sets, attributes, caption,
description), times the model's ``label_baseline`` (the authors' flow: one region and one question
per call, re-encoding and the full prompt each time) and ``label`` (encode once, shared-prefix cache,
packed regions) in one run, checks that both give the same answers, and prints a table with the
speed-up. Either region model: Osprey or PixelRefer-Lite.

    python bench/regions.py                                   # Osprey's 'small' preset on CPU
    python bench/regions.py --model pixelrefer-lite-small     # PixelRefer-Lite (or -tiny)
    python bench/regions.py --model osprey-7b --device cuda --random-weights   # 7B dimensions
    python bench/regions.py --json                            # one JSON object per row
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from osprey.inference.fields import LabelRequest
from osprey.inference.region_model import load_region_model

CATEGORIES = ("person", "dog", "cat", "car", "bicycle", "tree", "chair", "bottle")
PARTS = ("head", "body", "leg", "wheel")
ATTRIBUTES = ("red", "wooden", "small", "round")


def make_scene(num_regions: int, size: tuple[int, int] = (480, 640), seed: int = 0):
    """A random image and ``num_regions`` distinct elliptical masks."""
    rng = np.random.default_rng(seed)
    height, width = size
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    masks = []
    for _ in range(num_regions):
        cy, cx = rng.uniform(0.15, 0.85) * height, rng.uniform(0.15, 0.85) * width
        ry, rx = rng.uniform(0.05, 0.2) * height, rng.uniform(0.05, 0.2) * width
        masks.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1)
    return image, masks


def same_answers(a, b, tol: float = 1e-3) -> bool:
    for x, y in zip(a, b, strict=True):
        dx, dy = x.to_dict(), y.to_dict()
        for key in ("caption", "description"):
            if dx.get(key) != dy.get(key):
                return False
        for key in ("category", "part"):
            if dx[key]["label"] != dy[key]["label"]:
                return False
            if any(abs(dx[key]["scores"][k] - dy[key]["scores"][k]) > tol for k in dx[key]["scores"]):
                return False
        if any(abs(dx["attributes"][k] - dy["attributes"][k]) > tol for k in dx["attributes"]):
            return False
    return True


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, *args):
    sync(device)
    start = time.perf_counter()
    out = fn(*args)
    sync(device)
    return time.perf_counter() - start, out


def full_request(caption_tokens: int = 16, description_tokens: int = 32) -> LabelRequest:
    """All five fields: category and part label sets, attributes, caption, description."""
    return LabelRequest(
        categories=CATEGORIES,
        parts=PARTS,
        attributes=ATTRIBUTES,
        caption=True,
        description=True,
        max_caption_tokens=caption_tokens,
        max_description_tokens=description_tokens,
    )


def run(
    model,
    *,
    regions: Sequence[int] = (1, 5, 20),
    caption_tokens: int = 16,
    description_tokens: int = 32,
    deadline: float | None = None,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """One row per region count of ``model`` (a region model: :class:`~osprey.inference.api.Osprey` or
    :class:`~osprey.inference.pixelrefer.PixelReferLite`): baseline and fast seconds, speed-up, and
    whether the answers agree.

    ``deadline`` (a ``time.perf_counter()`` value): a region count whose time, extrapolated linearly
    from the previous row, would end after it is left out (the caller sees fewer rows). ``on_row`` is
    called with each row as soon as it is measured."""
    device = model.device
    request = full_request(caption_tokens, description_tokens)
    cfg = model.config
    warm_image, warm_masks = make_scene(1, seed=99)
    model.label(warm_image, warm_masks, request)  # warm-up: kernels, allocator
    rows: list[dict] = []
    for n in regions:
        if deadline is not None and rows:
            last = rows[-1]
            expected = (last["baseline_s"] + last["fast_s"]) * n / last["regions"]
            if time.perf_counter() + expected > deadline:
                break
        image, masks = make_scene(n, seed=n)
        t_base, base = timed(model.label_baseline, device, image, masks, request)
        t_fast, fast = timed(model.label, device, image, masks, request)
        rows.append({
            "model": cfg.name,
            "device": str(device),
            "regions": n,
            "fields": 5,
            "baseline_s": round(t_base, 3),
            "fast_s": round(t_fast, 3),
            "speedup": round(t_base / t_fast, 1),
            "fast_s_per_region": round(t_fast / n, 4),
            "same_answers": same_answers(fast, base),
        })  # fmt: skip
        if on_row is not None:
            on_row(rows[-1])
    return rows


def describe(model) -> str:
    """The model's name and the sizes that set its speed."""
    cfg = model.config
    llm = model.model.llm.config
    if model.family == "pixelrefer-lite":
        tokens = f"{cfg.mask_num} tokens per region, no image tokens"
    else:
        tokens = f"{cfg.vision.num_image_tokens} image tokens"
    return f"{cfg.name} ({llm.num_hidden_layers} layers, hidden {llm.hidden_size}, {tokens})"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", "--preset", dest="model", default="small",
        help="tiny, small, osprey-7b, pixelrefer-lite-tiny, pixelrefer-lite-small, pixelrefer-lite-2b or a "
        "checkpoint dir",
    )  # fmt: skip
    parser.add_argument("--device", default=None)
    parser.add_argument("--random-weights", action="store_true", help="full-size preset with random weights")
    parser.add_argument("--regions", default="1,5,20")
    parser.add_argument("--caption-tokens", type=int, default=16)
    parser.add_argument("--description-tokens", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    model = load_region_model(args.model, device=args.device, random_weights=args.random_weights)
    header = (
        f"model {describe(model)} on {model.device}, dtype {model.model.dtype}; "
        f"fields: {len(CATEGORIES)} categories, {len(PARTS)} parts, {len(ATTRIBUTES)} attributes, "
        f"caption <= {args.caption_tokens} tokens, description <= {args.description_tokens} tokens"
    )
    if not args.json:
        print(header)
    rows = run(
        model,
        regions=[int(x) for x in args.regions.split(",")],
        caption_tokens=args.caption_tokens,
        description_tokens=args.description_tokens,
        on_row=(lambda row: print(json.dumps(row), flush=True)) if args.json else None,
    )
    if not args.json:
        print(
            f"{'regions':>7} | {'baseline s':>10} | {'fast s':>8} | {'fast s/region':>13} | {'speed-up':>8} | same answers"
        )
        print(f"{'-' * 7}-+-{'-' * 10}-+-{'-' * 8}-+-{'-' * 13}-+-{'-' * 8}-+-------------")
        for r in rows:
            print(
                f"{r['regions']:>7} | {r['baseline_s']:>10.2f} | {r['fast_s']:>8.2f} | "
                f"{r['fast_s_per_region']:>13.3f} | {r['speedup']:>7.1f}x | {'yes' if r['same_answers'] else 'NO'}"
            )
    return 0 if all(r["same_answers"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
