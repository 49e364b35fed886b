"""Malformed ids, numbers and nesting over real HTTP: a 4xx naming the field, never a 500, and a
``/predict`` batch answers exactly one result per task, in order, whatever its tasks' ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from http_app import parsed, served_tiny_service
from webhook_payloads import annotation_event, box_mask, brush_region, deleted_event

from backend.service.payloads import MAX_JSON_DEPTH, json_depth

CONFIG = (Path(__file__).resolve().parents[3] / "label_configs" / "captions_only.xml").read_text()
BIG = str(2**64)


@pytest.fixture(scope="module")
def url(tiny_models, file_store, tmp_path_factory):
    with served_tiny_service(
        tiny_models, file_store, tmp_path_factory.mktemp("models"), "/data/upload/9/scene.png"
    ) as base:
        yield base


def post_raw(url: str, text: str) -> requests.Response:
    return requests.post(url, data=text.encode(), headers={"Content-Type": "application/json"}, timeout=60)


def task(task_id) -> dict:
    return {"id": task_id, "data": {"image": "/data/upload/9/scene.png"}}


def batch_body(*task_ids: str) -> str:
    """A /predict body with the tasks' ids written as raw JSON (so 1e400 and 2**64 arrive as sent)."""
    tasks = ", ".join(
        f'{{"id": {task_id}, "data": {{"image": "/data/upload/9/scene.png"}}}}' for task_id in task_ids
    )
    return f'{{"tasks": [{tasks}], "project": "9.1731000000", "label_config": {json.dumps(CONFIG)}}}'


@pytest.mark.parametrize("route", ["/predict", "/webhook", "/setup"])
def test_deeply_nested_json_is_refused_with_400(url, route):
    deep = "[" * 100_000 + "]" * 100_000
    response = post_raw(f"{url}{route}", f'{{"action": "ANNOTATION_CREATED", "tasks": {deep}}}')
    assert response.status_code == 400
    assert "nests JSON 100001 levels deep; at most 64" in response.json()["error"]
    assert requests.get(f"{url}/health", timeout=5).status_code == 200


def test_depth_counting_skips_brackets_inside_strings():
    assert json_depth(b'{"a": [1, {"b": "[[[[{{{{\\"]]]"}]}') == 3
    assert json_depth(b'"\\\\"') == 0 and json_depth(b"[[]]") == 2 and json_depth(b"7") == 0
    nested = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert json_depth(nested.encode()) == MAX_JSON_DEPTH


@pytest.mark.parametrize(
    ("task_id", "message"),
    [
        ('"abc"', "'tasks[0].id' must be an integer id, got str 'abc'"),
        (BIG, "'tasks[0].id' must be an integer id between 0 and 2**63 - 1, got an integer of 65 bits"),
        ("1e400", "'tasks[0].id' must be an integer id, got float inf"),
        ("[1]", "'tasks[0].id' must be an integer id, got list [1]"),
        ("NaN", "'tasks[0].id' must be an integer id, got float nan"),
        ("true", "'tasks[0].id' must be an integer id, got bool True"),
    ],
)
def test_a_batch_gets_one_result_per_task_in_order_whatever_the_ids(url, task_id, message):
    """Label Studio drops every prediction of a batch whose result count is wrong: the bad task gets the
    answer without ``result`` (Label Studio stores nothing for it), the good one its prediction."""
    response = post_raw(f"{url}/predict", batch_body(task_id, "2"))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 2
    assert "result" not in results[0] and results[1]["result"]
    assert response.json()["errors"] == [{"index": 0, "task": None, "error": message}]


def test_bad_ids_in_the_middle_of_a_larger_batch_keep_the_order(url):
    response = post_raw(f"{url}/predict", batch_body("1", '"abc"', "3", BIG))
    results = response.json()["results"]
    assert len(results) == 4
    assert [("result" in r) for r in results] == [True, False, True, False]
    assert [e["index"] for e in response.json()["errors"]] == [1, 3]


def test_an_interactive_request_with_a_bad_task_id_is_refused_naming_it(url):
    body = json.loads(batch_body('"abc"'))
    body["params"] = {"context": {"result": [{"type": "keypointlabels", "value": {"x": 1, "y": 1}}]}}
    response = requests.post(f"{url}/predict", json=body, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"] == "'tasks[0].id' must be an integer id, got str 'abc'"


@pytest.mark.parametrize(
    ("project", "message"),
    [("[7]", "'project' must be a Label Studio project id (int or str), got list [7]"),
     ("1e400", "'project' must be a Label Studio project id (int or str), got float inf"),
     ('"7/../x"', "'project' must be a Label Studio project id such as 7"),
     (BIG, "'project' must be an integer id between 0 and 2**63 - 1")],
)  # fmt: skip
@pytest.mark.parametrize("route", ["/predict", "/setup"])
def test_malformed_project_ids_are_refused(url, route, project, message):
    body = f'{{"tasks": [], "schema": {json.dumps(CONFIG)}, "label_config": {json.dumps(CONFIG)}, "project": {project}}}'
    response = post_raw(f"{url}{route}", body)
    assert response.status_code == 400 and message in response.json()["error"]


def webhook_text(
    annotation_id: str = "601", task_id: str = "11", updated_at: str = '"2025-06-01T10:00:05Z"'
) -> str:
    """An ANNOTATION_CREATED body (Label Studio's shape) with some fields written as raw JSON."""
    body = annotation_event(brush_region("r1", box_mask(4, 20, 4, 30), category="dog"))
    body["annotation"].update(id="@ID@", task="@TASK@", updated_at="@TS@")
    body["task"]["id"] = "@TASK@"
    text = json.dumps(body)
    return text.replace('"@ID@"', annotation_id).replace('"@TASK@"', task_id).replace('"@TS@"', updated_at)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("annotation_id", BIG, "'annotation.id' must be an integer id between 0 and 2**63 - 1"),
        ("annotation_id", "1e400", "'annotation.id' must be an integer id, got float inf"),
        ("annotation_id", "[1]", "'annotation.id' must be an integer id, got list [1]"),
        ("annotation_id", '"abc"', "'annotation.id' must be an integer id, got str 'abc'"),
        ("task_id", BIG, "'task.id' must be an integer id between 0 and 2**63 - 1"),
        ("task_id", "-1", "'task.id' must be an integer id between 0 and 2**63 - 1, got -1"),
        ("updated_at", "NaN", "'annotation.updated_at' must be a finite time (ISO 8601 or POSIX seconds), got nan"),
        ("updated_at", "1e400", "'annotation.updated_at' must be a finite time (ISO 8601 or POSIX seconds), got inf"),
        ("updated_at", '"2025-13-45"', "'annotation.updated_at' is not an ISO 8601 time"),
    ],
)  # fmt: skip
def test_malformed_webhook_fields_get_400_naming_them(url, field, value, message):
    response = post_raw(f"{url}/webhook", webhook_text(**{field: value}))
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


def test_huge_ids_in_a_delete_event_are_refused(url):
    body = deleted_event([1]).copy()
    text = json.dumps(body).replace('{"id": 1}', f'{{"id": {BIG}}}')
    response = post_raw(f"{url}/webhook", text)
    assert response.status_code == 400
    assert "'annotations[0].id' must be an integer id between 0 and 2**63 - 1" in response.json()["error"]


def test_a_well_formed_webhook_still_stores_and_metrics_show_no_500(url):
    response = post_raw(f"{url}/webhook", webhook_text(annotation_id="602"))
    assert parsed(url, response)["regions"] == 1
    routes = requests.get(f"{url}/metrics", timeout=5).json()["routes"]["requests"]
    assert not [key for key in routes if key.endswith(" 500")]
