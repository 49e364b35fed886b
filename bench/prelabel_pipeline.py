"""``python bench/prelabel.py --pipeline``: the whole pre-label engine, serial vs pipelined, against a
stand-in Label Studio with real latency (see ``bench/prelabel.py`` for the options), and the model
alone on the same tasks (images decoded in advance): the rate a perfect pipeline would reach. Runs
alternate (serial, pipelined, model only, serial, ...) ``--repeat`` times and each row shows the
median run."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import requests

from backend.labelstudio.api import LabelStudioClient
from backend.labelstudio.images import ImageLoader
from backend.labelstudio.schema import parse_label_config
from backend.predict.options import PredictOptions
from backend.predict.tasks import TaskPredictor, TaskResult, task_id
from backend.prelabel.engine import prelabel

HERE = Path(__file__).resolve().parent
KEY = "bench-key"


class StandInServer:
    """``bench/standin_ls.py`` in its own process."""

    def __init__(self, tasks: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "standin_ls.py"), "--tasks", str(tasks)],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.process.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"the stand-in Label Studio did not start: {line!r}")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}"

    def reset(self) -> None:
        requests.post(f"{self.url}/bench/reset", timeout=10).raise_for_status()

    def dump(self) -> dict:
        return requests.get(f"{self.url}/bench/dump", timeout=60).json()

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)


class BusyClock:
    """A model session that adds up the seconds spent inside it (model busy time)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def __call__(self):
        started = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.seconds += time.perf_counter() - started


class NoModel:
    """The engine's stages with the model left out (``--memory``): images fetched and decoded, one
    caption per task built from the image, results written."""

    def __init__(self, loader, batch_tasks: int) -> None:
        self.inner = TaskPredictor(
            models=None, loader=loader, options=PredictOptions(), batch_tasks=batch_tasks
        )
        self.batch_tasks, self.image_threads = batch_tasks, self.inner.image_threads

    def load(self, tasks, schema, *, pool=None):
        return self.inner.load(tasks, schema, pool=pool)

    def infer(self, batch, schema, *, head=None):
        batch.answered, batch.loaded = [(index, float(rgb.mean())) for index, rgb in batch.loaded], []
        return batch

    def build(self, batch, schema):
        for index, mean in batch.answered:
            item = {"id": "r1", "type": "textarea", "from_name": "caption", "to_name": "image",
                    "value": {"text": [f"mean {mean:.1f}"]}}  # fmt: skip
            batch.results[index] = TaskResult(
                task_id(batch.tasks[index]), "predicted", result=[item], score=0.5
            )
        return [r for r in batch.results if r is not None]

    def predict(self, tasks, schema, head=None):
        return self.build(self.infer(self.load(tasks, schema), schema), schema)


def run_engine(server: StandInServer, predictor, *, pipeline: bool, chunk_tasks: int = 8) -> dict:
    client = LabelStudioClient(url=server.url, api_key=KEY)
    schema = parse_label_config(client.label_config(1))
    server.reset()
    out: list = []

    def engine() -> None:  # in a thread of its own, as the model stage is when pipelined: same footing
        out.append(prelabel(
            client.tasks(1), predictor=predictor, schema=schema, project=1, model_version="bench", sink=client,
            chunk_tasks=chunk_tasks, pipeline=pipeline,
        ))  # fmt: skip

    started = time.perf_counter()
    thread = threading.Thread(target=engine, name="bench-engine")
    thread.start()
    thread.join()
    wall = time.perf_counter() - started
    if not out:
        raise RuntimeError("the engine failed (see the traceback above)")
    summary = out[0]
    if summary.failed:
        raise RuntimeError(f"{len(summary.failed)} tasks failed: {next(iter(summary.failed.values()))}")
    return {"wall_s": wall, "predicted": summary.predicted}


def model_only(server: StandInServer, predictor: TaskPredictor) -> float:
    """Seconds the model alone takes for the stand-in's tasks: every batch is fetched and decoded first
    (untimed), then only :meth:`TaskPredictor.infer` runs, batch after batch, with no Label Studio, no
    result building and nothing else beside it: the rate a perfect pipeline would reach."""
    server.reset()  # the tasks as the engines get them: no predictions (stored regions are labelled in place)
    client = LabelStudioClient(url=server.url, api_key=KEY)
    schema = parse_label_config(client.label_config(1))
    tasks = list(client.tasks(1))
    size = predictor.batch_tasks
    staged = [predictor.load(tasks[i : i + size], schema) for i in range(0, len(tasks), size)]
    started = time.perf_counter()
    for batch in staged:
        predictor.infer(batch, schema)
    return time.perf_counter() - started


def same_predictions(a: dict, b: dict, tol: float = 1e-3) -> bool:
    if a.keys() != b.keys():
        return False
    for task in a:
        [x], [y] = a[task], b[task]
        strip = ("id", "score")
        if [{k: v for k, v in i.items() if k not in strip} for i in x["result"]] != [
            {k: v for k, v in i.items() if k not in strip} for i in y["result"]
        ]:
            return False
        if abs((x["score"] or 0) - (y["score"] or 0)) > tol:
            return False
    return True


def pipeline_rows(args, preset: str) -> list[dict]:
    from prelabel import build_models

    server = StandInServer(args.tasks)
    try:
        loader = ImageLoader(label_studio_url=server.url, api_key=KEY, cache_size=0)
        clock = BusyClock()
        if preset == "none":  # the engine alone: I/O and result building, no model
            predictor = NoModel(loader, batch_tasks=4)
        else:
            models = build_models(preset, args.sam, args.device, args.max_masks)
            options = PredictOptions(
                max_caption_tokens=args.caption_tokens, max_description_tokens=args.description_tokens
            )
            predictor = TaskPredictor(
                models=models, loader=loader, options=options, batch_tasks=4, session=clock
            )
            client = LabelStudioClient(url=server.url, api_key=KEY)
            predictor.predict(
                list(client.tasks(1))[:2], parse_label_config(client.label_config(1))
            )  # warm-up
        runs: dict[str, list] = {"serial": [], "pipelined": []}
        if preset != "none":
            runs["model only"] = []
        answers: dict[str, dict] = {}
        for _ in range(args.repeat):
            for name in runs:
                clock.seconds = 0.0
                if name == "model only":
                    wall = model_only(server, predictor)
                    runs[name].append((wall, wall))
                    continue
                out = run_engine(server, predictor, pipeline=name == "pipelined")
                runs[name].append((out["wall_s"], clock.seconds))
                answers[name] = server.dump()
    finally:
        server.close()
    same = same_predictions(answers["serial"], answers["pipelined"])
    rows = []
    for name, measured in runs.items():
        wall = float(np.median([w for w, _ in measured]))
        busy = float(np.median([b for _, b in measured]))
        rows.append({"preset": preset, "engine": name, "tasks": args.tasks, "wall_s": round(wall, 2),
                     "tasks_per_min": round(60 * args.tasks / wall, 1), "model_busy_s": round(busy, 2),
                     "busy_share": round(busy / wall, 2), "same": same if name != "model only" else None})  # fmt: skip
    base = rows[0]["wall_s"]
    for row in rows:
        row["ratio"] = round(base / row["wall_s"], 2)
    if "model only" in runs:  # the target on a model-bound preset: pipelined within 10% of this rate
        rows[1]["of_model_only"] = round(rows[2]["wall_s"] / rows[1]["wall_s"], 2)
    return rows


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_rows() -> list[dict]:
    """The pipelined engine without the model on 1,000 then 10,000 tasks: peak resident memory of each
    run (sampled every 0.1 s) and the ratio."""
    rows = []
    for tasks in (1000, 10000):
        server = StandInServer(tasks)
        try:
            loader = ImageLoader(label_studio_url=server.url, api_key=KEY, cache_size=0)
            peak, done = [rss_mib()], threading.Event()

            def sample(peak=peak, done=done) -> None:
                while not done.wait(0.1):
                    peak.append(rss_mib())

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            out = run_engine(server, NoModel(loader, batch_tasks=4), pipeline=True, chunk_tasks=8)
            done.set()
            sampler.join()
        finally:
            server.close()
        rows.append({"tasks": tasks, "predicted": out["predicted"], "wall_s": round(out["wall_s"], 1),
                     "peak_rss_mib": round(max(peak), 1)})  # fmt: skip
    for row in rows:
        row["ratio"] = round(row["peak_rss_mib"] / rows[0]["peak_rss_mib"], 3)
    return rows


def main(args) -> int:
    presets = [preset.strip() for preset in args.presets.split(",") if preset.strip()]  # "": memory only
    rows = [row for preset in presets for row in pipeline_rows(args, preset)]
    memory = memory_rows() if args.memory else []
    if args.json:
        for row in rows + memory:
            print(json.dumps(row))
    else:
        print(f"stand-in Label Studio: 50 ms per image, 50 ms per write, 10 ms per other read; SAM {args.sam}; "
              f"{args.tasks} tasks, brush_full.xml; median of {args.repeat}")  # fmt: skip
        print(f"{'preset':<7} | {'engine':<10} | {'seconds':>7} | {'tasks/min':>9} | {'ratio':>6} | "
              f"{'model busy / wall':>17} | same answers")  # fmt: skip
        for r in rows:
            same = {True: "yes", False: "NO", None: "-"}[r["same"]]
            print(f"{r['preset']:<7} | {r['engine']:<10} | {r['wall_s']:>7.2f} | {r['tasks_per_min']:>9.1f} | "
                  f"{r['ratio']:>5.2f}x | {r['model_busy_s']:>7.2f} / {r['wall_s']:<7.2f} | {same}")  # fmt: skip
        for r in rows:
            if "of_model_only" in r:
                print(f"{r['preset']}: the pipelined engine runs at {r['of_model_only']:.2f} of the model-only rate "
                      "(the model alone on images decoded in advance)")  # fmt: skip
        for r in memory:
            print(f"memory, no model, pipelined: {r['tasks']:>6} tasks in {r['wall_s']:.1f} s, peak RSS "
                  f"{r['peak_rss_mib']:.1f} MiB ({r['ratio']:.3f}x the 1,000-task run)")  # fmt: skip
    return 0 if all(r["same"] is not False for r in rows) else 1
