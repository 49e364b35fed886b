"""The GPU figures in one command: every benchmark of the project on one device, within a time budget.

Parts, in order; each has an estimated time, and one that would run past ``--budget-s`` is skipped with
the reason recorded:

- ``regions``: ``bench/regions.py`` on the serving model (random weights made directly on the device in
  its dtype, bf16 on CUDA: no float32 and no CPU copy), 1/5/20 regions, all five fields, baseline vs
  fast, answers compared;
- ``sam``: ``bench/sam.py`` on the serving SAM (its encoder in ``--sam-dtype``, bf16 on CUDA): encode,
  following clicks, segment everything before (segment-anything's generator) and after; segment
  everything's post-processing on plausible masks (VOC instances), before and after, masks compared; the
  encoder in fp32, fp32 + TF32 and bf16: encode and click times, mask IoU against fp32;
- ``peak_memory``: one full segment-everything pre-label task (SAM encode, masks, Osprey's five fields)
  with the service's default grid and mask count; peak from ``torch.cuda.max_memory_allocated``;
- ``lora``: a LoRA job on the served model itself in a thread (no copy: the backend's way), a step at a
  time, while the main thread times ``label()`` calls between its steps: time per step, peak memory,
  serving latency alone and during training, serving answers unchanged;
- ``prelabel``: ``bench/prelabel.py`` (tasks per minute, one at a time vs batched, answers compared);
- ``decode``: ``bench/decode.py``, eager against compiled decoding (on CUDA: CUDA graphs), answers compared;
- ``memory`` and ``contention``: ``bench/memory.py --json`` and ``bench/contention.py --json`` run as
  subprocesses (skipped, with the reason, when the script is missing or fails).

It writes ``--out`` (JSON: device, setup, one entry per part) and a markdown table beside it (same
stem, ``.md``), and prints the table. Exit status 1 when a part failed or an answer differed.

    python bench/gpu_suite.py                                  # osprey-7b + SAM vit_h on CUDA, 480 s
    python bench/gpu_suite.py --preset small --sam vit_b       # the same parts, scaled down, on CPU
    python bench/gpu_suite.py --preset tiny --sam tiny --budget-s 300 --out /tmp/suite.json

Without a GPU, ``--device cpu`` runs the same parts as a dry run (TF32 rows are CUDA-only).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

STARTED = time.perf_counter()  # the budget counts from here: imports and model builds included
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTS = ("regions", "sam", "peak_memory", "lora", "prelabel", "decode", "memory", "contention")
GB = 1024**3


@dataclass(frozen=True)
class Profile:
    """How much of each part runs for one preset; ``estimates_s`` is the time each part is expected to
    take there (a part is skipped when it would end past the budget)."""

    regions: tuple[int, ...]
    caption_tokens: int
    description_tokens: int
    sam_image_hw: tuple[int, int]
    sam_reencode_clicks: int
    sam_cached_clicks: int
    points_per_side: int
    points_per_batch: int
    cold_everything: bool
    task_points_per_side: int  # the peak-memory task: the service's defaults on the 7B preset
    task_max_masks: int
    task_caption_tokens: int
    task_description_tokens: int
    lora_steps: int
    label_calls: int
    prelabel_tasks: int
    prelabel_regions: int
    prelabel_batch: str
    prelabel_repeat: int
    contention_tasks: int
    contention_clicks: int
    estimates_s: dict[str, float] = field(default_factory=dict)
    post_points_per_side: int = 32  # segment everything's post-processing on plausible masks
    precision_flows: int = 6  # VOC instances whose prompt flows compare the encoder's precisions
    precision_encodes: int = 3


PROFILES = {
    "osprey-7b": Profile(
        regions=(1, 5, 20), caption_tokens=16, description_tokens=32, sam_image_hw=(768, 1024),
        sam_reencode_clicks=2, sam_cached_clicks=10, points_per_side=32, points_per_batch=64,
        cold_everything=True, task_points_per_side=32, task_max_masks=32, task_caption_tokens=32,
        task_description_tokens=256, lora_steps=20, label_calls=3, prelabel_tasks=8, prelabel_regions=6,
        prelabel_batch="4", prelabel_repeat=1, contention_tasks=20, contention_clicks=5,
        estimates_s={"regions": 60, "sam": 60, "peak_memory": 30, "lora": 75, "prelabel": 60,
                     "decode": 90, "contention": 120, "memory": 45},
    ),
    "small": Profile(
        regions=(1, 2), caption_tokens=4, description_tokens=8, sam_image_hw=(384, 512),
        sam_reencode_clicks=1, sam_cached_clicks=3, points_per_side=4, points_per_batch=16,
        cold_everything=False, task_points_per_side=4, task_max_masks=3, task_caption_tokens=4,
        task_description_tokens=8, lora_steps=4, label_calls=2, prelabel_tasks=2, prelabel_regions=2,
        prelabel_batch="2", prelabel_repeat=1, contention_tasks=3, contention_clicks=2,
        estimates_s={"regions": 100, "sam": 120, "peak_memory": 40, "lora": 60, "prelabel": 60,
                     "decode": 120, "contention": 90, "memory": 60},
        post_points_per_side=8, precision_flows=1, precision_encodes=1,
    ),
    "tiny": Profile(
        regions=(1,), caption_tokens=2, description_tokens=2, sam_image_hw=(192, 256),
        sam_reencode_clicks=1, sam_cached_clicks=2, points_per_side=2, points_per_batch=4,
        cold_everything=False, task_points_per_side=2, task_max_masks=2, task_caption_tokens=2,
        task_description_tokens=2, lora_steps=2, label_calls=1, prelabel_tasks=2, prelabel_regions=1,
        prelabel_batch="2", prelabel_repeat=1, contention_tasks=3, contention_clicks=1,
        estimates_s={"regions": 15, "sam": 30, "peak_memory": 10, "lora": 15, "prelabel": 20,
                     "decode": 60, "contention": 45, "memory": 30},
        post_points_per_side=4, precision_flows=1, precision_encodes=1,
    ),
}  # fmt: skip


def bench_module(name: str):
    """``bench/<name>.py`` as a module (the folder is not a package)."""
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # before exec: its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[key]


class Budget:
    """The total wall time, counted from this module's import."""

    def __init__(self, total_s: float) -> None:
        self.total_s = total_s

    def elapsed(self) -> float:
        return time.perf_counter() - STARTED

    def remaining(self) -> float:
        return self.total_s - self.elapsed()

    def skip_reason(self, estimate_s: float) -> str | None:
        if self.elapsed() + estimate_s <= self.total_s:
            return None
        return (
            f"would run past the {self.total_s:.0f} s budget: {self.elapsed():.0f} s spent, "
            f"part estimated at {estimate_s:.0f} s"
        )


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Parameters created inside are ``dtype`` from the start (no float32 copy to cast down)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def random_osprey(preset: str, device: torch.device, dtype: torch.dtype):
    """A random-weight Osprey of ``preset``, each tensor made on ``device`` in ``dtype``."""
    from osprey.inference.api import Osprey

    with default_dtype(dtype):
        return Osprey.from_pretrained(preset, device=device, dtype=dtype, random_weights=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def module_bytes(module: torch.nn.Module) -> int:
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


class PeakMemory:
    """Peak memory while the block runs. CUDA: ``torch.cuda.max_memory_allocated`` after a reset
    (``before_bytes`` is what was allocated already, ``peak_bytes`` the whole peak). CPU: the bytes
    of tensors created by this thread (:class:`osprey.inference.memory.LiveBytes`) when available."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.result: dict = {"method": None, "before_bytes": None, "peak_bytes": None, "added_bytes": None}
        self._live = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.result.update(method="torch.cuda.max_memory_allocated",
                               before_bytes=torch.cuda.memory_allocated(self.device))  # fmt: skip
            return self
        try:
            from osprey.runtime.memory import LiveBytes
        except ImportError:
            self.result["method"] = "none on cpu (osprey.inference.memory.LiveBytes not available)"
            return self
        self._live = LiveBytes().__enter__()
        self.result["method"] = "LiveBytes (bytes of tensors created, this thread; cpu)"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.result.update(peak_bytes=peak, added_bytes=peak - self.result["before_bytes"])
        elif self._live is not None:
            self._live.__exit__(*exc)
            self.result.update(added_bytes=self._live.peak)


def gb(value: int | None) -> float | None:
    return None if value is None else round(value / GB, 3)


@dataclass
class Suite:
    """The serving models every part shares, and the run's settings."""

    args: argparse.Namespace
    profile: Profile
    budget: Budget
    device: torch.device
    dtype: torch.dtype
    osprey: object
    sam: object


def build_suite(args: argparse.Namespace, budget: Budget) -> tuple[Suite, dict]:
    """The serving Osprey and SAM, and what building them took (seconds, device and host peaks)."""
    from osprey.sam import build_sam
    from osprey.sam.build import resolve_sam_dtype

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        osprey = random_osprey(args.preset, device, dtype)
        sync(device)
        osprey_s = time.perf_counter() - start
        start = time.perf_counter()
        sam = build_sam(
            args.sam, random_weights=True, device=device, dtype=resolve_sam_dtype(args.sam_dtype, device)
        )
        sync(device)
        sam_s = time.perf_counter() - start
    setup = {
        "osprey": osprey.config.name, "osprey_dtype": str(osprey.model.dtype), "sam": args.sam,
        "sam_encoder_dtype": str(next(sam.image_encoder.parameters()).dtype),
        "osprey_build_s": round(osprey_s, 2), "sam_build_s": round(sam_s, 2),
        "osprey_weights_gb": gb(module_bytes(osprey.model)), "sam_weights_gb": gb(module_bytes(sam)),
        "build_peak_device_gb": gb(mem.result["peak_bytes"]),  # ~ the weights: made in their dtype
        "host_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 3),
    }  # fmt: skip
    profile = PROFILES[args.preset]
    suite = Suite(
        args=args, profile=profile, budget=budget, device=device, dtype=dtype, osprey=osprey, sam=sam
    )
    return suite, setup


def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device), total_memory_gb=gb(props.total_memory),
                    capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version())  # fmt: skip
    else:
        info["name"] = _cpu_name()
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# ---- parts: each returns {"rows": [...], "summary": str, "answers_same": bool | None, "notes": [...]}


def part_regions(suite: Suite, deadline: float) -> dict:
    p = suite.profile
    rows = bench_module("regions").run(
        suite.osprey, regions=p.regions, caption_tokens=p.caption_tokens,
        description_tokens=p.description_tokens, deadline=deadline,
    )  # fmt: skip
    done = [r["regions"] for r in rows]
    notes = [f"left out {n} regions: it would run past the part's time" for n in p.regions if n not in done]
    summary = "; ".join(
        f"{r['regions']} region(s): {r['baseline_s']:.2f} s -> {r['fast_s']:.2f} s ({r['speedup']:.1f}x)"
        for r in rows
    )
    return {
        "rows": rows,
        "summary": summary,
        "answers_same": all(r["same_answers"] for r in rows),
        "notes": notes,
    }


def part_decode(suite: Suite, deadline: float) -> dict:
    """``bench/decode.py``: eager against compiled decoding (CUDA graphs on CUDA) on the serving model."""
    p = suite.profile
    rows = bench_module("decode").run(
        suite.osprey, regions=p.regions[-1:], calls=2, caption_tokens=p.caption_tokens,
        description_tokens=p.description_tokens,
    )  # fmt: skip
    eager, compiled = rows
    summary = (
        f"{compiled['regions']} region(s): eager {eager['median_s']:.3f} s, compiled {compiled['median_s']:.3f} s "
        f"({compiled['vs_eager']}x; first call {compiled['first_call_s']:.1f} s with the compilation)"
    )
    return {
        "rows": rows,
        "summary": summary,
        "answers_same": all(r["same_answers"] for r in rows),
        "notes": [],
    }


def part_sam(suite: Suite, deadline: float) -> dict:
    p, sam_bench = suite.profile, bench_module("sam")
    height, width = p.sam_image_hw
    argv = ["--model", suite.args.sam, "--device", str(suite.device), "--image-size", f"{height}x{width}",
            "--reencode-clicks", str(p.sam_reencode_clicks), "--cached-clicks", str(p.sam_cached_clicks),
            "--points-per-side", str(p.points_per_side), "--points-per-batch", str(p.points_per_batch),
            "--postprocess", "--post-points-per-side", str(p.post_points_per_side), "--precision",
            "--flows", str(p.precision_flows), "--encodes", str(p.precision_encodes)]  # fmt: skip
    if not p.cold_everything:
        argv.append("--no-cold-everything")
    rows = sam_bench.bench_model(suite.args.sam, sam_bench.parse_args(argv), sam=suite.sam)
    by_case = {r["case"]: r for r in rows}
    post = by_case["post-processing, filter at low resolution first (after)"]
    before = by_case[sam_bench.BEFORE]
    bf16 = by_case["encoder bf16"]
    summary = (
        f"encode + decode {by_case['re-encode every click (baseline)']['median_ms']:.0f} ms; following click "
        f"{by_case['following click (cached embedding)']['median_ms']:.1f} ms; segment everything "
        f"{by_case['segment everything (cached embedding)']['median_ms']:.0f} ms ({p.points_per_side}^2 points; "
        f"segment-anything's generator {before['median_ms']:.0f} ms); post-processing on plausible masks "
        f"{post['speedup']:.1f}x faster; bf16 encoder {bf16['encode_speedup']:.2f}x fp32's, mask IoU "
        f"{bf16['mean_iou']:.4f} (min {bf16['min_iou']:.4f})"
    )
    same = all(r["same_masks"] for r in rows if "same_masks" in r)
    return {"rows": rows, "summary": summary, "answers_same": same, "notes": []}


def part_peak_memory(suite: Suite, deadline: float) -> dict:
    from backend.labelstudio.schema import parse_label_config
    from backend.predict.options import PredictOptions
    from backend.predict.tasks import TaskPredictor

    p, prelabel = suite.profile, bench_module("prelabel")
    models = prelabel.models_from(
        suite.osprey, suite.sam, suite.args.sam, max_masks=p.task_max_masks,
        points_per_side=p.task_points_per_side, points_per_batch=p.points_per_batch,
    )  # fmt: skip
    schema = parse_label_config(prelabel.CONFIG.read_text())
    tasks, images = prelabel.make_tasks(1, 0, schema, seed=11)
    options = PredictOptions(
        max_caption_tokens=p.task_caption_tokens, max_description_tokens=p.task_description_tokens
    )
    engine = TaskPredictor(models=models, loader=prelabel.Images(images), options=options, batch_tasks=1)
    with PeakMemory(suite.device) as mem:
        seconds, out = prelabel.timed_predict(engine, tasks, schema, suite.device)
    if out[0].status != "predicted":
        raise RuntimeError(f"the segment-everything task was expected to be predicted, got {out[0].status}: "
                           f"{out[0].reason}")  # fmt: skip
    row = {
        "seconds": round(seconds, 2), "regions": out[0].regions, "grid": f"{p.task_points_per_side}^2",
        "max_masks": p.task_max_masks, "description_tokens": p.task_description_tokens,
        "before_gb": gb(mem.result["before_bytes"]), "peak_gb": gb(mem.result["peak_bytes"]),
        "task_gb": gb(mem.result["added_bytes"]), "method": mem.result["method"],
    }  # fmt: skip
    peak = f"peak {row['peak_gb']} GB (weights {row['before_gb']} GB + task {row['task_gb']} GB)"
    if row["peak_gb"] is None:
        peak = f"task tensors {row['task_gb']} GB" if row["task_gb"] is not None else "no peak on this device"
    summary = f"{row['regions']} region(s) in {row['seconds']:.2f} s; {peak}"
    return {"rows": [row], "summary": summary, "answers_same": None, "notes": []}


class StepTimer:
    """A ``step_session`` for :meth:`LoraTrainer.fit` that times each optimisation step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: list[float] = []

    @contextlib.contextmanager
    def __call__(self):
        sync(self.device)
        start = time.perf_counter()
        yield
        sync(self.device)
        self.seconds.append(time.perf_counter() - start)


class SharedModel:
    """Serving and a LoRA job on the one served model, shared as the backend's scheduler shares it: one
    holder at a time, whole training steps, and a waiting ``label()`` call goes before the next step."""

    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer
        self._turn = threading.Condition()
        self._busy = False
        self._waiting = 0

    @contextlib.contextmanager
    def _hold(self, may_go):
        with self._turn:
            self._turn.wait_for(may_go)
            self._busy = True
        try:
            yield
        finally:
            with self._turn:
                self._busy = False
                self._turn.notify_all()

    @contextlib.contextmanager
    def serving(self):
        with self._turn:
            self._waiting += 1
        with self._hold(lambda: not self._busy):
            with self._turn:
                self._waiting -= 1
            yield

    @contextlib.contextmanager
    def training_step(self):
        with self._hold(lambda: not self._busy and not self._waiting), self.timer():
            yield


def lora_examples(steps: int) -> tuple[list, list]:
    """Accepted regions of the learning-curve scenes and their first ``steps`` instruction samples."""
    from osprey.learning.lora import RegionExample, instruction_samples

    curve = bench_module("learning_curve")
    examples = []
    for scene in curve.make_scenes(max(2, steps // 4 + 1), seed=3):
        for mask, shape, colour in zip(scene.masks, scene.shapes, scene.colours, strict=True):
            examples.append(RegionExample(image=scene.image, mask=mask, category=shape, attributes=(colour,),
                                          caption=f"a {colour} {shape}"))  # fmt: skip
    samples = instruction_samples(examples, categories=curve.SHAPES, attributes=tuple(curve.COLOURS))
    if len(samples) < steps:
        raise RuntimeError(f"{steps} LoRA steps need {steps} samples, the scenes gave {len(samples)}")
    return examples, samples[:steps]


def part_lora(suite: Suite, deadline: float) -> dict:
    from osprey.learning.lora import LoraSettings, LoraTrainer

    p, regions = suite.profile, bench_module("regions")
    steps = suite.args.lora_steps or p.lora_steps
    start = time.perf_counter()
    trainer = LoraTrainer(osprey=suite.osprey, settings=LoraSettings(epochs=1, grad_accum=1))  # no copy
    setup_s = time.perf_counter() - start
    examples, samples = lora_examples(steps)
    image, masks = regions.make_scene(3, seed=5)
    request = regions.full_request(p.caption_tokens, p.description_tokens)

    timer, failure, history = StepTimer(suite.device), [], {}
    shared = SharedModel(timer)

    def serve() -> tuple[float, list]:
        with shared.serving():
            return regions.timed(suite.osprey.label, suite.device, image, masks, request)

    _, reference = serve()  # warm-up, and the answers serving must keep giving
    alone = [serve()[0] for _ in range(p.label_calls)]
    peak = PeakMemory(suite.device)

    def train(trainer: LoraTrainer) -> None:
        try:
            with PeakMemory(suite.device) if suite.device.type != "cuda" else contextlib.nullcontext() as cpu:
                history.update(
                    trainer.fit(samples, examples, progress=False, step_session=shared.training_step)
                )
            if cpu is not None:
                peak.result.update(cpu.result)
        except Exception as error:  # reported by the main thread
            failure.append(error)

    with peak if suite.device.type == "cuda" else contextlib.nullcontext():
        thread = threading.Thread(target=train, args=(trainer,), name="lora-bench", daemon=True)
        thread.start()
        during, same = [], True
        while thread.is_alive() and len(during) < max(p.label_calls, 1):
            seconds, answers = serve()
            during.append(seconds)
            same &= regions.same_answers(answers, reference)
        thread.join()
    trainer.close()  # the served model as it was: the training adapter removed
    if failure:
        raise failure[0]
    del trainer
    gc.collect()
    if suite.device.type == "cuda":
        torch.cuda.empty_cache()
    alone_s, during_s = statistics.median(alone), statistics.median(during) if during else math.nan
    row = {
        "steps": len(timer.seconds), "step_s_median": round(statistics.median(timer.seconds), 3),
        "step_s_mean": round(statistics.mean(timer.seconds), 3), "setup_s": round(setup_s, 2),
        "loss": round(history["epoch_losses"][0], 4), "label_alone_s": round(alone_s, 3),
        "label_during_s": round(during_s, 3), "label_ratio": round(during_s / alone_s, 2),
        "label_calls_during": len(during), "before_gb": gb(peak.result["before_bytes"]),
        "peak_gb": gb(peak.result["peak_bytes"]), "train_gb": gb(peak.result["added_bytes"]),
        "method": peak.result["method"],
    }  # fmt: skip
    memory = (
        f"peak {row['peak_gb']} GB"
        if row["peak_gb"] is not None
        else f"training tensors {row['train_gb']} GB"
    )
    summary = (
        f"{row['steps']} steps, {row['step_s_median']:.2f} s/step; serving label() {row['label_alone_s']:.2f} s "
        f"alone, {row['label_during_s']:.2f} s during ({row['label_ratio']}x); {memory}"
    )
    notes = [] if during else ["training ended before a label() call could run beside it"]
    return {"rows": [row], "summary": summary, "answers_same": same, "notes": notes}


def part_prelabel(suite: Suite, deadline: float) -> dict:
    p, prelabel = suite.profile, bench_module("prelabel")
    argv = ["--preset", suite.args.preset, "--sam", suite.args.sam, "--tasks", str(p.prelabel_tasks),
            "--regions", str(p.prelabel_regions), "--batch", p.prelabel_batch, "--repeat", str(p.prelabel_repeat),
            "--caption-tokens", str(p.caption_tokens), "--description-tokens", str(p.description_tokens)]  # fmt: skip
    args = prelabel.parse_args(argv)
    models = prelabel.models_from(suite.osprey, suite.sam, suite.args.sam, max_masks=args.max_masks)
    rows = prelabel.run(args, models)
    summary = "; ".join(
        f"{r['setting']}: {r['tasks_per_min']:.1f} tasks/min ({r['ratio']:.2f}x)" for r in rows
    )
    return {"rows": rows, "summary": summary, "answers_same": all(r["same"] for r in rows), "notes": []}


def script_flags(path: Path) -> set[str]:
    """The ``--options`` a bench script declares (read from its source: no import, no start-up)."""
    return set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", path.read_text(encoding="utf-8")))


class ScriptSkipped(Exception):
    """A subprocess part could not give rows; the message is the recorded reason."""


def run_script(name: str, argv: list[str], timeout_s: float) -> tuple[list[dict], int]:
    """``python bench/<name>.py --json ARGV``: its JSON rows and exit status."""
    path = ROOT / "bench" / f"{name}.py"
    command = [sys.executable, str(path), "--json", *argv]
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as error:
        raise ScriptSkipped(f"bench/{name}.py ran past {timeout_s:.0f} s (the time left to it)") from error
    rows = []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    if not rows or proc.returncode not in (0, 1):
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise ScriptSkipped(f"bench/{name}.py exited {proc.returncode} with {len(rows)} JSON rows: {tail}")
    return rows, proc.returncode


def part_contention(suite: Suite, deadline: float) -> dict:
    path = ROOT / "bench" / "contention.py"
    if not path.is_file():
        raise ScriptSkipped("bench/contention.py does not exist")
    flags, p, notes = script_flags(path), suite.profile, []
    preset = suite.args.contention_preset or suite.args.preset
    argv = []
    if "--device" in flags:
        argv += ["--device", str(suite.device)]
        if "--sam" in flags:
            argv += ["--sam", suite.args.sam]
    elif preset not in ("tiny", "small"):
        notes.append(
            f"bench/contention.py has no --device (it runs on the CPU): ran --preset tiny, not {preset}"
        )
        preset = "tiny"
    argv += ["--preset", preset]
    argv += ["--tasks", str(p.contention_tasks)] if "--tasks" in flags else []
    argv += ["--clicks", str(p.contention_clicks)] if "--clicks" in flags else []
    rows, rc = run_script(
        "contention", argv, min(deadline, STARTED + suite.budget.total_s) - time.perf_counter()
    )
    summary = "; ".join(f"{r.get('situation')}: {r.get('median_s')} s ({r.get('ratio')}x)" for r in rows)
    same = all(r.get("same_answer", True) for r in rows)
    return {"rows": rows, "summary": summary, "answers_same": same, "notes": notes, "argv": argv, "rc": rc}


def part_memory(suite: Suite, deadline: float) -> dict:
    path = ROOT / "bench" / "memory.py"
    if not path.is_file():
        raise ScriptSkipped("bench/memory.py does not exist")
    argv = ["--preset", suite.args.preset]
    argv += ["--sam", suite.args.sam] if "--sam" in script_flags(path) else []
    rows, rc = run_script("memory", argv, min(deadline, STARTED + suite.budget.total_s) - time.perf_counter())
    summary = "; ".join(
        f"{r.get('preset')}: peak {r.get('peak_total_gib')} GiB of {r.get('capacity_gib')} GiB "
        f"({r.get('spare_gib')} spare, {r.get('figures')})"
        for r in rows
    )
    return {"rows": rows, "summary": summary, "answers_same": None, "notes": [], "argv": argv, "rc": rc}


RUNNERS: dict[str, Callable[[Suite, float], dict]] = {
    "regions": part_regions, "sam": part_sam, "peak_memory": part_peak_memory, "lora": part_lora,
    "prelabel": part_prelabel, "decode": part_decode, "contention": part_contention, "memory": part_memory,
}  # fmt: skip


def run_part(name: str, suite: Suite) -> dict:
    """Run one part unless ``--skip`` names it or it would end past the budget; never raises."""
    estimate = suite.profile.estimates_s[name]
    entry = {"part": name, "status": "skipped", "estimate_s": estimate, "seconds": 0.0, "reason": None,
             "rows": [], "summary": "", "answers_same": None, "notes": []}  # fmt: skip
    if name in suite.args.skip:
        entry["reason"] = "left out with --skip"
        return entry
    reason = suite.budget.skip_reason(estimate)
    if reason:
        entry["reason"] = reason
        return entry
    start = time.perf_counter()
    deadline = min(start + 2 * estimate, STARTED + suite.budget.total_s)
    try:
        entry.update(RUNNERS[name](suite, deadline), status="ran")
    except ScriptSkipped as skipped:
        entry["reason"] = str(skipped)
    except Exception as error:  # one part's failure is recorded; the others still run
        entry.update(status="failed", reason=f"{type(error).__name__}: {error}")
        traceback.print_exc()
    entry["seconds"] = round(time.perf_counter() - start, 2)
    return entry


# ---- output

COLUMNS = {
    "regions": ["regions", "baseline_s", "fast_s", "fast_s_per_region", "speedup", "same_answers"],
    "sam": ["case", "n", "median_ms", "speedup_vs_reencode", "speedup", "masks", "upsampled", "same_masks",
            "encode_ms", "click_ms", "encode_speedup", "mean_iou", "min_iou"],
    "peak_memory": ["seconds", "regions", "grid", "max_masks", "before_gb", "peak_gb", "task_gb", "method"],
    "lora": ["steps", "step_s_median", "setup_s", "label_alone_s", "label_during_s", "label_ratio",
             "before_gb", "peak_gb", "train_gb"],
    "prelabel": ["setting", "seconds", "tasks_per_min", "ratio", "same"],
    "contention": ["situation", "median_s", "ratio", "model_wait_s", "same_answer"],
    "memory": ["preset", "sam", "figures", "target", "osprey_weights_gib", "device_caches_gib", "request_peak_gib",
               "peak_total_gib", "capacity_gib", "spare_gib", "disk_holds_prefix_kv"],
}  # fmt: skip


def _cell(value, shout: bool = False) -> str:
    """A table cell; ``shout``: a false boolean is an answer that differed (``NO``)."""
    if isinstance(value, bool):
        return "yes" if value else ("NO" if shout else "no")
    if value is None:
        return "-"
    return str(value).replace("|", "/")


def markdown_table(rows: list[dict], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += [
        "| " + " | ".join(_cell(row.get(c), c.startswith("same")) for c in columns) + " |" for row in rows
    ]
    return lines


def render_markdown(report: dict) -> str:
    d, run = report["device"], report["suite"]
    memory = f", {d['total_memory_gb']} GB" if d.get("total_memory_gb") else ""
    lines = [
        f"## GPU suite: {run['preset']} + SAM {run['sam']} on {d['name']} ({d['device']}{memory})",
        "",
        f"torch {d['torch']}, CUDA {d['cuda']}; dtype {report['setup'].get('osprey_dtype')}; wall "
        f"{run['wall_s']:.0f} s of a {run['budget_s']:.0f} s budget; random weights (timings, not answers)",
        "",
        "| part | status | s | result | answers same |",
        "|---|---|---|---|---|",
    ]
    for name in PARTS:
        part = report["parts"][name]
        result = part["summary"] if part["status"] == "ran" else part["reason"]
        result = "; ".join([result or "", *part["notes"]]).strip("; ")
        lines.append(f"| {name} | {part['status']} | {part['seconds']:.1f} | {_cell(result)} | "
                     f"{_cell(part['answers_same'], shout=True)} |")  # fmt: skip
    for name in PARTS:
        part = report["parts"][name]
        if part["rows"]:
            columns = [c for c in COLUMNS.get(name, []) if any(c in row for row in part["rows"])]
            columns = columns or [k for k, v in part["rows"][0].items() if not isinstance(v, list | dict)][:8]
            lines += ["", f"### {name}", "", *markdown_table(part["rows"], columns)]
    return "\n".join(lines) + "\n"


def _finite(value):
    """NaN and infinity as null: the file stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="osprey-7b", choices=sorted(PROFILES), help="Osprey preset")
    parser.add_argument("--sam", default="vit_h", help="SAM model: vit_h, vit_l, vit_b or tiny")
    parser.add_argument("--sam-dtype", default="auto", choices=("auto", "bf16", "fp32"),
                        help="SAM's encoder as served (SAM_DTYPE): auto = bf16 on CUDA, fp32 on the CPU")  # fmt: skip
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--budget-s", type=float, default=480.0, help="total wall time, start-up included")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "gpu_suite.json")
    parser.add_argument("--skip", default="", help=f"comma-separated parts to leave out: {','.join(PARTS)}")
    parser.add_argument(
        "--lora-steps", type=int, default=None, help="default: 20 on osprey-7b, fewer scaled down"
    )
    parser.add_argument(
        "--contention-preset", default=None, help="bench/contention.py's --preset (default: ours)"
    )
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda given but torch sees no CUDA device")
    if args.preset == "osprey-7b" and not args.device.startswith("cuda"):
        parser.error("osprey-7b needs a CUDA device; on a CPU run --preset small --sam vit_b")
    args.skip = {name for name in args.skip.split(",") if name}
    if args.skip - set(PARTS):
        parser.error(
            f"--skip names unknown parts {sorted(args.skip - set(PARTS))}; the parts: {', '.join(PARTS)}"
        )
    if args.lora_steps is not None and args.lora_steps < 1:
        parser.error("--lora-steps must be >= 1")
    return args


def write_report(
    args: argparse.Namespace, suite: Suite, setup: dict, parts: dict[str, dict]
) -> tuple[dict, str]:
    """Write the JSON file and the markdown table; parts not run yet are recorded as not reached (the
    file is rewritten after every part, so a run stopped from outside still leaves its figures)."""
    reached = {name: parts.get(name) or not_reached(name, suite) for name in PARTS}
    report = {
        "suite": {"preset": args.preset, "sam": args.sam, "budget_s": args.budget_s,
                  "wall_s": round(suite.budget.elapsed(), 1), "profile": asdict(suite.profile),
                  "command": " ".join(sys.argv), "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "device": device_info(suite.device), "setup": setup, "parts": reached,
    }  # fmt: skip
    report = _finite(report)
    table = render_markdown(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(table, encoding="utf-8")
    return report, table


def not_reached(name: str, suite: Suite) -> dict:
    return {"part": name, "status": "skipped", "estimate_s": suite.profile.estimates_s[name], "seconds": 0.0,
            "reason": "not reached: the run was stopped before this part", "rows": [], "summary": "",
            "answers_same": None, "notes": []}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    suite, setup = build_suite(args, budget)
    parts: dict[str, dict] = {}
    for name in PARTS:
        parts[name] = run_part(name, suite)
        print(f"[{budget.elapsed():6.1f} s] {name}: {parts[name]['status']} "
              f"{parts[name]['reason'] or ''}", file=sys.stderr, flush=True)  # fmt: skip
        write_report(args, suite, setup, parts)
    _, table = write_report(args, suite, setup, parts)
    print(table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)
    failed = any(p["status"] == "failed" or p["answers_same"] is False for p in parts.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
