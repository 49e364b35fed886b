"""Brush RLE: the vectorised decoder against the bit-by-bit one it replaced, and the vectorised encoder
against label-studio-sdk's (bit strings), which it replaced.

Masks as Label Studio stores them (label-studio-sdk's encoder): one object and fifty objects on a
4096x4096 photo, a 4096x4096 frame of thin stripes and a 1024x1024 salt-and-pepper mask (the most runs
per byte; the SDK's encoder is too slow to write a 4096x4096 one). Both decoders must give the same
mask, both encoders the same bytes; the tables show the best of ``--repeat`` runs and the traced peak
memory of one.

    python bench/rle.py
    python bench/rle.py --repeat 5 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(
    0, str(ROOT / "tests" / "backend" / "labelstudio")
)  # the reference decoder lives with the tests

from rle_reference import reference_decode  # noqa: E402

from backend.labelstudio.rle import decode_brush_rle, encode_brush_rle  # noqa: E402


def ellipses(size: int, count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[:size, :size]
    mask = np.zeros((size, size), bool)
    for _ in range(count):
        cx, cy = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(size / 200, size / 6, 2)
        mask |= ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    return mask


def cases() -> dict[str, np.ndarray]:
    stripes = np.zeros((4096, 4096), bool)
    stripes[:, ::8] = True
    return {
        "4096x4096, one object": ellipses(4096, 1),
        "4096x4096, 50 objects": ellipses(4096, 50),
        "4096x4096, stripes every 8 px": stripes,
        "1024x1024, salt and pepper": np.random.default_rng(1).random((1024, 1024)) > 0.5,
    }


def measure(decode, rle, width, height, repeat: int) -> tuple[float, float, np.ndarray]:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        mask = decode(rle, width, height)
        best = min(best, time.perf_counter() - started)
    tracemalloc.start()
    try:
        decode(rle, width, height)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return best, peak, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    args = parser.parse_args()
    header = f"{'mask':32} {'rle bytes':>10} {'old ms':>9} {'new ms':>9} {'speed-up':>8} {'old MiB':>8} {'new MiB':>8}"
    if not args.json:
        print(header)
    for name, mask in cases().items():
        rle = encode_brush_rle(mask)
        height, width = mask.shape
        old_s, old_peak, old_mask = measure(reference_decode, rle, width, height, args.repeat)
        new_s, new_peak, new_mask = measure(decode_brush_rle, rle, width, height, args.repeat)
        if not np.array_equal(old_mask, new_mask) or not np.array_equal(new_mask, mask):
            raise SystemExit(f"{name}: the decoders disagree")
        row = {"mask": name, "rle_bytes": len(rle), "old_ms": round(old_s * 1000, 1),
               "new_ms": round(new_s * 1000, 1), "speedup": round(old_s / new_s, 1),
               "old_peak_mib": round(old_peak / 2**20, 1), "new_peak_mib": round(new_peak / 2**20, 1)}  # fmt: skip
        emit(args, {"step": "decode", **row}, name, rle)
    if not args.json:
        print("\nencoding (label-studio-sdk's encoder = old)")
        print(header)
    for name, mask in cases().items():
        height, width = mask.shape
        old_s, old_peak, old_rle = measure(lambda m, w, h: sdk_encode(m), mask, width, height, args.repeat)
        new_s, new_peak, new_rle = measure(
            lambda m, w, h: encode_brush_rle(m), mask, width, height, args.repeat
        )
        if old_rle != new_rle:
            raise SystemExit(f"{name}: the encoders disagree")
        row = {"mask": name, "rle_bytes": len(new_rle), "old_ms": round(old_s * 1000, 1),
               "new_ms": round(new_s * 1000, 1), "speedup": round(old_s / new_s, 1),
               "old_peak_mib": round(old_peak / 2**20, 1), "new_peak_mib": round(new_peak / 2**20, 1)}  # fmt: skip
        emit(args, {"step": "encode", **row}, name, new_rle)


def sdk_encode(mask: np.ndarray) -> list[int]:
    from label_studio_sdk.converter.brush import encode_rle

    return [int(b) for b in encode_rle(np.repeat((mask != 0).astype(np.uint8).ravel() * np.uint8(255), 4))]


def emit(args, row: dict, name: str, rle) -> None:
    if args.json:
        print(json.dumps(row))
    else:
        print(
            f"{name:32} {len(rle):>10} {row['old_ms']:>9.1f} {row['new_ms']:>9.1f} {row['speedup']:>7.1f}x "
            f"{row['old_peak_mib']:>8.1f} {row['new_peak_mib']:>8.1f}"
        )


if __name__ == "__main__":
    main()
