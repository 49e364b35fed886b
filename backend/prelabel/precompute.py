"""``osprey-label precompute``: encode every image of a task list ahead of time.

Images are loaded the way the service loads them (same sources, same safety rules), then encoded by
SAM and by Osprey into the on-disk caches under ``OSPREY_CACHE_DIR``; a backend started later with
the same settings finds them there, so the first click on every task is as fast as the second.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from backend.errors import InputError
from backend.labelstudio.images import ImageLoadError

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class PrecomputeReport:
    images: int = 0
    encoded: dict[str, int] = field(default_factory=dict)
    already_cached: dict[str, int] = field(default_factory=dict)
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def task_image_references(path: Path, image_key: str) -> list[str]:
    """Image references from a Label Studio task list (JSON export or list of ``{"data": {...}}``)
    or, for a folder, its image files."""
    if path.is_dir():
        return [str(p.resolve()) for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    tasks = json.loads(path.read_text())
    if isinstance(tasks, dict):
        tasks = [tasks]
    if not isinstance(tasks, list):
        raise InputError(f"{path} must hold a JSON list of tasks")
    refs = []
    for index, task in enumerate(tasks):
        data = task.get("data", task) if isinstance(task, dict) else None
        ref = data.get(image_key) if isinstance(data, dict) else None
        if not isinstance(ref, str) or not ref:
            raise InputError(f"task {index} in {path} has no '{image_key}' in its data (use --image-key)")
        refs.append(ref)
    return list(dict.fromkeys(refs))  # each image once, in order


def precompute(models, loader, references: list[str], *, which=("sam", "osprey")) -> PrecomputeReport:
    """Encode each referenced image (a local file, or a task reference read by ``loader``) with the
    chosen ``models`` (``"sam"``, ``"osprey"``) into their caches; ``models`` must have been loaded with
    a disk tier (``OSPREY_CACHE_DIR``), or the work is lost when the process ends."""
    # "osprey" names the region model here (Osprey or PixelRefer-Lite), as `precompute --only` always has
    encoders = {"sam": models.refiner.embedder.embed, "osprey": models.region_model.encode_image}
    caches = {"sam": models.refiner.cache, "osprey": models.region_model.cache}
    report = PrecomputeReport(images=len(references))
    start = time.perf_counter()
    for ref in tqdm(references, desc="encoding images", unit="image"):
        local = Path(ref).is_file()
        try:
            rgb = _read_file(Path(ref)) if local else loader.load(ref).rgb
        except (
            ImageLoadError,
            OSError,
            ValueError,
            Image.DecompressionBombError,
        ) as error:  # unreadable input
            shown = ref if local else "a task image"  # task URLs may carry presigned credentials
            report.failed.append((shown, str(error)))
            logger.warning("cannot load %s: %s", shown, error)
            continue
        for name in which:
            before = caches[name].stats()
            encoders[name](rgb)
            after = caches[name].stats()
            hit = after["hits"] + after["disk_hits"] > before["hits"] + before["disk_hits"]
            bucket = report.already_cached if hit else report.encoded
            bucket[name] = bucket.get(name, 0) + 1
    report.seconds = time.perf_counter() - start
    return report


def _read_file(path: Path) -> np.ndarray:
    with Image.open(path) as raw:
        return np.asarray(ImageOps.exif_transpose(raw).convert("RGB"))
