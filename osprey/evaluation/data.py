"""Evaluation files: LVIS/PACO-style region lists and COCO-style region caption files.

Two layouts are read:

1. **Region list** (Osprey's ``lvis_val_1k_category.json``, ``paco_val_1k_category.json``): a JSON
   list of images ``{"file_name", "height", "width", "annotations": [{"segmentation": ...}, ...]}``
   with, per object, ``"categories": [name, ...]`` (``categories[i]`` belongs to
   ``annotations[i]``) and/or ``"captions": [caption or [captions...], ...]``.
2. **COCO dict** (Osprey's ``finetune_refcocog_val_with_mask.json``): ``{"images": [...],
   "annotations": [...]}``; each annotation (``image_id``, ``segmentation``) is one object, and its
   reference captions are the annotation's ``caption``/``captions``/``sentences[*].sent`` if it has
   any, else its image's ``caption``/``captions``. Image entries that name the same file are merged,
   so each picture is encoded once.

A segmentation is COCO polygons (a list of flat ``[x0, y0, x1, y1, ...]`` lists, pixel coordinates)
or COCO RLE (``{"size": [H, W], "counts": ...}``, counts compressed (a string) or uncompressed (a
list of run lengths)).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class EvalObject:
    """One region to evaluate. ``index`` is its position in the image's annotation list."""

    index: int
    segmentation: Any
    category: str | None = None
    captions: tuple[str, ...] = ()
    annotation_id: Any = None


@dataclass
class EvalImage:
    file_name: str
    height: int
    width: int
    objects: list[EvalObject] = field(default_factory=list)


def _read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def _captions(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: a caption must be a string or a list of strings, got {value!r}")
    return tuple(v for v in value if v.strip())


def _image_header(entry: Any, where: str) -> tuple[str, int, int]:
    if not isinstance(entry, dict):
        raise ValueError(
            f"{where}: expected an object with file_name, height, width; got {type(entry).__name__}"
        )
    missing = [k for k in ("file_name", "height", "width") if k not in entry]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    return str(entry["file_name"]), int(entry["height"]), int(entry["width"])


def _per_object(entry: dict, key: str, count: int) -> list:
    value = entry.get(key)
    return value if isinstance(value, list) and len(value) == count else [None] * count


def load_region_list(path: str | Path, *, need: str) -> list[EvalImage]:
    """Read a region-list file (layout 1). ``need`` is ``"categories"`` or ``"captions"``: each
    image must carry that list, one entry per annotation."""
    data = _read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of images (the LVIS/PACO layout)")
    images = []
    for i, entry in enumerate(data):
        where = f"{path}: image {i}"
        file_name, height, width = _image_header(entry, where)
        annotations = entry.get("annotations")
        values = entry.get(need)
        if not isinstance(annotations, list) or not isinstance(values, list):
            raise ValueError(f"{where} ({file_name}): needs lists 'annotations' and '{need}'")
        if len(values) != len(annotations):
            raise ValueError(
                f"{where} ({file_name}): {len(values)} {need} for {len(annotations)} annotations; "
                f"{need}[i] must belong to annotations[i]"
            )
        image = EvalImage(file_name=file_name, height=height, width=width)
        categories = _per_object(entry, "categories", len(annotations))
        captions = _per_object(entry, "captions", len(annotations))
        for j, ann in enumerate(annotations):
            if not isinstance(ann, dict) or "segmentation" not in ann:
                raise ValueError(f"{where} ({file_name}): annotation {j} has no 'segmentation'")
            image.objects.append(
                EvalObject(
                    index=j,
                    segmentation=ann["segmentation"],
                    category=None if categories[j] is None else str(categories[j]),
                    captions=_captions(captions[j], f"{where} annotation {j}") if captions[j] else (),
                    annotation_id=ann.get("id"),
                )
            )
        images.append(image)
    return images


def _coco_references(ann: dict, image: dict) -> tuple[str, ...]:
    for source in (ann, image):
        if "sentences" in source:
            return tuple(s["sent"] if isinstance(s, dict) else str(s) for s in source["sentences"])
        for key in ("captions", "caption"):
            if key in source:
                return _captions(source[key], f"image {image.get('id')}")
    return ()


def load_coco_captions(path: str | Path) -> list[EvalImage]:
    """Read a COCO-dict caption file (layout 2)."""
    data = _read_json(path)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{path}: expected a COCO dict with 'images' and 'annotations'")
    by_id = {}
    merged: dict[str, EvalImage] = {}
    for i, entry in enumerate(data["images"]):
        file_name, height, width = _image_header(entry, f"{path}: images[{i}]")
        if "id" not in entry:
            raise ValueError(f"{path}: images[{i}] ({file_name}) has no id")
        by_id[entry["id"]] = entry
        if file_name not in merged:
            merged[file_name] = EvalImage(file_name=file_name, height=height, width=width)
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "segmentation" not in ann or "image_id" not in ann:
            raise ValueError(f"{path}: annotations[{k}] needs image_id and segmentation")
        entry = by_id.get(ann["image_id"])
        if entry is None:
            raise ValueError(
                f"{path}: annotations[{k}] names image_id {ann['image_id']!r}, which is not in images"
            )
        image = merged[str(entry["file_name"])]
        image.objects.append(
            EvalObject(
                index=len(image.objects),
                segmentation=ann["segmentation"],
                captions=_coco_references(ann, entry),
                annotation_id=ann.get("id", k),
            )
        )
    return [image for image in merged.values() if image.objects]


def load_classification_file(path: str | Path) -> list[EvalImage]:
    """Images and their objects' ground-truth categories (layout 1 with ``categories``)."""
    return load_region_list(path, need="categories")


def load_caption_file(path: str | Path) -> list[EvalImage]:
    """Images and their objects' reference captions (layout 1 with ``captions``, or layout 2)."""
    data = _read_json(path)
    if isinstance(data, dict):
        return load_coco_captions(path)
    return load_region_list(path, need="captions")


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """``(height, width)`` bool mask from COCO polygons or RLE (compressed or uncompressed)."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        polygons = [list(map(float, p)) for p in segmentation if len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = [int(v) for v in segmentation["size"]]
        if size != [height, width]:
            raise ValueError(f"RLE size {size} (H, W) differs from the image's {[height, width]}")
        if isinstance(segmentation["counts"], list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            counts = segmentation["counts"]
            rle = {"size": size, "counts": counts.encode() if isinstance(counts, str) else counts}
    else:
        raise ValueError(
            "segmentation must be COCO polygons (a list of [x0, y0, x1, y1, ...]) or RLE "
            f"({{'size', 'counts'}}), got {type(segmentation).__name__}"
        )
    return mask_utils.decode(rle).astype(bool)


def find_image(images_dir: str | Path, file_name: str) -> Path | None:
    """``images_dir/file_name``, else its base name there, else the part after the last ``_``
    (``COCO_train2014_000000123.jpg`` -> ``000000123.jpg``, as in a folder of all COCO images)."""
    folder = Path(images_dir)
    for candidate in (file_name, Path(file_name).name, Path(file_name).name.split("_")[-1]):
        path = folder / candidate
        if path.is_file():
            return path
    return None


def read_image(path: Path) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB, pixels as stored: no EXIF rotation, because COCO-style masks are
    drawn on the stored pixels."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
