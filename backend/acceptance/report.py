"""Pre-label acceptance from a Label Studio export: the comparison and the report.

The export is Label Studio's "JSON" format: a list of tasks ``{id, data, annotations: [{id, result,
was_cancelled, created_at, updated_at, ...}], predictions: [{id, model_version, result, created_at,
...}]}``. For every compared annotation the task's predictions become ``PredictedRegion`` rows exactly
as the live backend records them (``store.prediction_regions``; per model version only the newest
prediction, as ``record_prediction`` replaces a batch prediction of the same version), and
``comparison.compare_annotation`` judges each region and field - the very function the webhook intake
uses for the live statistics, so both count the same way.

Outcomes per field and model version: ``kept`` (pre-label unchanged), ``edited``, ``removed`` (the
predicted region was deleted), ``added`` (no pre-label); ``acceptance_rate`` = kept / (kept + edited +
removed). The pseudo-field ``region`` is the mask (kept when mask IoU >= 0.99). Regions are matched by
id, else by mask IoU >= 0.5 (``comparison.match_prediction``); the report gives the IoU distribution.

The command ``osprey-label eval acceptance``, the schema it infers when no label config is given, and
the table, JSON and chart it writes are in :mod:`backend.acceptance.output`.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from backend.errors import InputError, WebhookError
from backend.labelstudio.results import PredictedRegion, annotation_timestamp, prediction_regions
from backend.labelstudio.schema import FIELDS, ProjectSchema

from .comparison import OUTCOMES, FieldOutcome, RegionMatch, compare_annotation

IOU_THRESHOLDS = (0.5, 0.9, 0.99)
ANNOTATION_CHOICES = ("latest", "all")
NO_VERSION = "none"  # outcomes without a pre-label (added), as acceptance_summary names them
UNVERSIONED = "unversioned"  # a prediction exported without a model_version


@dataclass
class ComparedAnnotation:
    """One annotation of the export compared with its task's predictions."""

    task_id: object
    annotation_id: object
    outcomes: list[FieldOutcome]
    matches: list[RegionMatch]
    skipped: list[str]


@dataclass
class ExportComparison:
    """Every compared annotation of an export, what was skipped (``{task, annotation, reason, detail}``)
    and task counts; ``predictions_used`` counts the source prediction's model version per annotation."""

    compared: list[ComparedAnnotation] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    tasks: int = 0
    tasks_compared: int = 0
    tasks_without_predictions: int = 0
    predictions_used: Counter = field(default_factory=Counter)

    def skip(self, reason: str, task_id=None, annotation_id=None, detail: str | None = None) -> None:
        entry = {"task": task_id, "annotation": annotation_id, "reason": reason}
        if detail:
            entry["detail"] = detail
        self.skipped.append(entry)


# ---- reading the export --------------------------------------------------------------------------


def load_export(path: str | Path) -> list:
    """Read a Label Studio JSON export (a list of task objects). Raises ValueError when it is not one."""
    path = Path(path)
    with path.open("rb") as handle:
        try:
            tasks = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InputError(
                f"{path} is not JSON ({error}); expected Label Studio's 'JSON' export, a list of tasks"
            ) from None
    return check_export(tasks, str(path))


def check_export(tasks, name: str = "the export") -> list:
    """``tasks`` if it looks like a Label Studio JSON export; ValueError saying what is wrong if not."""
    if isinstance(tasks, dict):
        hint = " (one task? wrap it in [ ])" if "annotations" in tasks else ""
        raise InputError(
            f"{name} holds a JSON object{hint}; expected a list of tasks as Label Studio's 'JSON' export "
            f'writes it: [{{"id", "data", "annotations": [...], "predictions": [...]}}, ...]'
        )
    if not isinstance(tasks, list):
        raise InputError(f"{name} holds a JSON {type(tasks).__name__}; expected a list of task objects")
    if tasks and not any(isinstance(t, dict) and "annotations" in t for t in tasks):
        raise InputError(
            f"none of the {len(tasks)} tasks in {name} has an 'annotations' list; export the project with "
            f"Label Studio's 'JSON' format (JSON_MIN, CSV and COCO exports drop the predictions)"
        )
    return tasks


def _time(doc: dict) -> float | None:
    """An annotation's (or prediction's) ``updated_at``, else ``created_at``, in POSIX seconds, or None."""
    try:
        return annotation_timestamp(doc)
    except WebhookError:
        return None


# ---- comparing ------------------------------------------------------------------------------------


def task_predictions(task: dict, collected: ExportComparison | None = None) -> list[PredictedRegion]:
    """A task's predictions as the live store holds them: newest first, one prediction per version."""
    entries = task.get("predictions")
    newest: dict[str, tuple] = {}
    for position, entry in enumerate(entries if isinstance(entries, list) else []):
        result = entry.get("result") if isinstance(entry, dict) else None
        if not isinstance(result, list):
            if collected is not None:
                collected.skip(
                    "unreadable prediction", task.get("id"), None,
                    "a prediction is not an object with a 'result' list (export with predictions included)",
                )  # fmt: skip
            continue
        version = entry.get("model_version")
        version = str(version) if version not in (None, "") else UNVERSIONED
        created = _time({"created_at": entry.get("created_at")}) or 0.0
        if version not in newest or (created, position) >= newest[version][:2]:
            newest[version] = (created, position, result)
    out: list[PredictedRegion] = []
    for version, (created, _, result) in sorted(newest.items(), key=lambda kv: kv[1][:2], reverse=True):
        out += prediction_regions(result, model_version=version, created_at=created)
    return out


def _choose(task, annotations: list, which: str, since, until, collected: ExportComparison) -> list[dict]:
    task_id, usable = task.get("id"), []
    for annotation in annotations:
        if not isinstance(annotation, dict):
            collected.skip("unreadable annotation", task_id, None, "an annotation is not an object")
        elif annotation.get("was_cancelled"):
            collected.skip("cancelled (skipped) annotation", task_id, annotation.get("id"))
        elif since is not None or until is not None:
            moment = _time(annotation)
            if moment is None:
                collected.skip("no readable updated_at for --since/--until", task_id, annotation.get("id"))
            elif (since is not None and moment < since) or (until is not None and moment >= until):
                collected.skip("outside --since/--until", task_id, annotation.get("id"))
            else:
                usable.append(annotation)
        else:
            usable.append(annotation)
    if which == "latest" and len(usable) > 1:

        def order(annotation):
            moment = _time(annotation)
            ident = annotation.get("id")
            return (moment if moment is not None else -math.inf, ident if isinstance(ident, int) else -1)

        usable = [max(usable, key=order)]
    return usable


def compare_export(
    tasks: list,
    schema: ProjectSchema,
    *,
    annotation: str = "latest",
    since: float | None = None,
    until: float | None = None,
) -> ExportComparison:
    """Compare the chosen annotations of every task with the task's predictions (``compare_annotation``).

    ``annotation`` is ``latest`` (the newest non-cancelled annotation of each task, by ``updated_at``)
    or ``all``; ``since``/``until`` (POSIX seconds, ``until`` exclusive) filter annotations by
    ``updated_at``. Unusable tasks, annotations, predictions and regions are skipped with a reason.
    """
    if annotation not in ANNOTATION_CHOICES:
        raise InputError(f"annotation must be one of {', '.join(ANNOTATION_CHOICES)}, got {annotation!r}")
    collected = ExportComparison()
    for index, task in enumerate(tasks):
        collected.tasks += 1
        if not isinstance(task, dict):
            collected.skip("not a task object", f"#{index}", None, f"got {type(task).__name__}")
            continue
        task_id = task.get("id", f"#{index}")
        annotations = task.get("annotations")
        if not isinstance(annotations, list) or not annotations:
            collected.skip("no annotations", task_id)
            continue
        chosen = _choose(task, annotations, annotation, since, until, collected)
        if not chosen:
            continue
        predicted = task_predictions(task, collected)
        collected.tasks_without_predictions += not predicted
        compared_here = 0
        for doc in chosen:
            result = doc.get("result")
            if not isinstance(result, list) or not all(isinstance(item, dict) for item in result):
                collected.skip(
                    "unreadable annotation",
                    task_id,
                    doc.get("id"),
                    "'result' is not a list of result objects",
                )
                continue
            try:
                comparison = compare_annotation(schema, result, predicted)
            except InputError as error:  # e.g. a region with original_width 0
                collected.skip("unreadable annotation", task_id, doc.get("id"), str(error))
                continue
            for message in comparison.skipped:
                collected.skip("unreadable region", task_id, doc.get("id"), message)
            collected.compared.append(
                ComparedAnnotation(
                    task_id, doc.get("id"), comparison.outcomes, comparison.matches, comparison.skipped
                )
            )
            if comparison.model_version is not None:
                collected.predictions_used[comparison.model_version] += 1
            compared_here += 1
        collected.tasks_compared += compared_here > 0
    return collected


# ---- the report -----------------------------------------------------------------------------------


def outcome_tables(counts: Iterable[tuple[str, str, str | None, int]]) -> tuple[dict, dict]:
    """``(fields, by_model_version)`` from ``(field, outcome, model_version, n)`` counts: per field
    ``{kept, edited, added, removed, acceptance_rate}``; versions keyed ``none`` for added regions.

    ``acceptance_rate`` is kept / (kept + edited + removed): the share of pre-labels the annotators left
    unchanged (None without pre-labels). The pseudo-field ``region`` counts masks (kept: mask IoU >= 0.99
    with the predicted one).
    """
    fields: dict[str, dict] = {}
    versions: dict[str, dict[str, dict]] = {}
    for name, outcome, version, n in counts:
        for table in (fields, versions.setdefault(version or NO_VERSION, {})):
            table.setdefault(name, dict.fromkeys(OUTCOMES, 0))[outcome] += n
    for table in (fields, *versions.values()):
        for row in table.values():
            judged = row["kept"] + row["edited"] + row["removed"]
            row["acceptance_rate"] = round(row["kept"] / judged, 4) if judged else None
    return _ordered(fields), {v: _ordered(t) for v, t in sorted(versions.items(), key=_version_order)}


def summarize_outcomes(outcomes: Iterable[FieldOutcome]) -> tuple[dict, dict]:
    """``outcome_tables`` of individual outcomes (each counts once)."""
    return outcome_tables((o.field, o.outcome, o.model_version, 1) for o in outcomes)


def match_table(matches: Iterable[tuple[str | None, float | None]]) -> dict:
    """Accepted regions by how they were matched (``id``, ``iou``, ``none``) from ``(match, mask IoU)``
    pairs, each with its count and mean IoU."""
    rows = list(matches)
    out = {}
    for how in ("id", "iou", None):
        ious = [iou for match, iou in rows if match == how and iou is not None]
        n = sum(1 for match, _ in rows if match == how)
        if n:
            out[how or "none"] = {"regions": n, "mean_iou": round(sum(ious) / len(ious), 4) if ious else None}
    return out


def acceptance_summary(store, project_id: str) -> dict:
    """The live acceptance of a project from the training store (``/metrics``): ``fields`` and
    ``by_model_version`` as ``outcome_tables``, ``matches`` as ``match_table``. ``store`` is a
    :class:`backend.learning.store.TrainingStore`."""
    fields, versions = outcome_tables(store.outcome_counts(project_id))
    return {
        "fields": fields,
        "by_model_version": versions,
        "matches": match_table(store.region_matches(project_id)),
    }


def _ordered(table: dict) -> dict:
    rank = {name: i for i, name in enumerate(("region", *FIELDS))}
    return {name: table[name] for name in sorted(table, key=lambda n: (rank.get(n, len(rank)), n))}


def _version_order(item) -> tuple:
    return (item[0] == NO_VERSION, item[0])


def iou_stats(values: list[float]) -> dict:
    """``{regions, mean, median, share_ge_0.5, share_ge_0.9, share_ge_0.99}`` of mask IoUs (None when empty)."""
    out: dict = {"regions": len(values)}
    array = np.asarray(values, dtype=float)
    out["mean"] = round(float(array.mean()), 4) if values else None
    out["median"] = round(float(np.median(array)), 4) if values else None
    for threshold in IOU_THRESHOLDS:
        out[f"share_ge_{threshold}"] = round(float((array >= threshold).mean()), 4) if values else None
    return out


def _matches_of(matches: list[RegionMatch]) -> dict:
    return match_table((m.match, m.iou) for m in matches)


def acceptance_report(
    tasks: list,
    schema: ProjectSchema,
    *,
    annotation: str = "latest",
    since: float | None = None,
    until: float | None = None,
) -> dict:
    """The acceptance report of an export (a JSON object; ``format_table`` prints it).

    Keys: ``annotation`` (which were compared), ``tasks`` (counts), ``skipped`` (each with ``task``,
    ``annotation``, ``reason`` and ``detail``) and ``skipped_counts`` per reason, ``fields`` and
    ``by_model_version`` (outcome counts and acceptance rates, as the live ``acceptance_summary``),
    ``matches`` (regions by match: ``id``, ``iou``, ``none``), ``iou`` (distribution of the matched
    regions' mask IoU, overall and per model version) and ``regions`` (one row per accepted region).
    """
    collected = compare_export(tasks, schema, annotation=annotation, since=since, until=until)
    outcomes = [o for c in collected.compared for o in c.outcomes]
    matches = [m for c in collected.compared for m in c.matches]
    fields, by_version = summarize_outcomes(outcomes)
    matched = [m for m in matches if m.match is not None]
    versions = sorted({m.model_version for m in matched})
    iou = {
        "all": {
            **iou_stats([m.iou for m in matched if m.iou is not None]),
            "by_id": sum(m.match == "id" for m in matched),
            "by_iou": sum(m.match == "iou" for m in matched),
            "not_comparable": sum(m.iou is None for m in matched),
        },
        "by_model_version": {
            version: {
                **iou_stats([m.iou for m in matched if m.model_version == version and m.iou is not None]),
                "by_id": sum(m.match == "id" and m.model_version == version for m in matched),
                "by_iou": sum(m.match == "iou" and m.model_version == version for m in matched),
            }
            for version in versions
        },
        "unmatched_regions": sum(m.match is None for m in matches),
    }
    return {
        "annotation": annotation,
        "since": _iso(since),
        "until": _iso(until),
        "tasks": {
            "in_export": collected.tasks,
            "compared": collected.tasks_compared,
            "without_predictions": collected.tasks_without_predictions,
            "annotations_compared": len(collected.compared),
            "source_prediction_by_model_version": dict(sorted(collected.predictions_used.items())),
        },
        "skipped_counts": dict(Counter(s["reason"] for s in collected.skipped).most_common()),
        "skipped": collected.skipped,
        "fields": fields,
        "by_model_version": by_version,
        "matches": _matches_of(matches),
        "iou": iou,
        "regions": [
            {
                "task": c.task_id,
                "annotation": c.annotation_id,
                "region_id": m.region_id,
                "predicted_region_id": m.predicted_region_id,
                "model_version": m.model_version,
                "match": m.match,
                "iou": m.iou,
            }
            for c in collected.compared
            for m in c.matches
        ],
    }


def schema_summary(schema: ProjectSchema, source: str, inferred_xml: str | None) -> dict:
    """How the report read the export: the output tool, the field tags and where the schema came from."""
    tool = schema.output_tool
    out = {
        "source": source,
        "inferred": inferred_xml is not None,
        "output_tool": {"from_name": tool.from_name, "type": tool.tag_type},
        "fields": {
            spec.field: {"tag": spec.from_name, "type": spec.tag_type, "per_region": spec.per_region}
            for spec in schema.fields
        },
        "warnings": list(schema.warnings),
    }
    if inferred_xml is not None:
        out["label_config"] = inferred_xml
    return out


def _iso(moment: float | None) -> str | None:
    return None if moment is None else datetime.fromtimestamp(moment, timezone.utc).isoformat()
