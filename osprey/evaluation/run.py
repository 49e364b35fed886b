"""Running a predictor over an evaluation file and scoring it.

A *predictor* answers for all objects of one image in one call (``predict(image, masks)``), so the
Osprey predictors encode each image once and label its regions together on the fast path. Tests and
other models plug in through the same two small protocols.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from .data import EvalImage, EvalObject, decode_segmentation, find_image, read_image
from .metrics import CATEGORY_SCORING, caption_scores, labels_match, mean, normalize_caption, semantic_iou

logger = logging.getLogger(__name__)

MISSING_IMAGE = "missing image file"
UNREADABLE_IMAGE = "unreadable image file"
IMAGE_SIZE = "image size differs from the annotation"
BAD_SEGMENTATION = "bad segmentation"
EMPTY_MASK = "empty mask"
NO_CATEGORY = "no ground-truth category"
NO_CAPTION = "no reference caption"


@dataclass
class CategoryPrediction:
    """``text``: the open-vocabulary answer; ``closed``: the top-1 of the closed label set, if scored."""

    text: str
    closed: str | None = None
    closed_score: float | None = None


class CategoryPredictor(Protocol):
    model_id: str
    untrained: bool

    def predict(self, image: np.ndarray, masks: list[np.ndarray]) -> list[CategoryPrediction]: ...


class CaptionPredictor(Protocol):
    model_id: str
    untrained: bool

    def predict(self, image: np.ndarray, masks: list[np.ndarray]) -> list[str]: ...


class Embedder(Protocol):
    name: str

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> list[float]: ...

    def max_similarity(
        self, candidates: Sequence[str], references: Sequence[Sequence[str]]
    ) -> list[float]: ...


@dataclass
class EvalReport:
    """Metric means (``{name: {"value": mean or None, "count": n}}``), counts and skipped items."""

    task: str
    model: str
    untrained: bool
    annotations: str
    images_dir: str
    images_total: int = 0
    images_evaluated: int = 0
    objects_total: int = 0
    objects_evaluated: int = 0
    metrics: dict[str, dict] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    protocol: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def skip_counts(self) -> dict[str, int]:
        """Objects skipped, per reason."""
        counts: dict[str, int] = {}
        for item in self.skipped:
            counts[item["reason"]] = counts.get(item["reason"], 0) + item["objects"]
        return counts

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "model": self.model,
            "untrained": self.untrained,
            "annotations": self.annotations,
            "images_dir": self.images_dir,
            "images": {
                "total": self.images_total,
                "evaluated": self.images_evaluated,
                "skipped": self.images_total - self.images_evaluated,
            },
            "objects": {
                "total": self.objects_total,
                "evaluated": self.objects_evaluated,
                "skipped": self.objects_total - self.objects_evaluated,
                "skipped_by_reason": self.skip_counts(),
            },
            "metrics": self.metrics,
            "protocol": self.protocol,
            "notes": self.notes,
            "seconds": round(self.seconds, 3),
            "skipped": self.skipped,
        }


def prepare_image(
    image: EvalImage, images_dir: str | Path, *, target: Callable[[EvalObject], bool], missing_target: str
) -> tuple[np.ndarray | None, list[tuple[EvalObject, np.ndarray]], list[dict]]:
    """Load an image and decode its objects' masks. Returns the RGB pixels (None when the whole
    image is skipped), the objects to evaluate with their masks, and skip records
    ``{"file_name", "object" (None for the whole image), "objects", "reason", "detail"}``."""

    def skip(reason: str, obj: EvalObject | None = None, detail: str = "") -> dict:
        count = len(image.objects) if obj is None else 1
        index = None if obj is None else obj.index
        return {
            "file_name": image.file_name,
            "object": index,
            "objects": count,
            "reason": reason,
            "detail": detail,
        }

    path = find_image(images_dir, image.file_name)
    if path is None:
        return None, [], [skip(MISSING_IMAGE, detail=str(Path(images_dir) / image.file_name))]
    try:
        rgb = read_image(path)
    except OSError as error:
        return None, [], [skip(UNREADABLE_IMAGE, detail=str(error))]
    if rgb.shape[:2] != (image.height, image.width):
        detail = f"file is {rgb.shape[1]}x{rgb.shape[0]}, annotation says {image.width}x{image.height} (WxH)"
        return None, [], [skip(IMAGE_SIZE, detail=detail)]
    ready, skipped = [], []
    for obj in image.objects:
        if not target(obj):
            skipped.append(skip(missing_target, obj))
            continue
        try:
            mask = decode_segmentation(obj.segmentation, image.height, image.width)
        except (ValueError, TypeError) as error:
            skipped.append(skip(BAD_SEGMENTATION, obj, str(error)))
            continue
        if not mask.any():
            skipped.append(skip(EMPTY_MASK, obj))
            continue
        ready.append((obj, mask))
    return rgb, ready, skipped


def _run(
    task: str,
    images: Iterable[EvalImage],
    images_dir: str | Path,
    predictor,
    *,
    annotations: str,
    limit: int | None,
    target: Callable[[EvalObject], bool],
    missing_target: str,
    score_image: Callable[[EvalImage, list[EvalObject], list], list[dict]],
    on_record: Callable[[dict], None] | None,
    progress: bool,
) -> EvalReport:
    """Predict and score every image (the first ``limit``); ``score_image`` turns one image's
    predictions into records. Returns the report with counts and skips; metrics are the caller's."""
    from tqdm import tqdm

    images = list(images)[:limit] if limit is not None else list(images)
    report = EvalReport(
        task=task,
        model=predictor.model_id,
        untrained=bool(predictor.untrained),
        annotations=annotations,
        images_dir=str(images_dir),
    )
    report.images_total = len(images)
    report.objects_total = sum(len(i.objects) for i in images)
    skipped_objects = 0
    start = time.perf_counter()
    with tqdm(total=len(images), unit="image", desc=report.task, disable=not progress) as bar:
        for image in images:
            rgb, ready, skipped = prepare_image(
                image, images_dir, target=target, missing_target=missing_target
            )
            report.skipped.extend(skipped)
            skipped_objects += sum(item["objects"] for item in skipped)
            if ready:
                predictions = predictor.predict(rgb, [mask for _, mask in ready])
                if len(predictions) != len(ready):
                    raise RuntimeError(
                        f"{image.file_name}: the predictor gave {len(predictions)} answers for "
                        f"{len(ready)} regions; it must answer once per mask"
                    )
                for record in score_image(image, [obj for obj, _ in ready], list(predictions)):
                    report.objects_evaluated += 1
                    if on_record is not None:
                        on_record(record)
                report.images_evaluated += 1
            bar.set_postfix(objects=report.objects_evaluated, skipped=skipped_objects, refresh=False)
            bar.update(1)
    report.seconds = time.perf_counter() - start
    for reason, count in report.skip_counts().items():
        logger.info("skipped %d objects: %s", count, reason)
    return report


def _metric(values: Sequence[float]) -> dict:
    return {"value": mean(values), "count": len(values)}


def evaluate_classification(
    images: Iterable[EvalImage],
    images_dir: str | Path,
    predictor: CategoryPredictor,
    *,
    embedder: Embedder,
    annotations: str = "",
    limit: int | None = None,
    on_record: Callable[[dict], None] | None = None,
    progress: bool = False,
) -> EvalReport:
    """Referring object classification: semantic similarity and semantic IoU of each object's
    open-vocabulary answer against its category (Osprey's LVIS/PACO protocol), plus top-1
    accuracy where the predictor also scored a closed label set. ``limit``: the first N images. Answers
    and categories are normalised as the predictor's ``scoring`` (a :data:`.metrics.CATEGORY_SCORING`
    key; default ``osprey``) says."""
    sims: list[float] = []
    ious: list[float] = []
    correct: list[float] = []
    truth_of, answer_of = CATEGORY_SCORING[getattr(predictor, "scoring", "osprey")]

    def score_image(image: EvalImage, objects: list[EvalObject], predictions: list) -> list[dict]:
        truths = [truth_of(obj.category) for obj in objects]
        answers = [answer_of(p.text) for p in predictions]
        similarities = embedder.similarity(answers, truths)
        records = []
        for obj, pred, truth, answer, sim in zip(
            objects, predictions, truths, answers, similarities, strict=True
        ):
            iou = semantic_iou(answer, truth)
            sims.append(sim)
            ious.append(iou)
            record = {
                "file_name": image.file_name,
                "object": obj.index,
                "ground_truth": obj.category,
                "answer": pred.text,
                "prediction": answer,
                "semantic_similarity": sim,
                "semantic_iou": iou,
            }
            if pred.closed is not None:
                hit = labels_match(pred.closed, obj.category)
                correct.append(float(hit))
                record.update(closed_set=pred.closed, closed_set_score=pred.closed_score, correct=hit)
            records.append(record)
        return records

    report = _run(
        "classify",
        images,
        images_dir,
        predictor,
        annotations=annotations,
        limit=limit,
        target=lambda obj: bool(obj.category and obj.category.strip()),
        missing_target=NO_CATEGORY,
        score_image=score_image,
        on_record=on_record,
        progress=progress,
    )
    report.metrics = {"semantic_similarity": _metric(sims), "semantic_iou": _metric(ious)}
    if correct:
        report.metrics["closed_set_accuracy"] = _metric(correct)
    return report


def evaluate_captions(
    images: Iterable[EvalImage],
    images_dir: str | Path,
    predictor: CaptionPredictor,
    *,
    embedder: Embedder,
    annotations: str = "",
    limit: int | None = None,
    meteor: bool | None = None,
    on_record: Callable[[dict], None] | None = None,
    progress: bool = False,
) -> EvalReport:
    """Region captioning: semantic similarity (the best cosine over an object's references) per
    object, and corpus-level BLEU-1..4, ROUGE-L, CIDEr-D and METEOR (see
    :func:`.metrics.caption_scores`; ``meteor`` None: when ``java`` is on PATH)."""
    sims: list[float] = []
    candidates: list[str] = []
    references: list[tuple[str, ...]] = []

    def score_image(image: EvalImage, objects: list[EvalObject], predictions: list) -> list[dict]:
        answers = [normalize_caption(text) for text in predictions]
        similarities = embedder.max_similarity(answers, [obj.captions for obj in objects])
        records = []
        for obj, text, answer, sim in zip(objects, predictions, answers, similarities, strict=True):
            sims.append(sim)
            candidates.append(answer)
            references.append(obj.captions)
            records.append(
                {
                    "file_name": image.file_name,
                    "object": obj.index,
                    "annotation_id": obj.annotation_id,
                    "references": list(obj.captions),
                    "answer": text,
                    "prediction": answer,
                    "semantic_similarity": sim,
                }
            )
        return records

    report = _run(
        "captions",
        images,
        images_dir,
        predictor,
        annotations=annotations,
        limit=limit,
        target=lambda obj: bool(obj.captions),
        missing_target=NO_CAPTION,
        score_image=score_image,
        on_record=on_record,
        progress=progress,
    )
    scores = caption_scores(candidates, references, meteor=meteor)
    report.metrics = {"semantic_similarity": _metric(sims)}
    for name, value in scores.corpus.items():
        report.metrics[name] = {"value": value, "count": len(candidates) if value is not None else 0}
    report.notes.extend(scores.notes)
    return report
