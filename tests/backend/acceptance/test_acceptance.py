"""``osprey-label eval acceptance``: a Label Studio JSON export whose answers are known by construction.

The export has two model versions and, on a 64x48 image: a region kept exactly, one with its category
changed, one whose mask moved (two 20x20 boxes 5 pixels apart: IoU 15/25 = 0.6, matched by id), one
redrawn under a new id (two 20x28 boxes 4 pixels apart: IoU 24/32 = 0.75, matched by IoU), a predicted
region deleted and a region added; plus a task without annotations, a skipped (cancelled) task and an
annotation whose only region cannot be read.
"""

from __future__ import annotations

import json
import sqlite3

import pytest
from PIL import Image
from webhook_payloads import (
    BRUSH_CONFIG,
    CONFIGS,
    IMAGE,
    annotation_event,
    box_mask,
    brush_region,
    iso,
    polygon_region,
    predicted,
)

from backend.acceptance.output import evaluate_export, format_table, resolve_schema
from backend.acceptance.report import acceptance_report, acceptance_summary, check_export, compare_export
from backend.cli import build_parser, main
from backend.jobs import SqliteJobQueue
from backend.labelstudio.results import mask_from_result, region_result
from backend.labelstudio.schema import parse_label_config
from backend.learning.intake import handle_webhook
from backend.learning.store import TrainingStore

V1 = "osprey-7b+sam-vit_h"
V2 = "osprey-7b+sam-vit_h+p3-v0001"
EARLY, LATE = "2025-06-01T09:00:00.000000Z", "2025-06-01T09:30:00.000000Z"
MOVED_IOU, REDRAWN_IOU = 0.6, 0.75


def ls_prediction(pid: int, task_id: int, version: str, created_at: str, result: list[dict]) -> dict:
    return {
        "id": pid, "model_version": version, "created_ago": "1 hour", "score": 0.8, "result": result,
        "cluster": None, "neighbors": None, "mislabeling": 0.0, "created_at": created_at,
        "updated_at": created_at, "model": None, "model_run": None, "task": task_id, "project": 3,
    }  # fmt: skip


def ls_annotation(aid: int, task_id: int, result: list[dict], second: int, *, cancelled=False) -> dict:
    return {
        "id": aid, "completed_by": 2, "result": result, "was_cancelled": cancelled, "ground_truth": False,
        "created_at": iso(second - 1), "updated_at": iso(second), "draft_created_at": None, "lead_time": 12.5,
        "prediction": {}, "result_count": len(result), "unique_id": f"u{aid}", "import_id": None,
        "last_action": None, "bulk_created": False, "task": task_id, "project": 3, "updated_by": 2,
        "parent_prediction": None, "parent_annotation": None, "last_created_by": None,
    }  # fmt: skip


def ls_task(task_id: int, annotations: list[dict], predictions: list[dict]) -> dict:
    return {
        "id": task_id, "annotations": annotations, "file_upload": "street.png", "drafts": [],
        "predictions": predictions, "data": {"image": IMAGE}, "meta": {},
        "created_at": "2025-05-30T09:00:00.000000Z", "updated_at": iso(59), "inner_id": task_id,
        "total_annotations": len(annotations), "cancelled_annotations": 0,
        "total_predictions": len(predictions), "comment_count": 0, "unresolved_comment_count": 0,
        "last_comment_updated_at": None, "project": 3, "updated_by": 2, "comment_authors": [],
    }  # fmt: skip


DOG, CAR = box_mask(2, 12, 2, 12), box_mask(20, 40, 40, 60)
CAT, CAT_MOVED = box_mask(5, 25, 10, 30), box_mask(5, 25, 15, 35)  # IoU 0.6
HORSE = box_mask(30, 45, 40, 60)
PERSON, PERSON_REDRAWN = box_mask(10, 30, 10, 38), box_mask(10, 30, 14, 42)  # IoU 0.75
MINE = box_mask(40, 46, 0, 6)


def export_tasks() -> list[dict]:
    broken = brush_region("broken", box_mask(0, 4, 0, 4), category="dog")
    broken[0]["original_width"] = 65  # the RLE was drawn on a 64-pixel-wide image
    return [
        ls_task(1, [ls_annotation(11, 1, brush_region("a", DOG, category="dog", caption="a black dog")
                                   + brush_region("b", CAR, label="vehicle", category="bicycle"), 10)],
                [ls_prediction(1, 1, V1, EARLY, predicted("a", DOG, category="dog", caption="a black dog")
                               + predicted("b", CAR, label="vehicle", category="car"))]),
        ls_task(2, [ls_annotation(21, 2, brush_region("c", CAT_MOVED, category="cat"), 20)],
                [ls_prediction(2, 2, V2, LATE, predicted("c", CAT, category="cat")
                               + predicted("d", HORSE, category="horse"))]),
        ls_task(3, [ls_annotation(30, 3, brush_region("e", PERSON, category="person"), 30),
                    ls_annotation(31, 3, brush_region("e-redrawn", PERSON_REDRAWN, category="person")
                                  + brush_region("f", MINE, category="dog"), 31)],
                [ls_prediction(3, 3, V1, EARLY, predicted("old", box_mask(0, 5, 50, 60), category="cat")),
                 ls_prediction(4, 3, V2, LATE, predicted("e", PERSON, category="person"))]),
        ls_task(4, [], [ls_prediction(5, 4, V2, LATE, predicted("g", DOG, category="dog"))]),
        ls_task(5, [ls_annotation(51, 5, [], 50, cancelled=True)], []),
        ls_task(6, [ls_annotation(61, 6, broken, 60)], []),
    ]  # fmt: skip


def counts(kept=0, edited=0, removed=0, added=0) -> dict:
    judged = kept + edited + removed
    rate = round(kept / judged, 4) if judged else None
    return {"kept": kept, "edited": edited, "added": added, "removed": removed, "acceptance_rate": rate}


@pytest.fixture(scope="module")
def brush_schema():
    return parse_label_config(BRUSH_CONFIG)


def test_counts_rates_and_iou_per_field_and_version(brush_schema):
    report = acceptance_report(export_tasks(), brush_schema)
    assert report["fields"] == {
        "region": counts(kept=2, edited=2, removed=1, added=1),
        "category": counts(kept=3, edited=1, removed=1, added=1),
        "caption": counts(kept=1),
    }
    assert report["fields"]["region"]["acceptance_rate"] == 0.4
    assert report["fields"]["category"]["acceptance_rate"] == 0.6
    assert report["by_model_version"] == {
        V1: {"region": counts(kept=2), "category": counts(kept=1, edited=1), "caption": counts(kept=1)},
        V2: {"region": counts(edited=2, removed=1), "category": counts(kept=2, removed=1)},
        "none": {"region": counts(added=1), "category": counts(added=1)},
    }
    assert report["by_model_version"][V2]["category"]["acceptance_rate"] == 0.6667
    iou = report["iou"]
    assert iou["all"] == {
        "regions": 4, "mean": 0.8375, "median": 0.875, "share_ge_0.5": 1.0, "share_ge_0.9": 0.5,
        "share_ge_0.99": 0.5, "by_id": 3, "by_iou": 1, "not_comparable": 0,
    }  # fmt: skip
    assert iou["by_model_version"][V1] == {
        "regions": 2, "mean": 1.0, "median": 1.0, "share_ge_0.5": 1.0, "share_ge_0.9": 1.0,
        "share_ge_0.99": 1.0, "by_id": 2, "by_iou": 0,
    }  # fmt: skip
    assert iou["by_model_version"][V2] == {
        "regions": 2, "mean": 0.675, "median": 0.675, "share_ge_0.5": 1.0, "share_ge_0.9": 0.0,
        "share_ge_0.99": 0.0, "by_id": 1, "by_iou": 1,
    }  # fmt: skip
    assert iou["unmatched_regions"] == 1
    assert report["matches"] == {
        "id": {"regions": 3, "mean_iou": round((1 + 1 + MOVED_IOU) / 3, 4)},
        "iou": {"regions": 1, "mean_iou": REDRAWN_IOU},
        "none": {"regions": 1, "mean_iou": None},
    }
    regions = {(r["task"], r["region_id"]): r for r in report["regions"]}
    assert regions[(2, "c")] == {
        "task": 2, "annotation": 21, "region_id": "c", "predicted_region_id": "c", "model_version": V2,
        "match": "id", "iou": MOVED_IOU,
    }  # fmt: skip
    assert regions[(3, "e-redrawn")]["predicted_region_id"] == "e"
    assert regions[(3, "e-redrawn")]["iou"] == REDRAWN_IOU
    assert regions[(3, "f")]["match"] is None
    assert report["tasks"] == {
        "in_export": 6, "compared": 4, "without_predictions": 1, "annotations_compared": 4,
        "source_prediction_by_model_version": {V1: 1, V2: 2},
    }  # fmt: skip
    assert report["skipped_counts"] == {
        "no annotations": 1,
        "cancelled (skipped) annotation": 1,
        "unreadable region": 1,
    }
    unreadable = next(s for s in report["skipped"] if s["reason"] == "unreadable region")
    assert unreadable["task"] == 6 and unreadable["annotation"] == 61
    assert unreadable["detail"].startswith("region broken: brush rle encodes 12288 RGBA bytes but a 65x48")


def test_all_annotations_and_a_date_window(brush_schema):
    every = acceptance_report(export_tasks(), brush_schema, annotation="all")
    assert every["tasks"]["annotations_compared"] == 5
    assert every["fields"]["region"] == counts(kept=3, edited=2, removed=1, added=1)
    collected = compare_export(export_tasks(), brush_schema, annotation="all", until=_ts("10:00:30.5"))
    assert [c.annotation_id for c in collected.compared] == [11, 21, 30]
    window = acceptance_report(
        export_tasks(), brush_schema, annotation="all", since=_ts("10:00:15"), until=_ts("10:00:30.5")
    )
    assert [r["annotation"] for r in window["regions"]] == [21, 30]
    assert window["skipped_counts"]["outside --since/--until"] == 3  # annotations 11, 31 and 61
    assert window["since"] == "2025-06-01T10:00:15+00:00"
    with pytest.raises(ValueError, match="latest, all"):
        acceptance_report(export_tasks(), brush_schema, annotation="first")


def _ts(clock: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(f"2025-06-01T{clock}+00:00").timestamp()


def test_live_webhook_and_export_count_the_same(tmp_path, brush_schema):
    """The point of the fold: the store's live statistics equal the export report for the same data."""
    tasks = export_tasks()
    store, queue = TrainingStore(tmp_path / "train.db"), SqliteJobQueue(tmp_path / "train.db")
    for task in tasks:
        chosen = [a for a in task["annotations"] if not a["was_cancelled"]]
        if not chosen:
            continue
        for prediction in sorted(task["predictions"], key=lambda p: p["created_at"]):
            store.record_prediction(
                project_id="3.1748000000", task_id=task["id"], model_version=prediction["model_version"],
                result=prediction["result"],
            )  # fmt: skip
        latest = max(chosen, key=lambda a: a["updated_at"])
        body = annotation_event(latest["result"], annotation_id=latest["id"], task_id=task["id"])
        assert handle_webhook(store, body, label_config_for=lambda _: None, queue=queue)["status"] == "stored"
    report = acceptance_report(tasks, brush_schema)
    live = acceptance_summary(store, 3)
    assert live["fields"] == report["fields"]
    assert live["by_model_version"] == report["by_model_version"]
    assert live["matches"] == report["matches"]
    stored = {(r.annotation_id, r.region_id): (r.model_version, r.iou) for r in store.accepted_regions(3)}
    assert stored == {
        (r["annotation"], r["region_id"]): (r["model_version"], r["iou"]) for r in report["regions"]
    }
    with sqlite3.connect(tmp_path / "train.db") as conn:
        rows = set(
            conn.execute("SELECT annotation_id, region_id, field, outcome, model_version FROM field_outcomes")
        )
    exported = {
        (c.annotation_id, o.region_id, o.field, o.outcome, o.model_version)
        for c in compare_export(tasks, brush_schema).compared
        for o in c.outcomes
    }
    assert rows == exported and len(rows) == 13
    store.close()


def test_main_runs_eval_acceptance_on_an_export(tmp_path, capsys):
    """``osprey-label eval acceptance`` end to end: tasks 1 and 2 of the export, through ``cli.main``."""
    export = tmp_path / "export.json"
    export.write_text(json.dumps(export_tasks()[:2]))
    assert main(["eval", "acceptance", str(export), "--label-config", str(CONFIGS / "brush_full.xml")]) == 0
    printed = capsys.readouterr().out
    rows = [line.split() for line in printed.splitlines()]
    assert printed.startswith(f"Pre-label acceptance: {export}\n")
    assert "compared: 2 annotations of 2 tasks" in printed
    # a and b kept (V1), c moved (V2, IoU 0.6), d deleted; b's category changed, d's removed with it
    assert ["all", "region", "2", "1", "1", "0", "0.500"] in rows
    assert ["all", "category", "2", "1", "1", "0", "0.500"] in rows
    assert [V1, "category", "1", "1", "0", "0", "0.500"] in rows
    assert [V2, "region", "0", "1", "1", "0", "0.000"] in rows
    assert ["all", "3", "3", "0", "0.867", "1.000", "1.000", "0.667", "0.667"] in rows


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "is not JSON"), (None, "No such file or directory")],
)
def test_main_refuses_a_bad_export_with_exit_2_naming_the_command(tmp_path, capsys, content, message):
    export = tmp_path / "export.json"
    if content is not None:
        export.write_text(content)
    assert main(["eval", "acceptance", str(export)]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert line.startswith("osprey-label eval acceptance: error: ") and message in line
    assert captured.out == ""


def test_command_prints_the_table_and_writes_json_and_png(tmp_path, capsys):
    export = tmp_path / "export.json"
    export.write_text(json.dumps(export_tasks()))
    out_json, out_png = tmp_path / "out" / "report.json", tmp_path / "out" / "chart.png"
    args = build_parser().parse_args(
        ["eval", "acceptance", str(export), "--label-config", str(CONFIGS / "brush_full.xml"),
         "--json", str(out_json), "--chart", str(out_png)]
    )  # fmt: skip
    assert args.command == "eval acceptance"  # cli.main names the command so in its error lines
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert ["all", "region", "2", "2", "1", "1", "0.400"] in [line.split() for line in lines]
    assert ["all", "category", "3", "1", "1", "1", "0.600"] in [line.split() for line in lines]
    assert [V2, "category", "2", "0", "1", "0", "0.667"] in [line.split() for line in lines]
    assert ["all", "4", "3", "1", f"{0.8375:.3f}", "0.875", "1.000", "0.500", "0.500"] in [
        line.split() for line in lines
    ]
    assert "(no pre-label)" in printed and "no annotations: 1" in printed
    report = json.loads(out_json.read_text())
    assert report == json.loads(json.dumps(evaluate_export(export, label_config=CONFIGS / "brush_full.xml")))
    assert report["schema"]["inferred"] is False and report["schema"]["output_tool"]["from_name"] == "label"
    assert report["fields"]["category"]["acceptance_rate"] == 0.6
    assert report["iou"]["all"]["median"] == 0.875
    with Image.open(out_png) as image:
        assert image.format == "PNG" and image.width > 600 and image.height > 300
    assert out_png.stat().st_size > 10_000


def test_without_a_label_config_the_schema_is_inferred_from_rectangles(tmp_path, capsys):
    def rect(x: float, category: str, note: str | None = None) -> list[dict]:
        common = {"id": "r1", "to_name": "img", "original_width": 100, "original_height": 100,
                  "image_rotation": 0}  # fmt: skip
        items = [
            {**common, "from_name": "box", "type": "rectanglelabels",
             "value": {"x": x, "y": 10, "width": 40, "height": 20, "rotation": 0, "rectanglelabels": ["car"]}},
            {**common, "from_name": "object_class", "type": "choices", "value": {"choices": [category]}},
        ]  # fmt: skip
        if note:
            items.append({**common, "from_name": "notes", "type": "textarea", "value": {"text": [note]}})
        return items

    scene = {
        "id": "t1",
        "from_name": "scene",
        "to_name": "img",
        "type": "choices",
        "value": {"choices": ["day"]},
    }
    tasks = [
        ls_task(1, [ls_annotation(11, 1, rect(20, "truck", "parked") + [scene], 10)],
                [ls_prediction(1, 1, V1, EARLY, rect(10, "car", "parked"))]),
    ]  # fmt: skip
    schema, xml = resolve_schema(tasks, field_map={"notes": "description"})
    assert xml is not None and '<RectangleLabels name="box" toName="img">' in xml
    assert schema.output_tool.tag_type == "RectangleLabels"
    assert {s.field: (s.from_name, s.per_region) for s in schema.fields} == {
        "category": ("object_class", True), "description": ("notes", True)
    }  # fmt: skip
    report = acceptance_report(tasks, schema)
    assert report["regions"][0]["iou"] == 0.6  # 40-pixel-wide boxes 10 pixels apart: 30 / 50
    assert report["fields"] == {
        "region": counts(edited=1), "category": counts(edited=1), "description": counts(kept=1)
    }  # fmt: skip
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    args = build_parser().parse_args(["eval", "acceptance", str(export), "--field-map", "notes=description"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "inferred from the export's result items" in printed and "description (notes)" in printed
    assert "Choices 'scene' is not mapped" in " ".join(evaluate_export(export)["schema"]["warnings"])


def test_polygons_are_compared_by_their_rasterised_masks(tmp_path):
    points = [[10.0, 10.0], [50.0, 10.0], [50.0, 60.0], [10.0, 60.0]]
    moved = [[20.0, 10.0], [60.0, 10.0], [60.0, 60.0], [20.0, 60.0]]
    mask = mask_from_result(polygon_region("p", points)[0], 64, 48)
    prediction = [region_result(mask=mask, tool="PolygonLabels", from_name="label", to_name="image", width=64,
                                height=48, label="vehicle", score=0.9, region_id="p")]  # fmt: skip
    annotation = polygon_region("p", moved, category="car")
    expected = mask_from_result(prediction[0], 64, 48), mask_from_result(annotation[0], 64, 48)
    iou = (expected[0] & expected[1]).sum() / (expected[0] | expected[1]).sum()
    tasks = [ls_task(1, [ls_annotation(11, 1, annotation, 10)], [ls_prediction(1, 1, V1, EARLY, prediction)])]
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    report = evaluate_export(export, label_config=CONFIGS / "polygon_full.xml")
    assert 0.5 < iou < 0.9 and report["regions"][0]["iou"] == pytest.approx(iou)
    assert report["regions"][0]["match"] == "id"
    assert report["fields"] == {"region": counts(edited=1), "category": counts(added=1)}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not JSON"),
        ('{"id": 1, "annotations": []}', r"JSON object \(one task\? wrap it in \[ \]\)"),
        ('"tasks"', "JSON str; expected a list of task objects"),
        ('[{"id": 1, "image": "a.png", "label": []}]', "Label Studio's 'JSON' format"),
    ],
)
def test_an_export_that_is_not_a_task_list_is_refused(tmp_path, content, message):
    export = tmp_path / "export.json"
    export.write_text(content)
    args = build_parser().parse_args(["eval", "acceptance", str(export)])
    with pytest.raises(ValueError, match=message):
        args.func(args)


def test_bad_tasks_annotations_and_options_are_skipped_or_refused(brush_schema, capsys):
    tasks = check_export(
        [
            "task?",
            ls_task(7, [{"id": 71, "result": {"id": "x"}}], []),
            ls_task(8, [ls_annotation(81, 8, brush_region("ok", DOG, category="dog"), 10)], [17]),
            {"id": 9, "data": {}},
        ]
    )
    report = acceptance_report(tasks, brush_schema)
    assert report["skipped_counts"] == {
        "not a task object": 1, "unreadable annotation": 1, "unreadable prediction": 1, "no annotations": 1
    }  # fmt: skip
    assert report["fields"] == {"region": counts(added=1), "category": counts(added=1)}
    assert "'result' is not a list" in next(s["detail"] for s in report["skipped"] if s["task"] == 7)
    with pytest.raises(ValueError, match="no brush, polygon or rectangle results"):
        resolve_schema([ls_task(1, [ls_annotation(11, 1, [], 10)], [])])
    with pytest.raises(ValueError, match="--label-config FILE.xml"):
        resolve_schema(tasks, field_map={"nosuch": "caption"})
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["eval", "acceptance", "x.json", "--since", "last week"])
    assert exited.value.code == 2 and "expected a date like 2025-06-01" in capsys.readouterr().err


def test_nothing_compared_returns_1_and_the_table_says_why(tmp_path, capsys):
    export = tmp_path / "export.json"
    export.write_text(json.dumps([ls_task(1, [ls_annotation(11, 1, [], 10, cancelled=True)], [])]))
    args = build_parser().parse_args(
        ["eval", "acceptance", str(export), "--label-config", str(CONFIGS / "brush_full.xml")]
    )
    assert args.func(args) == 1
    printed = capsys.readouterr().out
    assert "compared: 0 annotations" in printed and "cancelled (skipped) annotation: 1" in printed
    assert format_table(acceptance_report([], parse_label_config(BRUSH_CONFIG))).count("\n") > 5
