"""``python bench/prelabel.py --ray``: ``osprey-label prelabel`` through Ray Data on a local Ray (``--ray-cpus``,
2 by default; 127.0.0.1, no dashboard) against the in-process pipelined engine, the same command on the
same stand-in Label Studio (``bench/standin_ls.py``: 50 ms per image, 50 ms per write, 10 ms per other
read) and the same models, measured in the same run. Each row is the whole command, model loading
included (the in-process engine loads the models once; Ray loads them in the driver, for the model
version and head, and in each actor); Ray itself is started before the timing, as a cluster would be.
Runs alternate (in-process, Ray, in-process, ...) ``--repeat`` times and each row shows the median."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time

import numpy as np
from prelabel_pipeline import KEY, StandInServer, same_predictions

from backend.cli import main as cli


def environment(args, url: str, model_dir: str, preset: str) -> dict[str, str]:
    return {
        "LABEL_STUDIO_URL": url, "LABEL_STUDIO_API_KEY": KEY, "MODEL_DIR": model_dir, "OSPREY_MODEL": preset,
        "SAM_MODEL": args.sam, "OSPREY_DEVICE": args.device or "cpu", "OSPREY_MAX_MASKS": str(args.max_masks),
        "OSPREY_MAX_CAPTION_TOKENS": str(args.caption_tokens),
        "OSPREY_MAX_DESCRIPTION_TOKENS": str(args.description_tokens), "OSPREY_POINTS_PER_SIDE": "8",
        "OSPREY_PRED_IOU_THRESH": "0", "OSPREY_STABILITY_SCORE_THRESH": "0", "OSPREY_MIN_MASK_AREA": "0",
        "OSPREY_PRELABEL_BATCH_TASKS": "4", "OSPREY_PRELABEL_CHUNK_TASKS": "8", "HF_HUB_OFFLINE": "1",
    }  # fmt: skip


def timed_command(argv: list[str]) -> float:
    """Seconds of one ``osprey-label prelabel`` (its table swallowed); fails unless it exits 0."""
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) as out:
        status = cli(["prelabel", "--quiet", "--project", "1", *argv])
    if status != 0:
        raise RuntimeError(f"prelabel {' '.join(argv)} exited {status}:\n{out.getvalue()}")
    return time.perf_counter() - started


def ray_rows(args, preset: str) -> list[dict]:
    import ray

    server = StandInServer(args.tasks)
    saved = dict(os.environ)
    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)  # fmt: skip
    try:
        with tempfile.TemporaryDirectory() as model_dir:
            os.environ.update(environment(args, server.url, model_dir, preset))
            engines = {"in-process": [], "ray": ["--ray", "--ray-actors", str(args.ray_actors)]}
            runs: dict[str, list[float]] = {name: [] for name in engines}
            answers: dict[str, dict] = {}
            for _ in range(args.repeat):
                for name, argv in engines.items():
                    server.reset()
                    runs[name].append(timed_command(argv))
                    answers[name] = server.dump()
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)
        server.close()
    same = same_predictions(answers["in-process"], answers["ray"])
    predicted = {name: len(found) for name, found in answers.items()}
    rows = []
    for name, seconds in runs.items():
        wall = float(np.median(seconds))
        rows.append({"preset": preset, "engine": name, "tasks": args.tasks, "predicted": predicted[name],
                     "wall_s": round(wall, 2), "runs": [round(s, 1) for s in seconds],
                     "tasks_per_min": round(60 * args.tasks / wall, 1), "same": same})  # fmt: skip
    for row in rows:
        row["ratio"] = round(rows[0]["wall_s"] / row["wall_s"], 2)
    return rows


def main(args) -> int:
    presets = [preset.strip() for preset in args.presets.split(",") if preset.strip()]
    rows = [row for preset in presets for row in ray_rows(args, preset)]
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(f"stand-in Label Studio: 50 ms per image, 50 ms per write, 10 ms per other read; SAM {args.sam}, "
              f"segment everything (<= {args.max_masks} masks); {args.tasks} tasks, brush_full.xml; local Ray "
              f"with {args.ray_cpus} CPUs, {args.ray_actors} model actor(s); whole command, median of {args.repeat}")  # fmt: skip
        print(
            f"{'preset':<7} | {'engine':<10} | {'seconds':>7} | {'tasks/min':>9} | {'ratio':>6} | same answers"
        )
        for r in rows:
            print(f"{r['preset']:<7} | {r['engine']:<10} | {r['wall_s']:>7.2f} | {r['tasks_per_min']:>9.1f} | "
                  f"{r['ratio']:>5.2f}x | {'yes' if r['same'] else 'NO'}")  # fmt: skip
    return 0 if all(r["same"] and r["predicted"] == r["tasks"] for r in rows) else 1
