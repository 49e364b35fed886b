"""Bytes per cached image in each tier, and the peak device memory of the default set-up.

For each preset: the weights of Osprey and SAM, one cached image in each tier (device: the whole
encoding; host and disk: vision features and image tokens, no prefix keys/values; SAM: its embedding),
the default cache budgets on the target device, the peak one request needs (SAM's segment everything
and Osprey's largest forward) and the total at the peak: weights + full default caches + that request.

- ``tiny`` and ``small`` (with SAM ``tiny``): built on the CPU and measured from real tensors (the
  request peak counted by ``LiveBytes`` while a real segment-everything task and its labelling run);
  the target is this machine.
- ``osprey-7b`` + ``vit_h`` and ``pixelrefer-lite-2b`` + ``vit_h``: built on the ``meta`` device, so the
  figures are exact from the shapes and nothing is allocated; the target is a 24 GB GPU (24e9 bytes, 0.5 GiB of it the CUDA context). Its
  request peak is broken down (SAM's segment everything, the vision tower, labelling's keys/values
  buffers with scoring chunks and decode groups, a LoRA step beside serving) twice: for 32 regions
  decoded at once with 256-token descriptions (2,048-token scoring chunks), and as the service sizes
  the work to fit the target GPU (``backend.runtime.budgets.fit_request``).

    python bench/memory.py                 # all four presets
    python bench/memory.py --preset pixelrefer-lite-2b
    python bench/memory.py --preset osprey-7b --gpu-gb 48
    python bench/memory.py --json          # one JSON object per row
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

from backend.runtime.budgets import derive_budgets, fit_request, host_memory, request_peak  # noqa: E402
from backend.runtime.settings import Settings  # noqa: E402
from osprey.inference.region_model import load_region_model  # noqa: E402
from osprey.runtime.feature_cache import nbytes  # noqa: E402
from osprey.runtime.memory import LiveBytes, weight_bytes  # noqa: E402
from osprey.sam.build import SAM_ARCHITECTURES, _assemble  # noqa: E402
from osprey.sam.memory import sam_embedding_bytes  # noqa: E402

GiB, MiB = 2**30, 2**20
CUDA_CONTEXT = GiB // 2
PRESETS = {"tiny": "tiny", "small": "tiny", "osprey-7b": "vit_h", "pixelrefer-lite-2b": "vit_h"}  # -> SAM
COMPUTED = ("osprey-7b", "pixelrefer-lite-2b")  # built on the meta device, for a GPU


def measured_request_peak(models) -> tuple[int, dict]:
    """A real segment-everything task and its labelling on the CPU, counted by LiveBytes; and what it
    costs to recompute each cached part (median ms of 3): the vision tower, the prefix, SAM's encoder."""
    from osprey.inference.fast import encode_prefix
    from osprey.inference.fields import LabelRequest
    from osprey.model.preprocess import preprocess_image

    rgb = np.random.default_rng(0).integers(0, 255, (768, 1024, 3), dtype=np.uint8)
    with torch.no_grad(), LiveBytes() as live:
        regions = models.everything.generate(rgb)
        models.region_model.label(rgb, [r.mask for r in regions] or [np.ones(rgb.shape[:2], bool)],
                            LabelRequest(categories=("a", "b"), caption=True, max_caption_tokens=8))  # fmt: skip
    osprey = models.region_model
    pixels = preprocess_image(rgb, image_size=osprey.config.vision.image_size)
    with torch.inference_mode():
        features, tokens = osprey.model.encode_pixels(pixels)
    costs = {
        "vision": lambda: osprey.model.encode_pixels(pixels),
        "prefix": lambda: encode_prefix(
            osprey.model, features, tokens, rgb.shape[:2], list(osprey._prefix_ids)
        ),
        "sam": lambda: models.everything.embedder.encode(rgb),
    }
    recompute = {}
    for name, run in costs.items():
        times = []
        for _ in range(3):
            started = time.perf_counter()
            with torch.inference_mode():
                run()
            times.append(time.perf_counter() - started)
        recompute[name] = round(1000 * sorted(times)[1], 1)
    return live.peak, recompute


def row_for(preset: str, gpu_bytes: int) -> dict:
    sam_model = PRESETS[preset]
    meta = preset in COMPUTED
    # the 7B row is computed for the service's defaults (32x32 segment everything); the measured CPU rows
    # run a small grid that keeps every mask, so the tiny models do real work in seconds
    small_grid = {} if meta else {"points_per_side": 8, "max_masks": 8, "pred_iou_thresh": 0.0,
                                  "stability_score_thresh": 0.0, "min_mask_region_area": 0}  # fmt: skip
    settings = Settings.from_env(
        {}, osprey_model=preset, sam_model=sam_model, device="cpu", training=False, **small_grid
    )
    if meta:
        osprey = load_region_model(preset, device="meta", dtype=torch.bfloat16, random_weights=True)
    else:  # the service's own models, caches included: measured from what it really holds
        from backend.runtime.models import load_models

        models = load_models(settings, device="cpu")
        osprey = models.region_model
    with torch.device("meta"):
        sam = _assemble(SAM_ARCHITECTURES[sam_model])
    sam_weights, osprey_weights = weight_bytes(sam), weight_bytes(osprey.model)
    encoding = osprey.encoding_bytes()
    if not meta:  # measured: a real encoding's tensors
        real = osprey.encode_image(np.zeros((480, 640, 3), np.uint8))
        assert nbytes(real) == encoding.whole and nbytes(real.state) == encoding.prefix_kv
    embedding = sam_embedding_bytes(SAM_ARCHITECTURES[sam_model])
    breakdown = None
    if meta:
        free = gpu_bytes - CUDA_CONTEXT - osprey_weights - sam_weights
        at_once = request_peak(
            settings, osprey, chunk_tokens=2048, decode_rows=32, encoding=encoding, lora=True
        )
        fitted = fit_request(settings, osprey, device_free=free, lora=True)
        breakdown = {
            "32 regions x 256 tokens at once": at_once,
            f"fitted to {gpu_bytes / 1e9:.0f} GB": fitted,
        }
        peak, recompute = fitted.peak, None
        host_total, host_available = 64 * GiB, 48 * GiB  # a typical GPU server; only the host tier uses it
        target, kind = f"GPU {gpu_bytes / 1e9:.0f} GB", "computed"
        budgets = derive_budgets(settings, device_kind="cuda", device_free=free, host_total=host_total,
                                 host_available=host_available, request_peak=peak)  # fmt: skip
        capacity = gpu_bytes - CUDA_CONTEXT
    else:
        peak, recompute = measured_request_peak(models)
        host_total, host_available = host_memory()
        target, kind = "this CPU (RAM)", "measured"
        budgets = derive_budgets(settings, device_kind="cpu", device_free=None, host_total=host_total,
                                 host_available=host_available, request_peak=peak)  # fmt: skip
        capacity = host_total
    osprey_items = min(settings.cache_images, budgets.osprey_device // encoding.whole)
    sam_items = min(settings.cache_images, budgets.sam_device // embedding)
    device_caches = osprey_items * encoding.whole + sam_items * embedding
    total = osprey_weights + sam_weights + device_caches + peak
    return {
        "preset": preset, "sam": sam_model, "figures": kind, "target": target,
        "osprey_weights_gib": round(osprey_weights / GiB, 3), "sam_weights_gib": round(sam_weights / GiB, 3),
        "osprey_device_mib_per_image": round(encoding.whole / MiB, 2),
        "osprey_prefix_kv_mib_per_image": round(encoding.prefix_kv / MiB, 2),
        "osprey_host_mib_per_image": round(encoding.slim / MiB, 2),
        "osprey_disk_mib_per_image": round(encoding.slim / MiB, 2),
        "disk_holds_prefix_kv": False,
        "sam_mib_per_image_each_tier": round(embedding / MiB, 2),
        "device_cache_images": {"osprey": int(osprey_items), "sam": int(sam_items)},
        "device_caches_gib": round(device_caches / GiB, 3),
        "host_budget_gib": round((budgets.osprey_host + budgets.sam_host) / GiB, 2),
        "disk_budget_gib": round((budgets.osprey_disk + budgets.sam_disk) / GiB, 2),
        "request_peak_gib": round(peak / GiB, 3),
        "peak_total_gib": round(total / GiB, 3),
        "capacity_gib": round(capacity / GiB, 2),
        "spare_gib": round((capacity - total) / GiB, 2),
        "recompute_ms_cpu": recompute,  # measured presets: vision tower, prefix, SAM encoder
        "request_breakdown": {
            name: {**part.to_dict(), "total_gib": round((osprey_weights + sam_weights + CUDA_CONTEXT
                                                        + encoding.whole + embedding + part.peak) / GiB, 3)}
            for name, part in (breakdown or {}).items()
        },  # computed presets: weights + context + the image being clicked's caches + that peak
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS), help="default: all four")
    parser.add_argument(
        "--gpu-gb", type=float, default=24.0, help="the GPU the computed presets are sized for (1e9 bytes)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = [row_for(p, int(args.gpu_gb * 1e9)) for p in (args.preset or list(PRESETS))]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print("per cached image (MiB): region model device = whole encoding, host/disk = features + image tokens; SAM "
          "embedding in each tier. Peak = weights + full default device caches + one request's peak.")  # fmt: skip
    header = (f"{'preset':<10} {'sam':<6} {'figures':<9} {'weights GiB':>12} {'dev MiB':>8} {'kv MiB':>7} "
              f"{'host/disk MiB':>13} {'SAM MiB':>7} {'cached (O/S)':>12} {'request GiB':>11} "
              f"{'peak GiB':>9} {'of GiB':>7} {'spare GiB':>9}  target")  # fmt: skip
    print(header)
    print("-" * len(header))
    for r in rows:
        weights = r["osprey_weights_gib"] + r["sam_weights_gib"]
        cached = f"{r['device_cache_images']['osprey']}/{r['device_cache_images']['sam']}"
        print(f"{r['preset']:<10} {r['sam']:<6} {r['figures']:<9} {weights:>12.2f} "
              f"{r['osprey_device_mib_per_image']:>8.2f} {r['osprey_prefix_kv_mib_per_image']:>7.2f} "
              f"{r['osprey_host_mib_per_image']:>13.2f} {r['sam_mib_per_image_each_tier']:>7.2f} {cached:>12} "
              f"{r['request_peak_gib']:>11.3f} {r['peak_total_gib']:>9.2f} {r['capacity_gib']:>7.2f} "
              f"{r['spare_gib']:>9.2f}  {r['target']}")  # fmt: skip
    for r in rows:
        if not r["request_breakdown"]:
            continue
        print(
            f"\n{r['preset']} + {r['sam']}: one request's peak by part (GiB), and the total with the weights, "
            f"{CUDA_CONTEXT / GiB:.1f} GiB of CUDA context and one cached image (of {r['capacity_gib']:.2f} GiB)"
        )
        parts = ("sam", "vision", "labelling", "lora_step", "lora_state", "peak", "total_gib")
        print(f"{'case':<34} {'chunk':>6} {'rows':>5} " + " ".join(f"{p:>10}" for p in parts))
        for name, b in r["request_breakdown"].items():
            values = [b[p] / GiB if p != "total_gib" else b[p] for p in parts]
            print(
                f"{name:<34} {b['chunk_tokens']:>6} {b['decode_rows']:>5} "
                + " ".join(f"{v:>10.2f}" for v in values)
            )
    for r in rows:
        if r["recompute_ms_cpu"]:
            cost = r["recompute_ms_cpu"]
            print(f"{r['preset']}: recomputing on this CPU takes {cost['vision']} ms (vision tower, kept on host/disk), "
                  f"{cost['prefix']} ms (prefix, recomputed), {cost['sam']} ms (SAM encoder, kept)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
