"""Label Studio 1.23-shaped webhook bodies and prediction results for the training-store tests.

The annotation events carry what Label Studio's webhook serializers send: the annotation (``result``,
``task``, ``completed_by``, ``was_cancelled``, ``ground_truth``, ``created_at``/``updated_at`` ISO times,
``lead_time``, ``parent_prediction`` ...), the task (``id``, ``data``, counters) and the project (every
field, including ``label_config``). Region results are written as the editor saves them: the region
first, then its per-region Choices/TextArea results with the same ``id``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from backend.jobs import TRAINING_LANE
from backend.labelstudio.results import choices_result, region_result, textarea_result
from backend.labelstudio.rle import encode_brush_rle

CONFIGS = Path(__file__).resolve().parents[2] / "label_configs"
BRUSH_CONFIG = (CONFIGS / "brush_full.xml").read_text()
POLYGON_CONFIG = (CONFIGS / "polygon_full.xml").read_text()
WIDTH, HEIGHT = 64, 48
IMAGE = "/data/upload/3/street.png"


def box_mask(y0: int, y1: int, x0: int, x1: int, *, shape: tuple[int, int] = (HEIGHT, WIDTH)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def iso(second: int, micro: int = 0) -> str:
    """An ISO time as Label Studio writes it (UTC, microseconds, ``Z``)."""
    return f"2025-06-01T10:{second // 60:02d}:{second % 60:02d}.{micro:06d}Z"


def brush_region(
    region_id: str,
    mask: np.ndarray,
    *,
    label: str = "animal",
    category: str | None = None,
    part: str | None = None,
    attributes: list[str] | None = None,
    caption: str | None = None,
    description: str | None = None,
    origin: str = "manual",
) -> list[dict]:
    """A brushlabels region and its per-region results, as the editor saves them."""
    height, width = mask.shape
    common = {"id": region_id, "to_name": "image", "origin": origin, "image_rotation": 0,
              "original_width": width, "original_height": height}  # fmt: skip
    items = [
        {**common, "from_name": "label", "type": "brushlabels",
         "value": {"format": "rle", "rle": encode_brush_rle(mask), "brushlabels": [label]}},
    ]  # fmt: skip
    for name, values in (("category", category), ("part", part), ("attributes", attributes)):
        if values:
            choices = values if isinstance(values, list) else [values]
            items.append({**common, "from_name": name, "type": "choices", "value": {"choices": choices}})
    for name, text in (("caption", caption), ("description", description)):
        if text:
            items.append({**common, "from_name": name, "type": "textarea", "value": {"text": [text]}})
    return items


def polygon_region(region_id: str, points_pct: list[list[float]], *, label: str = "vehicle", category=None):
    common = {"id": region_id, "to_name": "image", "origin": "manual", "image_rotation": 0,
              "original_width": WIDTH, "original_height": HEIGHT}  # fmt: skip
    geometry = {"points": points_pct, "closed": True}
    items = [
        {
            **common,
            "from_name": "label",
            "type": "polygonlabels",
            "value": {**geometry, "polygonlabels": [label]},
        }
    ]
    if category:  # Label Studio repeats a polygon's geometry in its per-region results
        items.append(
            {
                **common,
                "from_name": "category",
                "type": "choices",
                "value": {**geometry, "choices": [category]},
            }
        )
    return items


def predicted(region_id: str, mask: np.ndarray, *, label: str = "animal", **fields) -> list[dict]:
    """What our /predict returns for one region (made with the backend's own result writers)."""
    height, width = mask.shape
    items = [
        region_result(mask=mask, tool="BrushLabels", from_name="label", to_name="image", width=width,
                      height=height, label=label, score=0.9, region_id=region_id)
    ]  # fmt: skip
    for name in ("category", "part", "attributes"):
        if fields.get(name):
            values = fields[name] if isinstance(fields[name], list) else [fields[name]]
            items.append(
                choices_result(
                    region_id=region_id, from_name=name, to_name="image", choices=values, score=0.8
                )
            )
    for name in ("caption", "description"):
        if fields.get(name):
            items.append(
                textarea_result(
                    region_id=region_id, from_name=name, to_name="image", text=fields[name], score=0.7
                )
            )
    return items


def project(project_id: int = 3, label_config: str | None = BRUSH_CONFIG) -> dict:
    doc = {
        "id": project_id, "title": "Street regions", "description": "", "label_config": label_config,
        "expert_instruction": "", "show_instruction": False, "show_skip_button": True,
        "enable_empty_annotation": True, "show_annotation_history": False, "organization": 1,
        "color": "#FFFFFF", "maximum_annotations": 1, "is_published": False, "model_version": "",
        "is_draft": False, "created_by": 1, "created_at": "2025-05-30T09:00:00.000000Z",
        "min_annotations_to_start_training": 0, "start_training_on_annotation_update": True,
        "show_collab_predictions": True, "num_tasks_with_annotations": None, "task_number": 10,
        "useful_annotation_number": None, "ground_truth_number": 0, "skipped_annotations_number": 0,
        "total_annotations_number": 1, "total_predictions_number": 1, "sampling": "Sequential sampling",
        "show_ground_truth_first": False, "show_overlap_first": False, "overlap_cohort_percentage": 100,
        "task_data_login": None, "task_data_password": None, "control_weights": {}, "parsed_label_config": {},
        "evaluate_predictions_automatically": False, "config_has_control_tags": True, "skip_queue": "REQUEUE_FOR_OTHERS",
        "reveal_preannotations_interactively": False, "pinned_at": None, "finished_task_number": 1,
        "queue_total": 10, "queue_done": 1,
    }  # fmt: skip
    if label_config is None:
        del doc["label_config"]
    return doc


def annotation_event(
    result: list[dict],
    *,
    action: str = "ANNOTATION_CREATED",
    annotation_id: int = 101,
    task_id: int = 11,
    project_id: int = 3,
    updated_at: str | None = None,
    was_cancelled: bool = False,
    label_config: str | None = BRUSH_CONFIG,
    image: str = IMAGE,
) -> dict:
    updated_at = updated_at or iso(5)
    return {
        "action": action,
        "annotation": {
            "id": annotation_id, "result": result, "created_username": " annotator@example.com, 2",
            "created_ago": "0 minutes", "completed_by": 2, "was_cancelled": was_cancelled, "ground_truth": False,
            "created_at": iso(1), "updated_at": updated_at, "draft_created_at": iso(0), "lead_time": 41.2,
            "import_id": None, "last_action": None, "bulk_created": False, "task": task_id, "project": project_id,
            "updated_by": 2, "parent_prediction": 7, "parent_annotation": None, "last_created_by": None,
        },
        "task": {
            "id": task_id, "data": {"image": image}, "meta": {}, "created_at": "2025-05-30T09:00:00.000000Z",
            "updated_at": updated_at, "is_labeled": True, "overlap": 1, "inner_id": task_id, "total_annotations": 1,
            "cancelled_annotations": 0, "total_predictions": 1, "comment_count": 0, "unresolved_comment_count": 0,
            "last_comment_updated_at": None, "project": project_id, "updated_by": 2, "file_upload": 4,
            "comment_authors": [],
        },
        "project": project(project_id, label_config),
    }  # fmt: skip


def deleted_event(annotation_ids: list[int], *, project_id: int | None = 3) -> dict:
    body = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": i} for i in annotation_ids]}
    if project_id is not None:
        body["project"] = project(project_id)
    return body


def start_training(project_id: int = 3) -> dict:
    return {"action": "START_TRAINING", "project": project(project_id)}


# ---- helpers run in child processes (multiprocessing "spawn" imports this module) ----


def write_annotations(db_path: str, first_id: int, count: int) -> int:
    """Store ``count`` annotations through the real intake; returns how many were stored."""
    from backend.jobs import SqliteJobQueue
    from backend.learning.intake import handle_webhook
    from backend.learning.store import TrainingStore

    store, queue = TrainingStore(db_path), SqliteJobQueue(db_path)
    stored = 0
    for annotation_id in range(first_id, first_id + count):
        mask = box_mask(4, 20, 4 + annotation_id % 30, 30 + annotation_id % 30)
        body = annotation_event(
            brush_region(f"r{annotation_id}", mask, category="dog"),
            annotation_id=annotation_id,
            task_id=annotation_id,
        )
        stored += (
            handle_webhook(store, body, label_config_for=lambda _: None, queue=queue)["status"] == "stored"
        )
    store.close()
    queue.close()
    return stored


def claim_all(db_path: str, worker_id: str, lease_s: float = 30.0) -> list[str]:
    """Claim and complete jobs until none is left; returns the ids this process ran."""
    from backend.jobs import SqliteJobQueue

    queue = SqliteJobQueue(db_path)
    ran = []
    idle = 0
    while idle < 20:
        job = queue.claim(worker_id, lease_s, lane=TRAINING_LANE)
        if job is None:
            idle += 1
            continue
        idle = 0
        queue.complete(job.job_id, {"by": worker_id}, token=job.token)
        ran.append(job.job_id)
    queue.close()
    return ran


def delivered(client, runtime, body: dict) -> dict:
    """POST ``body`` to ``/webhook`` as Label Studio does, let the runtime's intake parse it, and return
    what parsing it gave (``stored``, ``duplicate``, ... or ``failed`` with the error). The answer itself
    only says the body was received: webhooks are parsed after they are acknowledged."""
    response = client.post("/webhook", json=body)
    assert response.status_code in (200, 201), response.json
    if response.json.get("status") != "received":
        return response.json
    assert runtime.intake.drain(timeout_s=60)
    return runtime.intake.outcome(response.json["inbox_id"])
