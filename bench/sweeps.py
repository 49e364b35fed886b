"""What the two periodic sweeps read from a real Label Studio: the auto pre-label sweep and the
annotation reconciliation, each as it was (every task of the project, with its predictions and
annotations) and as it is (a whole read only after a start, a new model version or 6 hours; between,
only what Label Studio selects: new ids, changed tasks).

    python bench/sweeps.py                    # 2,000 tasks, 20 annotated
    python bench/sweeps.py --tasks 5000 --json

Starts Label Studio 1.23 from ``.ls-venv`` (``OSPREY_LS_VENV``; the end-to-end tests make it) on
127.0.0.1, imports ``--tasks`` tasks with one pre-label each (five brush regions on 640x480, as the
backend writes them), annotates ``--annotated`` of them, then adds 10 tasks and annotates 2 more (what
happens between two sweeps), and times each listing through the backend's own client, ``--repeat`` times
(the median is shown). The first row reads page after page, as the sweeps used to; every other row
reads as the client does now, "the next 100 tasks above the last id read". The changed-tasks read starts just before those 2 annotations: in service it
starts 15 minutes before the newest change the previous sweep saw, so it also re-reads what changed in
those 15 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "e2e")]

from backend.labelstudio.api import LabelStudioClient  # noqa: E402
from backend.labelstudio.rle import encode_brush_rle  # noqa: E402

CONFIG = ROOT / "label_configs" / "brush_full.xml"
WIDTH, HEIGHT = 640, 480


def prediction(seed: int) -> dict:
    """A pre-label as the backend writes one: five brush regions with their RLE, and a caption each."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    result = []
    for r in range(5):
        cy, cx = rng.uniform(0.2, 0.8) * HEIGHT, rng.uniform(0.2, 0.8) * WIDTH
        ry, rx = rng.uniform(0.05, 0.2) * HEIGHT, rng.uniform(0.05, 0.2) * WIDTH
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        region = f"r{seed}-{r}"
        common = {"id": region, "to_name": "image", "original_width": WIDTH, "original_height": HEIGHT}
        result.append({**common, "from_name": "label", "type": "brushlabels",
                       "value": {"format": "rle", "rle": encode_brush_rle(mask), "brushlabels": ["other"]}})  # fmt: skip
        result.append({**common, "from_name": "caption", "type": "textarea",
                       "value": {"text": ["a rounded shape in the middle of a noisy picture"]}})  # fmt: skip
    return {"model_version": "bench", "score": 0.5, "result": result}


def timed(listing, repeat: int) -> tuple[float, int]:
    seconds, count = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        count = sum(1 for _ in listing())
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), count


def newest(client: LabelStudioClient, project: int) -> datetime:
    return max(datetime.fromisoformat(t["updated_at"]) for t in client.tasks(project))


def measure(url: str, token: str, api, args) -> list[dict]:
    project = api.create_project("sweeps", CONFIG.read_text())["id"]
    for start in range(0, args.tasks, 500):
        batch = range(start, min(start + 500, args.tasks))
        api.import_tasks(project, [{"data": {"image": f"/data/upload/{i}.png"}, "predictions": [prediction(i)]}
                                   for i in batch])  # fmt: skip
    client = LabelStudioClient(url=url, api_key=token)
    ids = [t["id"] for t in client.tasks(project)]
    for task_id in ids[:: max(1, len(ids) // max(1, args.annotated))][: args.annotated]:
        api.annotate(task_id, [])
    high = max(ids)
    api.import_tasks(project, [{"data": {"image": f"/data/upload/new-{i}.png"}} for i in range(10)])
    since = newest(client, project)
    time.sleep(1.1)
    for task_id in ids[1:3]:
        api.annotate(task_id, [])

    listings = [
        ("either sweep, before", "every task, by page number",
         lambda: client._pages(project, view=None, query=None, page_size=100)),  # how it was read
        ("either sweep, read by id", "every task, above the last id", lambda: client.tasks(project)),
        ("auto pre-label, whole read", "unannotated tasks", lambda: client.tasks(project, unannotated=True)),
        ("auto pre-label, between whole reads", f"unannotated, ids above {high}",
         lambda: client.tasks(project, after=high, unannotated=True)),
        ("reconciliation, whole read", "annotated tasks", lambda: client.tasks(project, annotated=True)),
        ("reconciliation, between whole reads", "changed since the last read",
         lambda: client.tasks(project, updated_after=since)),
    ]  # fmt: skip
    rows = []
    for sweep, reads, listing in listings:
        seconds, count = timed(listing, args.repeat)
        rows.append({"sweep": sweep, "reads": reads, "tasks_read": count, "seconds": round(seconds, 3)})
    for row in rows:
        row["ratio"] = round(rows[0]["seconds"] / row["seconds"], 1) if row["seconds"] else None
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--annotated", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from labelstudio import LabelStudioAPI, personal_access_token, start_label_studio
    from serving import free_port

    executable = Path(os.environ.get("OSPREY_LS_VENV", ROOT / ".ls-venv")) / "bin" / "label-studio"
    if not executable.exists():
        print(f"no Label Studio at {executable}: run the end-to-end tests once, or set OSPREY_LS_VENV",
              file=sys.stderr)  # fmt: skip
        return 2
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        process = start_label_studio(executable, Path(data), port)
        try:
            url = f"http://127.0.0.1:{port}"
            token = personal_access_token(url)
            rows = measure(url, token, LabelStudioAPI(url, token), args)
        finally:
            process.stop()
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"Label Studio 1.23 on 127.0.0.1: {args.tasks} tasks + 10 new, each with a 5-region pre-label, "
          f"{args.annotated} + 2 annotated; median of {args.repeat}")  # fmt: skip
    print(f"{'sweep':<38} | {'reads':<32} | {'tasks read':>10} | {'seconds':>8} | {'ratio':>7}")
    for r in rows:
        print(f"{r['sweep']:<38} | {r['reads']:<32} | {r['tasks_read']:>10} | {r['seconds']:>8.3f} | "
              f"{r['ratio']:>6}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
