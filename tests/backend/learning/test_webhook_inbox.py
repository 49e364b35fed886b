"""Accepted labels are never refused: a webhook is answered once its body is stored, however many
arrive at once, and parsed after; what was stored survives a restart; what Label Studio's webhooks
never delivered is found by the reconciliation."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from lsapi_server import LEGACY_KEY, FaultyLabelStudio
from waitress import create_server
from webhook_payloads import BRUSH_CONFIG, annotation_event, box_mask, brush_region, iso

from backend.jobs.periodic import FULL_READ_S
from backend.labelstudio.api import LabelStudioClient
from backend.learning import intake as intake_module
from backend.runtime.runtime import build_runtime
from backend.runtime.settings import Settings
from backend.service.app import create_app
from backend.service.server import server_options

PROJECT = 3


def settings_for(tmp_path, **extra) -> Settings:
    options = dict(
        model_dir=tmp_path / "models", osprey_model="tiny", sam_model="tiny", host="127.0.0.1", port=0,
        threads=4, webhook_concurrency=1, train_every=0, lora="false", reconcile_s=0,
    )  # fmt: skip
    return Settings.from_env({}, **{**options, **extra})


@pytest.fixture
def served(tiny_models, tmp_path):
    """The real app under waitress (as ``serve`` runs it) on a started runtime."""
    settings = settings_for(tmp_path)
    runtime = build_runtime(settings, models=tiny_models).start()
    server = create_server(create_app(runtime), **server_options(settings))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}", runtime
    finally:
        server.close()
        runtime.close()


def event(annotation_id: int, *, task_id: int | None = None, updated: int = 5) -> dict:
    mask = box_mask(4, 20, 4 + annotation_id % 30, 30 + annotation_id % 30)
    return annotation_event(brush_region(f"r{annotation_id}", mask, category="dog"), annotation_id=annotation_id,
                            task_id=task_id or annotation_id, project_id=PROJECT, updated_at=iso(updated))  # fmt: skip


def test_sixteen_webhooks_at_once_are_all_acknowledged_and_stored(served):
    """None refused: each is appended to the inbox and acknowledged (that the answer never waits for
    parsing, what keeps it within Label Studio's 1 s, is the next test's)."""
    url, runtime = served

    def send(annotation_id: int) -> int:
        return requests.post(f"{url}/webhook", json=event(annotation_id), timeout=10).status_code

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(send, range(7000, 7016))) == [201] * 16
    assert runtime.intake.drain(timeout_s=60)
    assert runtime.store.count_accepted(str(PROJECT)) == 16


def test_one_annotation_delivered_fifty_times_by_eight_threads_is_stored_once(served):
    url, runtime = served
    body = event(7100)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: requests.post(f"{url}/webhook", json=body, timeout=10), range(50)))
    assert [r.status_code for r in answers] == [201] * 50
    assert runtime.intake.drain(timeout_s=60)
    outcomes = [runtime.intake.outcome(r.json()["inbox_id"])["status"] for r in answers]
    assert outcomes.count("stored") == 1 and outcomes.count("duplicate") == 49
    assert runtime.store.count_accepted(str(PROJECT)) == 1


def test_the_answer_does_not_wait_for_parsing(served, monkeypatch):
    url, runtime = served
    parse = intake_module.handle_webhook

    def slow_parse(*args, **kwargs):
        time.sleep(2.0)  # a large annotation's masks decoding
        return parse(*args, **kwargs)

    monkeypatch.setattr(intake_module, "handle_webhook", slow_parse)
    started = time.monotonic()
    response = requests.post(f"{url}/webhook", json=event(7200), timeout=10)
    assert response.status_code == 201 and response.json()["status"] == "received"
    assert time.monotonic() - started < 1.0
    assert runtime.intake.drain(timeout_s=30)
    assert runtime.intake.outcome(response.json()["inbox_id"])["status"] == "stored"


def test_a_malformed_envelope_is_refused_before_it_is_stored(served):
    url, runtime = served
    body = event(7300)
    body["annotation"]["id"] = "seven"
    response = requests.post(f"{url}/webhook", json=body, timeout=10)
    assert response.status_code == 400 and "'annotation.id'" in response.json()["error"]
    assert runtime.intake.inbox.counts()["new"] == 0


def test_webhooks_stored_before_a_stop_are_parsed_after_the_restart(tiny_models, tmp_path):
    before = build_runtime(settings_for(tmp_path), models=tiny_models)  # not started: nothing parses
    client = create_app(before).test_client()
    for annotation_id in (7400, 7401):
        assert client.post("/webhook", json=event(annotation_id)).status_code == 201
    before.close()
    after = build_runtime(settings_for(tmp_path), models=tiny_models).start()
    try:
        assert after.intake.drain(timeout_s=30)
        assert after.store.count_accepted(str(PROJECT)) == 2
    finally:
        after.close()


@pytest.fixture
def ls():
    fake = FaultyLabelStudio()
    fake.add_project(PROJECT, BRUSH_CONFIG)
    yield fake
    fake.close()


def test_the_reconciliation_stores_what_the_webhooks_dropped(tiny_models, tmp_path, ls):
    for annotation_id in (7500, 7501, 7502):
        body = event(annotation_id)
        ls.add_task(PROJECT, annotation_id, body["task"]["data"], annotations=[body["annotation"]])
    ls.add_task(PROJECT, 7599, {"image": "/data/upload/3/none.png"})  # never annotated
    runtime = build_runtime(settings_for(tmp_path, reconcile_s=600), models=tiny_models,
                            client=LabelStudioClient(url=ls.url, api_key=LEGACY_KEY))  # fmt: skip
    try:
        runtime.projects.remember(str(PROJECT), BRUSH_CONFIG)
        client = create_app(runtime).test_client()
        assert client.post("/webhook", json=event(7500)).status_code == 201  # the only webhook that arrived
        assert runtime.intake.drain()
        assert runtime.reconciler.sweep() == {str(PROJECT): 2}  # the two whose webhook was lost
        assert runtime.intake.drain()
        assert runtime.store.count_accepted(str(PROJECT)) == 3
        assert runtime.reconciler.sweep() == {str(PROJECT): 0}  # nothing new: nothing appended

        newer = event(7501, updated=50)  # edited in Label Studio, webhook lost again
        ls.state.tasks[7501]["annotations"] = [newer["annotation"]]
        ls.state.tasks[7502]["annotations"] = []  # deleted in Label Studio
        assert runtime.reconciler.sweep() == {str(PROJECT): 2}
        assert runtime.intake.drain()
        assert (
            runtime.store.annotation_state(str(PROJECT), 7501, 7501)[1]
            > runtime.store.annotation_state(str(PROJECT), 7500, 7500)[1]
        )
        assert runtime.store.annotation_state(str(PROJECT), 7502, 7502)[0] == "deleted"
        assert client.get("/metrics").json["intake"]["reconciliation"]["found"] == {str(PROJECT): 2}
    finally:
        runtime.close()


class Listings:
    """The Label Studio client, recording which tasks each listing gave (Label Studio chose them)."""

    def __init__(self, client) -> None:
        self.client, self.read = client, []

    def tasks(self, project, **filters):
        self.read.append([])
        for task in self.client.tasks(project, **filters):
            self.read[-1].append(task["id"])
            yield task

    def __getattr__(self, name):
        return getattr(self.client, name)


def test_a_project_deleted_in_label_studio_costs_the_others_no_reconciliation(
    tiny_models, tmp_path, ls, caplog
):
    """Projects stay known after Label Studio deletes them (the store holds their annotations): the
    sweep must reach the projects after a deleted one, and look at the deleted one only every few hours."""
    body = event(7700)
    ls.add_task(PROJECT, 7700, body["task"]["data"], annotations=[body["annotation"]])
    runtime = build_runtime(settings_for(tmp_path, reconcile_s=600), models=tiny_models,
                            client=LabelStudioClient(url=ls.url, api_key=LEGACY_KEY))  # fmt: skip
    try:
        runtime.projects.remember("2", BRUSH_CONFIG)  # known here, deleted in Label Studio
        runtime.projects.remember(str(PROJECT), BRUSH_CONFIG)
        reconciler, clock = runtime.reconciler, [0.0]
        reconciler.clock = lambda: clock[0]
        with caplog.at_level("WARNING"):
            assert reconciler.sweep() == {str(PROJECT): 1}
            assert reconciler.last["gone"] == ["2"] and runtime.intake.drain()
            clock[0] += 600.0
            reads = len(ls.calls)
            assert reconciler.sweep() == {str(PROJECT): 0}
        assert len(ls.calls) - reads == 1  # project 3's changes alone: the deleted one is left alone
        assert sum("has no such project" in r.getMessage() for r in caplog.records) == 1
        clock[0] += FULL_READ_S
        reconciler.sweep()
        assert reconciler.last["gone"] == ["2"] and len(ls.calls) - reads >= 3  # looked at again
    finally:
        runtime.close()


def test_the_reconciliation_reads_the_annotated_tasks_once_then_only_what_label_studio_changed(
    tiny_models, tmp_path, ls
):
    """A million annotated tasks must not be read every ten minutes: one whole read (annotated tasks
    only), then only the tasks Label Studio touched since the newest change seen (less the overlap),
    which also finds a task whose every annotation was deleted; a whole read again after FULL_READ_S."""
    for annotation_id, updated in (
        (7600, "2026-12-06T10:00:00.000000Z"),
        (7601, "2026-12-06T09:00:00.000000Z"),
    ):
        body = event(annotation_id)
        task = ls.add_task(PROJECT, annotation_id, body["task"]["data"], annotations=[body["annotation"]])
        task["updated_at"] = updated
    ls.add_task(PROJECT, 7699, event(7699)["task"]["data"])  # not annotated (yet)
    runtime = build_runtime(settings_for(tmp_path, reconcile_s=600), models=tiny_models,
                            client=LabelStudioClient(url=ls.url, api_key=LEGACY_KEY))  # fmt: skip
    try:
        runtime.projects.remember(str(PROJECT), BRUSH_CONFIG)
        reconciler, clock = runtime.reconciler, [0.0]
        reconciler.clock = lambda: clock[0]
        reconciler.client = listings = Listings(reconciler.client)
        assert reconciler.sweep() == {str(PROJECT): 2}
        assert listings.read[-1] == [7600, 7601]  # the annotated ones alone
        assert runtime.intake.drain()

        clock[0] += 3600.0
        with ls._lock:  # every annotation of 7600 deleted in Label Studio; its webhook lost
            ls.state.tasks[7600].update(annotations=[], updated_at="2026-12-06T11:00:00.000000Z")
        assert reconciler.sweep() == {str(PROJECT): 1}
        assert listings.read[-1] == [7600]  # 7601 unchanged since 09:00, before 10:00 less the overlap
        assert reconciler.last["read"] == {str(PROJECT): "tasks changed after 2026-12-06T09:45:00+00:00"}
        assert runtime.intake.drain()
        assert runtime.store.annotation_state(str(PROJECT), 7600, 7600)[0] == "deleted"

        late = event(7699)  # annotated at noon, webhook lost
        with ls._lock:
            ls.state.tasks[7699].update(
                annotations=[late["annotation"]], updated_at="2026-12-06T12:00:00.000000Z"
            )
        assert reconciler.sweep() == {str(PROJECT): 1}
        assert listings.read[-1] == [7600, 7699]  # 7600 again: 11:00 is within the overlap of 11:00
        assert runtime.intake.drain() and runtime.store.count_accepted(str(PROJECT)) == 2

        clock[0] += FULL_READ_S
        assert reconciler.sweep() == {str(PROJECT): 0}
        assert listings.read[-1] == [7601, 7699]  # whole again: every annotated task

        with ls._lock:  # deleted while the backend was down, before any window a changed-tasks read has
            ls.state.tasks[7601].update(annotations=[], updated_at="2026-12-06T08:00:00.000000Z")
            del ls.state.tasks[7699]  # the task itself, with its annotation
        reconciler._seen.clear()  # as after a restart
        assert reconciler.sweep() == {str(PROJECT): 2}
        assert listings.read[-2:] == [[], [7601]]  # nothing annotated; then the store's two by id (7699 gone)
        assert runtime.intake.drain() and runtime.store.count_accepted(str(PROJECT)) == 0
        assert runtime.store.annotation_state(str(PROJECT), 7601, 7601)[0] == "deleted"
    finally:
        runtime.close()
