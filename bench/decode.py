"""Eager against compiled decoding on one model: the same answers, and what compiling buys.

For each region count, labels one image (encoded once, outside the timing) with all five fields, the
decoder eager (``OSPREY_COMPILE=off``) and compiled (``on``: ``torch.compile(fullgraph=True)``; on CUDA
each shape's step is also captured as a CUDA graph). The first compiled call pays the compilation and
is reported on its own; the medians are of the calls after it. Answers must agree with eager ones.

    python bench/decode.py                                          # tiny on the CPU (inductor)
    python bench/decode.py --preset osprey-7b --device cuda --dtype bf16 --random-weights
    python bench/decode.py --json                                   # one JSON object per row

On the CPU, inductor's generated C++ is usually no faster than eager for a model this small: the row
is there to prove the compiled step runs and answers the same. The gain is on a GPU, where an eager
step is bound by launching its few hundred kernels one by one.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # PYTHONPATH, when set, comes first

from osprey.inference.api import Osprey  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _regions_bench():
    """``bench/regions.py`` (scene, request and answer comparison are shared with it)."""
    if "bench_regions" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_regions", ROOT / "bench" / "regions.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_regions"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_regions"]


def run(
    osprey: Osprey,
    *,
    regions: Sequence[int] = (1, 20),
    calls: int = 3,
    caption_tokens: int = 16,
    description_tokens: int = 32,
) -> list[dict]:
    """One row per region count and mode (``off``, ``on``), the ratio against eager in the same run."""
    rb = _regions_bench()
    device, request = osprey.device, rb.full_request(caption_tokens, description_tokens)
    rows = []
    for n in regions:
        image, masks = rb.make_scene(n, seed=n)
        encoded = osprey.encode_image(image)
        answers, eager_s = {}, None
        label = functools.partial(osprey.label, encoded=encoded)
        for mode in ("off", "on"):
            osprey.fast.set_decoding(compile=mode)
            first_s, answers[mode] = rb.timed(label, device, image, masks, request)
            times = [rb.timed(label, device, image, masks, request)[0] for _ in range(calls)]
            median = statistics.median(times)
            eager_s = eager_s if mode == "on" else median
            rows.append({
                "model": osprey.config.name, "device": str(device), "dtype": str(osprey.model.dtype).split(".")[-1],
                "regions": n, "decode": "compiled" if osprey.fast.decoder.compiled_for(device) else "eager",
                "first_call_s": round(first_s, 3), "median_s": round(median, 4),
                "vs_eager": round(eager_s / median, 2),
                "same_answers": rb.same_answers(answers[mode], answers["off"]),
            })  # fmt: skip
    osprey.fast.set_decoding(compile="auto")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument(
        "--random-weights", action="store_true", help="full-size architecture, random weights"
    )
    parser.add_argument("--regions", default="1,20")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--caption-tokens", type=int, default=16)
    parser.add_argument("--description-tokens", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    osprey = Osprey.from_pretrained(
        args.preset, device=args.device, dtype=DTYPES[args.dtype],
        random_weights=args.random_weights or args.preset in ("tiny", "small"),
    )  # fmt: skip
    started = time.perf_counter()
    rows = run(
        osprey, regions=[int(n) for n in args.regions.split(",")], calls=args.calls,
        caption_tokens=args.caption_tokens, description_tokens=args.description_tokens,
    )  # fmt: skip
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        columns = list(rows[0])
        print(" | ".join(columns))
        print(" | ".join("---" for _ in columns))
        for row in rows:
            print(" | ".join(str(row[c]) for c in columns))
        print(f"({time.perf_counter() - started:.0f} s)")
    return 0 if all(r["same_answers"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
