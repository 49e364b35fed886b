"""Webhook intake with Label Studio 1.23-shaped events: ordering, idempotency, deletes, acceptance."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
from webhook_payloads import (
    BRUSH_CONFIG,
    IMAGE,
    POLYGON_CONFIG,
    annotation_event,
    box_mask,
    brush_region,
    deleted_event,
    iso,
    polygon_region,
    predicted,
    start_training,
)

from backend.acceptance.report import acceptance_summary
from backend.jobs import SqliteJobQueue
from backend.learning.intake import WebhookError, handle_webhook, reparse_unparsed
from backend.learning.store import TrainingStore

NO_CONFIG = {"label_config_for": lambda project_id: None}
DOG = box_mask(5, 20, 5, 25)
CAR = box_mask(25, 45, 30, 60)


@pytest.fixture
def store(tmp_path):
    store = TrainingStore(tmp_path / "train.db")
    yield store
    store.close()


def queue_of(store: TrainingStore) -> SqliteJobQueue:
    """The SQLite job queue in the store's own file (as the service sets it up)."""
    return SqliteJobQueue(store.path)


def send(store, body, **kwargs) -> dict:
    return handle_webhook(store, body, **{**NO_CONFIG, "queue": queue_of(store), **kwargs})


def test_created_annotation_stores_regions_fields_and_masks(store, caplog):
    result = brush_region(
        "r1", DOG, category="dog", part="head", attributes=["black", "occluded"], caption="a black dog",
        description="A black dog lying on the pavement.",
    ) + brush_region("r2", CAR, label="vehicle", category="car")  # fmt: skip
    send(store, annotation_event(brush_region("warm", DOG), annotation_id=1))  # parse the config once
    started = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="backend.learning.intake"):
        out = send(store, annotation_event(result, annotation_id=101))
    elapsed_ms = (time.perf_counter() - started) * 1000
    print(
        f"ANNOTATION_CREATED with 2 brush regions stored in {elapsed_ms:.1f} ms (handler says {out['ms']} ms)"
    )
    assert out["status"] == "stored" and out["regions"] == 2 and out["train"] is False
    assert any("ANNOTATION_CREATED: stored" in message for message in caplog.messages)
    regions = {r.region_id: r for r in store.accepted_regions("3") if r.annotation_id == 101}
    first = regions["r1"]
    assert first.fields == {
        "category": "dog", "part": "head", "attributes": ["black", "occluded"], "caption": "a black dog",
        "description": "A black dog lying on the pavement.",
    }  # fmt: skip
    assert first.labels == ["animal"] and regions["r2"].labels == ["vehicle"]
    assert (first.image_ref, first.width, first.height, first.task_id) == (IMAGE, 64, 48, 11)
    assert np.array_equal(first.mask(), DOG) and np.array_equal(regions["r2"].mask(), CAR)
    assert first.model_version is None and first.updated_at == pytest.approx(1748772005.0)
    assert store.count_accepted(3) == 3


def test_polygon_regions_are_stored_as_masks(store):
    result = polygon_region("p1", [[10, 10], [60, 10], [60, 60], [10, 60]], category="car")
    out = send(store, annotation_event(result, label_config=POLYGON_CONFIG))
    assert out["status"] == "stored"
    (region,) = store.accepted_regions(3)
    mask = region.mask()
    assert region.tool_type == "polygonlabels" and region.fields == {"category": "car"}
    assert mask.shape == (48, 64) and mask[15, 15] and not mask[2, 2] and 0.2 < mask.mean() < 0.3


def test_label_config_falls_back_to_the_one_seen_at_setup(store):
    body = annotation_event(brush_region("r1", DOG, category="dog"), label_config=None)
    out = handle_webhook(
        store,
        body,
        label_config_for=lambda project_id: BRUSH_CONFIG if project_id == "3" else None,
        queue=queue_of(store),
    )
    assert out["status"] == "stored" and store.accepted_regions(3)[0].fields == {"category": "dog"}


def test_without_any_config_the_annotation_is_kept_raw_and_parsed_later(store):
    out = send(store, annotation_event(brush_region("r1", DOG, category="dog"), label_config=None))
    assert out["status"] == "unparsed" and store.count_accepted(3) == 0 and store.count_unparsed(3) == 1
    assert reparse_unparsed(store, "3.1700000000", BRUSH_CONFIG, queue=queue_of(store)) == 1
    assert store.accepted_regions(3)[0].fields == {"category": "dog"}
    assert (
        reparse_unparsed(store, "3", BRUSH_CONFIG, queue=queue_of(store)) == 0
        and store.count_unparsed(3) == 0
    )


def test_duplicate_delivery_changes_nothing(store):
    body = annotation_event(brush_region("r1", DOG, category="dog"))
    assert send(store, body, train_every=1)["status"] == "stored"
    counter = store.change_counter(3)
    again = send(store, body, train_every=1)
    assert again["status"] == "duplicate" and again["train"] is False
    assert store.change_counter(3) == counter and store.count_accepted(3) == 1


def test_an_older_update_never_overwrites_a_newer_one(store):
    newer = annotation_event(
        brush_region("r1", DOG, category="cat"), action="ANNOTATION_UPDATED", updated_at=iso(30)
    )
    older = annotation_event(brush_region("r1", DOG, category="dog"), updated_at=iso(10))
    assert send(store, newer)["status"] == "stored"
    assert send(store, older)["status"] == "stale"
    assert [r.fields["category"] for r in store.accepted_regions(3)] == ["cat"]


def test_same_timestamp_different_content_converges_in_any_order(tmp_path):
    a = annotation_event(brush_region("r1", DOG, category="dog"), updated_at=iso(9))
    b = annotation_event(brush_region("r1", DOG, category="cat"), updated_at=iso(9))
    winners = []
    for order in ((a, b), (b, a)):
        store = TrainingStore(tmp_path / f"{len(winners)}.db")
        for body in order:
            send(store, body)
        winners.append(store.accepted_regions(3)[0].fields["category"])
        store.close()
    assert winners[0] == winners[1]


def test_an_update_replaces_all_regions_of_the_annotation(store):
    send(
        store,
        annotation_event(brush_region("r1", DOG, category="dog") + brush_region("r2", CAR, category="car")),
    )
    update = annotation_event(
        brush_region("r2", CAR, category="bicycle") + brush_region("r3", box_mask(0, 4, 0, 4), category="person"),
        action="ANNOTATION_UPDATED", updated_at=iso(40),
    )  # fmt: skip
    out = send(store, update)
    assert out["status"] == "stored" and out["regions"] == 2 and out["new_labels"] == 2
    assert {r.region_id: r.fields["category"] for r in store.accepted_regions(3)} == {
        "r2": "bicycle",
        "r3": "person",
    }


def test_delete_removes_regions_and_a_late_create_does_not_resurrect_them(store):
    created = annotation_event(brush_region("r1", DOG, category="dog"), annotation_id=55)
    send(store, created)
    send(store, annotation_event(brush_region("r9", CAR, category="car"), annotation_id=56, task_id=12))
    out = send(store, deleted_event([55]))
    assert out["status"] == "deleted" and out["regions_removed"] == 1
    assert [r.annotation_id for r in store.accepted_regions(3)] == [56]
    assert send(store, created)["status"] == "tombstoned"
    late_update = annotation_event(
        brush_region("r1", DOG), annotation_id=55, action="ANNOTATION_UPDATED", updated_at=iso(59)
    )
    assert send(store, late_update)["status"] == "tombstoned"
    assert store.count_accepted(3) == 1


def test_singular_delete_event_and_delete_before_create(store):
    assert (
        send(store, {"action": "ANNOTATION_DELETED", "annotation": {"id": 77}, "project": {"id": 3}})[
            "status"
        ]
        == "deleted"
    )
    assert send(store, annotation_event(brush_region("r1", DOG), annotation_id=77))["status"] == "tombstoned"
    send(store, annotation_event(brush_region("r1", DOG), annotation_id=78))
    assert (
        send(store, deleted_event([78], project_id=None))["regions_removed"] == 1
    )  # no project: ids are global


def test_tasks_deleted_removes_their_annotations(store):
    send(store, annotation_event(brush_region("r1", DOG), annotation_id=1, task_id=21))
    out = send(store, {"action": "TASKS_DELETED", "tasks": [{"id": 21}], "project": {"id": 3}})
    assert out["regions_removed"] == 1 and store.count_accepted(3) == 0
    assert (
        send(store, annotation_event(brush_region("r1", DOG), annotation_id=2, task_id=21))["status"]
        == "tombstoned"
    )


def test_cancelled_annotations_store_nothing(store):
    out = send(store, annotation_event([], was_cancelled=True, annotation_id=5))
    assert out["status"] == "cancelled" and store.count_accepted(3) == 0
    send(store, annotation_event(brush_region("r1", DOG), annotation_id=6))
    skipped_later = annotation_event(
        brush_region("r1", DOG),
        annotation_id=6,
        was_cancelled=True,
        action="ANNOTATION_UPDATED",
        updated_at=iso(50),
    )
    assert send(store, skipped_later)["status"] == "cancelled" and store.count_accepted(3) == 0


def test_acceptance_per_field_against_the_recorded_prediction(store):
    bird = box_mask(30, 46, 2, 14)
    prediction = (
        predicted("kept", DOG, category="dog", attributes=["black"], caption="a black dog")
        + predicted("edited", CAR, label="vehicle", category="car", caption="a red car")
        + predicted("gone", box_mask(1, 4, 50, 62), category="cat")
        + predicted("moved", bird, category="dog")
    )
    store.record_prediction(
        project_id="3.1748000000", task_id=11, model_version="osprey-7b+sam-vit_h", result=prediction
    )
    shifted = np.roll(bird, 1, axis=1)  # the annotator redrew it: new id, IoU ~0.85
    result = (
        brush_region("kept", DOG, category="dog", attributes=["black"], caption="a  black dog ")
        + brush_region("edited", CAR, label="vehicle", category="bicycle")  # caption cleared
        + brush_region("redrawn", shifted, category="dog", part="head")
        + brush_region("mine", box_mask(0, 3, 0, 3), category="person")
    )
    out = send(store, annotation_event(result))
    assert out["regions"] == 4
    regions = {r.region_id: r for r in store.accepted_regions(3)}
    assert regions["kept"].model_version == "osprey-7b+sam-vit_h" and regions["kept"].iou == 1.0
    assert regions["redrawn"].model_version == "osprey-7b+sam-vit_h" and 0.8 < regions["redrawn"].iou < 0.9
    assert regions["mine"].model_version is None and regions["mine"].iou is None
    summary = acceptance_summary(store, 3)
    fields = summary["fields"]
    assert fields["category"] == {"kept": 2, "edited": 1, "added": 1, "removed": 1, "acceptance_rate": 0.5}
    assert fields["caption"] == {"kept": 1, "edited": 1, "added": 0, "removed": 0, "acceptance_rate": 0.5}
    assert fields["attributes"]["kept"] == 1 and fields["part"]["added"] == 1
    assert fields["region"] == {"kept": 2, "edited": 1, "added": 1, "removed": 1, "acceptance_rate": 0.5}
    assert summary["by_model_version"]["osprey-7b+sam-vit_h"]["category"]["removed"] == 1
    assert summary["matches"]["id"]["regions"] == 2 and summary["matches"]["iou"]["regions"] == 1


def test_training_is_triggered_every_n_new_labels_and_by_start_training(store):
    outs = [
        send(store, annotation_event(brush_region(f"r{i}", DOG), annotation_id=i, task_id=i), train_every=3)
        for i in range(1, 8)
    ]
    assert [o["train"] for o in outs] == [False, False, True, False, False, True, False]
    assert outs[2]["job_id"] == outs[5]["job_id"]  # still queued: the request is merged
    assert queue_of(store).job(outs[5]["job_id"]).payload == {"reason": "new_labels", "changes": 6}
    out = send(store, start_training())
    assert out == {**out, "status": "queued", "train": True, "job_id": outs[5]["job_id"]}
    assert queue_of(store).status()["queued"] == 1


def test_other_events_are_ignored(store):
    for action in ("TASKS_CREATED", "PROJECT_UPDATED", "ANNOTATION_LINK_CREATED"):
        assert send(store, {"action": action, "project": {"id": 3}}) == {
            "status": "ignored",
            "action": action,
        }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "must be a JSON object"),
        ({"project": {"id": 3}}, "no 'action'"),
        ({"action": "ANNOTATION_CREATED", "project": {"id": 3}}, "needs an 'annotation' object"),
        ({"action": "ANNOTATION_CREATED", "annotation": {"id": 1, "result": [], "task": 2}}, "no 'project'"),
        (
            {"action": "ANNOTATION_CREATED", "annotation": {"id": "x", "task": 2}, "project": {"id": 3}},
            "'annotation.id'",
        ),
        ({"action": "ANNOTATIONS_DELETED", "annotations": "1", "project": {"id": 3}}, "needs 'annotations'"),
        (
            {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": None}], "project": {"id": 3}},
            r"annotations\[0\]",
        ),
    ],
)
def test_malformed_payloads_are_refused_with_a_clear_message(store, body, message):
    with pytest.raises(WebhookError, match=message) as caught:
        send(store, body)
    assert isinstance(caught.value, ValueError) and caught.value.status == 400


def test_bad_result_and_timestamps_are_refused(store):
    body = annotation_event(brush_region("r1", DOG))
    body["annotation"]["result"] = {"id": "r1"}
    with pytest.raises(WebhookError, match="'annotation.result' must be a list"):
        send(store, body)
    body = annotation_event(brush_region("r1", DOG), updated_at="yesterday")
    with pytest.raises(WebhookError, match="ISO 8601"):
        send(store, body)


def test_an_unusable_region_is_skipped_not_fatal(store):
    broken = brush_region("bad", DOG)
    broken[0]["original_width"] = 65  # the RLE was drawn on a 64-pixel-wide image
    out = send(store, annotation_event(broken + brush_region("ok", CAR)))
    assert out["status"] == "stored" and out["regions"] == 1 and "region bad" in out["skipped"][0]
