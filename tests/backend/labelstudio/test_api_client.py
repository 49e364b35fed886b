"""The Label Studio API client's own rules (the real API is driven in tests/e2e/test_prelabel.py):
plain JSON tasks, missing tasks skipped on request, failures named without the token."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from backend.labelstudio.api import LabelStudioAPIError, LabelStudioClient

TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.c2lnbmF0dXJl"


class ApiError(Exception):
    def __init__(self, status_code: int) -> None:
        super().__init__(f"status {status_code} with headers Authorization: Bearer {TOKEN}")
        self.status_code = status_code


class SDK:
    """Just enough of label_studio_sdk.LabelStudio: tasks.get / tasks.list / projects / predictions."""

    def __init__(self) -> None:
        sdk = self
        self.created: list = []

        class Tasks:
            def list(self, **kwargs):
                sdk.list_kwargs = kwargs
                if kwargs.get("query"):
                    included = json.loads(kwargs["query"])["selectedItems"]["included"]
                    if 500 in included:
                        raise ApiError(500)
                    return iter([{"id": i, "data": {"image": "x"}, "project": 7, "predictions": [],
                                  "created_at": dt.datetime(2026, 1, 1), "extra": 1}
                                 for i in included if i != 404])  # fmt: skip
                return iter([{"id": 2, "data": {}, "project": 7}, {"id": 1, "data": {}, "project": 7}])

        class Projects:
            def import_predictions(self, id, request):  # noqa: A002
                sdk.created.append((id, request))
                return type("Response", (), {"created": len(request)})()

            def get(self, id):  # noqa: A002
                return {"id": id, "label_config": "<View/>"}

        class Predictions:
            def delete(self, id):  # noqa: A002
                raise ApiError(403)

        self.tasks, self.projects, self.predictions = Tasks(), Projects(), Predictions()


@pytest.fixture
def client():
    return LabelStudioClient(url="http://ls.example:8080/", api_key=TOKEN, sdk_client=SDK())


def test_tasks_come_back_as_plain_json_with_the_keys_predict_sees(client):
    [task] = list(client.tasks(7, ids=[5]))
    assert task == {
        "id": 5,
        "data": {"image": "x"},
        "annotations": None,
        "predictions": [],
        "project": 7,
        "meta": None,
    }
    assert json.loads(client._sdk.list_kwargs["query"]) == {"selectedItems": {"all": False, "included": [5]}}
    listed = list(client.tasks(7, view=3))
    assert [t["id"] for t in listed] == [2, 1]
    assert client._sdk.list_kwargs == {
        "project": 7,
        "view": 3,
        "query": None,
        "fields": "all",
        "page_size": 100,
    }


def test_tasks_by_id_come_from_the_list_in_the_order_asked_and_in_pages(client):
    # one by one (GET /api/tasks/<id>/) would make Label Studio ask the backend for predictions
    assert [t["id"] for t in client.tasks(7, ids=[9, 3, 7], page_size=2)] == [9, 3, 7]
    assert json.loads(client._sdk.list_kwargs["query"])["selectedItems"]["included"] == [7]


def test_missing_tasks_are_skipped_only_when_asked(client):
    assert [t["id"] for t in client.tasks(7, ids=[5, 404, 6], skip_missing=True)] == [5, 6]
    with pytest.raises(LabelStudioAPIError, match=r"no tasks \[404\]") as raised:
        list(client.tasks(7, ids=[404]))
    assert raised.value.status == 404
    with pytest.raises(LabelStudioAPIError, match=r"HTTP 500"):
        list(client.tasks(7, ids=[500], skip_missing=True))  # only an absent task means "gone"


def test_failures_name_the_call_and_status_but_never_the_token(client):
    with pytest.raises(LabelStudioAPIError) as raised:
        client.delete_prediction(12)
    message = str(raised.value)
    assert "DELETE prediction 12" in message and "HTTP 403" in message and TOKEN not in message


def test_bulk_writes_and_the_label_config(client):
    assert client.create_predictions(7, []) == 0 and client._sdk.created == []
    items = [{"task": 1, "result": [{"type": "textarea"}], "score": 0.5, "model_version": "v"}]
    assert client.create_predictions(7, items) == 1 and client._sdk.created == [(7, items)]
    assert client.label_config(7) == "<View/>"


def test_the_client_needs_a_url_and_a_token():
    with pytest.raises(ValueError, match="LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"):
        LabelStudioClient(url="", api_key=TOKEN)
