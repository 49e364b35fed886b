"""The one Label Studio client against a Label Studio API that fails on purpose (the real API is driven
in tests/e2e): plain JSON tasks in pages, one retry policy, tokens refreshed by Label Studio's clock,
writes whose outcome is unknown said so, and failures named without the token."""

from __future__ import annotations

import threading
import time

import pytest
from lsapi_server import LEGACY_KEY, FaultyLabelStudio

from backend.labelstudio.api import TASK_KEYS, LabelStudioAPIError, LabelStudioClient
from backend.labelstudio.auth import LabelStudioAuth


@pytest.fixture
def ls():
    fake = FaultyLabelStudio()
    fake.add_project(7, "<View/>")
    for task_id in range(1, 251):
        fake.add_task(7, task_id, {"image": f"/data/upload/7/{task_id}.png"})
    yield fake
    fake.close()


def client_for(ls: FaultyLabelStudio, api_key: str = LEGACY_KEY, **auth_options) -> LabelStudioClient:
    auth = LabelStudioAuth(base_url=ls.url, api_key=api_key, **auth_options)
    return LabelStudioClient(url=ls.url, auth=auth)


def test_tasks_come_back_as_plain_json_page_by_page_and_by_id_in_the_order_asked(ls):
    client = client_for(ls)
    listed = list(client.tasks(7, page_size=100))
    assert [t["id"] for t in listed] == list(range(1, 251))
    assert set(listed[0]) == set(TASK_KEYS) and listed[0]["data"] == {"image": "/data/upload/7/1.png"}
    assert sum(1 for method, path in ls.calls if path == "/api/tasks/") == 3
    assert [t["id"] for t in client.tasks(7, ids=[9, 3, 120])] == [9, 3, 120]


def test_missing_tasks_are_skipped_only_when_asked(ls):
    client = client_for(ls)
    missing: list[int] = []
    read = client.tasks(7, ids=[5, 404, 6, 405], skip_missing=True, on_missing=missing.extend)
    assert [t["id"] for t in read] == [5, 6] and missing == [404, 405]
    with pytest.raises(LabelStudioAPIError, match=r"no tasks \[404\]") as raised:
        list(client.tasks(7, ids=[5, 404]))
    assert raised.value.kind == "not_found"


def test_a_reset_on_a_task_page_is_retried_and_nothing_is_lost(ls):
    ls.fail("GET", r"^/api/tasks/$", "reset", times=2)
    assert len(list(client_for(ls).tasks(7))) == 250


def test_label_studio_answering_503_for_8_s_is_waited_out(ls):
    ls.fail_everything_for(8.0)
    started = time.monotonic()
    assert client_for(ls).label_config(7) == "<View/>"
    assert 7.5 < time.monotonic() - started < 40


def test_access_tokens_are_refreshed_by_label_studios_clock_even_when_it_runs_ahead(ls):
    ls.access_lifetime_s, ls.clock_offset_s = 4.0, 2.0  # Label Studio's clock 2 s ahead of ours
    client = client_for(ls, api_key=ls.personal_access_token())
    deadline = time.monotonic() + 10
    calls = 0
    while time.monotonic() < deadline:
        assert client.label_config(7) == "<View/>"
        calls += 1
        time.sleep(0.1)
    assert ls.rejected_tokens == 0  # every token was replaced before Label Studio thought it expired
    assert 2 <= ls.refreshes <= calls / 4  # and not on every call
    assert client.auth.skew_s == pytest.approx(
        2.0, abs=0.6
    )  # iat has whole seconds: the middle of its bounds


def test_a_401_makes_the_client_fetch_a_new_token_and_try_once_more(ls):
    client = client_for(ls, api_key=ls.personal_access_token())
    assert client.label_config(7)
    ls.clock_offset_s = 400.0  # every access token issued so far is now expired for Label Studio
    assert client.label_config(7) == "<View/>"
    assert ls.rejected_tokens == 1 and ls.refreshes == 2


def test_a_refused_token_is_named_with_the_fix_and_never_printed(ls):
    with pytest.raises(LabelStudioAPIError) as raised:
        client_for(ls, api_key="wrong-legacy-key").label_config(7)
    assert raised.value.kind == "auth" and "LABEL_STUDIO_API_KEY" in str(raised.value)
    assert "wrong-legacy-key" not in str(raised.value)
    ls.revoked = True
    token = ls.personal_access_token()
    with pytest.raises(Exception, match="refused LABEL_STUDIO_API_KEY") as refused:
        client_for(ls, api_key=token).label_config(7)
    assert token not in str(refused.value)


def test_a_write_whose_answer_is_lost_says_its_outcome_is_unknown(ls):
    client = client_for(ls)
    ls.fail("POST", r"/import/predictions$", "commit_then_reset")
    with pytest.raises(LabelStudioAPIError) as raised:
        client.create_predictions(7, [{"task": 1, "result": [{"x": 1}], "model_version": "v"}])
    assert raised.value.outcome_unknown
    assert len(ls.predictions_of(1, "v")) == 1  # it was stored: the caller must read back, not resend
    ls.fail("POST", r"/import/predictions$", "commit_then_status", status=502, times=20)
    with pytest.raises(LabelStudioAPIError) as raised:
        client.create_predictions(7, [{"task": 2, "result": [{"x": 1}], "model_version": "v"}])
    assert raised.value.outcome_unknown and raised.value.status == 502
    assert len(ls.predictions_of(2, "v")) == 1  # a POST is never resent by the retry policy


def test_nothing_listening_is_unreachable_and_known_not_to_have_written():
    client = LabelStudioClient(url="http://127.0.0.1:9", api_key=LEGACY_KEY)
    with pytest.raises(LabelStudioAPIError, match="LABEL_STUDIO_URL") as raised:
        client.create_predictions(7, [{"task": 1, "result": [], "model_version": "v"}])
    assert raised.value.kind == "unreachable" and not raised.value.outcome_unknown


def test_deleting_a_prediction_that_is_already_gone_is_fine(ls):
    client = client_for(ls)
    client.delete_prediction(123456)
    client.create_predictions(7, [{"task": 3, "result": [{"x": 1}], "model_version": "v"}])
    [stored] = ls.predictions_of(3)
    client.delete_prediction(stored["id"])
    assert ls.predictions_of(3) == []


def test_threads_share_one_token(ls):
    client = client_for(ls, api_key=ls.personal_access_token())
    errors = []

    def read():
        try:
            for _ in range(5):
                client.label_config(7)
        except Exception as error:  # noqa: BLE001 - collected for the assertion
            errors.append(error)

    threads = [threading.Thread(target=read) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and ls.refreshes == 1


def test_label_studio_selects_the_unannotated_tasks_and_counts_them(ls):
    with ls._lock:
        ls.state.tasks[3]["annotations"] = [{"id": 30, "result": [], "was_cancelled": False}]
        ls.state.tasks[5]["annotations"] = [{"id": 50, "result": [], "was_cancelled": True}]  # skipped
    client = client_for(ls)
    listed = [t["id"] for t in client.tasks(7, unannotated=True, page_size=100)]
    assert listed == [i for i in range(1, 251) if i not in (3, 5)]
    assert client.count_tasks(7, unannotated=True) == 248 and client.count_tasks(7) == 250
    assert [t["id"] for t in client.tasks(7, annotated=True)] == [3, 5]
    assert [t["id"] for t in client.tasks(7, annotated=True, after=3)] == [5]
    with pytest.raises(ValueError, match="annotated"):
        list(client.tasks(7, annotated=True, unannotated=True))


@pytest.mark.parametrize("leaving", ["annotated", "unannotated"])
def test_a_task_leaving_the_selection_mid_listing_costs_no_other_task(ls, leaving):
    """Annotators keep working while a sweep lists the unannotated tasks (and annotations get deleted
    while the annotated ones are listed): a task that leaves the selection after its page was read must
    not shift the next page past a task that stays, as page numbers would."""
    with ls._lock:
        if leaving == "unannotated":  # every task annotated; task 10's annotation is deleted mid-listing
            for task in ls.state.tasks.values():
                task["annotations"] = [{"id": 1000 + task["id"], "result": [], "was_cancelled": False}]
    client = client_for(ls)
    listed = []
    for task in client.tasks(
        7, annotated=leaving == "unannotated", unannotated=leaving == "annotated", page_size=100
    ):
        listed.append(task["id"])
        if task["id"] == 100:  # after the first page: task 10 leaves the selection
            with ls._lock:
                ls.state.tasks[10]["annotations"] = (
                    [] if leaving == "unannotated" else [{"id": 10, "result": [], "was_cancelled": False}]
                )
    assert listed == list(range(1, 251))


def test_a_views_tasks_are_all_read_in_its_order_though_they_leave_it_as_they_are_pre_labelled(ls):
    """``prelabel --view`` of a view "no predictions yet": each chunk written takes its tasks out of the
    view while it is read, which must not push the next page past the tasks still in it."""
    ls.add_view(5, keep=lambda task: not task["predictions"], order=lambda task: -task["id"])
    client = client_for(ls)
    assert client.count_tasks(7, view=5) == 250
    listed = []
    for task in client.tasks(7, view=5, page_size=100):
        listed.append(task["id"])
        assert "predictions" in task  # read whole, by id
        if len(listed) % 50 == 0:  # a chunk of predictions written
            with ls._lock:
                for task_id in listed[-50:]:
                    ls.state.tasks[task_id]["predictions"].append({"id": task_id, "model_version": "v"})
    assert listed == list(range(250, 0, -1))
    with pytest.raises(LabelStudioAPIError, match="HTTP 404"):
        list(client.tasks(7, view=6))


def test_a_label_studio_that_caps_its_pages_below_the_size_asked_is_read_to_the_end(ls, monkeypatch):
    """A deployment may cap task pages (``TASK_API_PAGE_SIZE_MAX``) below the 100 asked: a short page is
    then not the last one; the count Label Studio gives says when the listing is done."""
    real = ls._task_page
    monkeypatch.setattr(
        ls, "_task_page", lambda query: real({**query, "page_size": min(30, int(query["page_size"]))})
    )
    ls.add_view(5, keep=lambda task: task["id"] % 2 == 0)
    client = client_for(ls)
    assert [t["id"] for t in client.tasks(7, page_size=100)] == list(range(1, 251))
    assert len(list(client.tasks(7, unannotated=True, page_size=100))) == 250
    assert [t["id"] for t in client.tasks(7, view=5, page_size=100)] == list(range(2, 251, 2))
    assert [t["id"] for t in client.tasks(7, ids=range(200, 0, -1), page_size=100)] == list(range(200, 0, -1))


def test_a_label_studio_that_ignores_the_id_filter_is_an_error_not_an_endless_listing(ls, monkeypatch):
    """An old or proxied Label Studio that answers every read with its first page would make a listing
    by id loop for ever, or skip tasks; it fails with a message instead."""
    real = ls._task_page
    monkeypatch.setattr(
        ls, "_task_page", lambda query: real({k: v for k, v in query.items() if k != "query"})
    )
    with pytest.raises(LabelStudioAPIError, match="not above id 100 in id order") as raised:
        list(client_for(ls).tasks(7, page_size=100))
    assert raised.value.kind == "upstream"
