"""A batch /predict answered within its time budget: what does not fit is deferred to a pre-label job
that writes through Label Studio's API, and nothing Label Studio would store empty is returned."""

from __future__ import annotations

import logging

import pytest
from lsapi_fake import FakeLabelStudio
from lsfakes import API_KEY, scene_png

from backend.predict import batch as batch_module
from backend.runtime.runtime import build_runtime
from backend.runtime.settings import Settings

VERSION = "tiny+sam-tiny-untrained"
CONFIG_NAME = "captions_only.xml"


@pytest.fixture
def clock(monkeypatch):
    """Seconds as the batch module sees them; every predicted task takes 10 s."""
    now = [1000.0]
    monkeypatch.setattr(batch_module.time, "monotonic", lambda: now[0])
    return now


@pytest.fixture
def ls():
    return FakeLabelStudio()


@pytest.fixture
def runtime(tiny_models, file_store, tmp_path, clock, monkeypatch, ls):
    def build(budget_s: float):
        settings = Settings.from_env(
            {}, model_dir=tmp_path / "models", label_studio_url=file_store.url,
            label_studio_api_key=API_KEY, osprey_model="tiny", sam_model="tiny",
            predict_budget_s=budget_s, prelabel_batch_tasks=2, max_caption_tokens=3, max_description_tokens=3,
            training=False,
        )  # fmt: skip
        built = build_runtime(settings, models=tiny_models, client=ls)
        batch = built.predictor.batch
        tasks_for = batch.tasks_for

        def slow_tasks_for(project):
            predictor = tasks_for(project)
            predict = predictor.predict

            def timed(tasks, schema, head=None):
                clock[0] += 10.0 * len(tasks)
                return predict(tasks, schema, head=head)

            predictor.predict = timed
            return predictor

        monkeypatch.setattr(batch, "tasks_for", slow_tasks_for)
        return built

    return build


@pytest.fixture
def tasks(file_store):
    return [
        {"id": 40 + i, "data": {"image": file_store.add(f"/data/upload/7/budget-{i}.png", scene_png(seed=20 + i))},
         "annotations": [], "predictions": []}
        for i in range(5)
    ]  # fmt: skip


def label_config():
    from pathlib import Path

    return (Path(__file__).resolve().parents[3] / "label_configs" / CONFIG_NAME).read_text()


def predict(svc, tasks):
    return svc.predictor.predict(
        tasks=tasks, project="7.1731000000", label_config=label_config(), context=None
    )


def test_what_does_not_fit_the_budget_is_deferred_and_written_by_the_job(runtime, tasks, ls):
    svc = runtime(budget_s=25.0)
    answer = predict(svc, tasks)["results"]
    assert len(answer) == 5
    # the first task alone (nothing measured yet), then one more at 10 s a task; 25 s leave no room
    assert [("result" in r) for r in answer] == [True, True, False, False, False]
    assert all(r["model_version"] == VERSION for r in answer)
    [job] = [j for j in svc.queue.jobs("7") if j.kind.startswith("prelabel-")]
    assert job.status == "queued" and job.payload["task_ids"] == [42, 43, 44]
    # selecting them again while the job waits defers nothing twice
    again = predict(svc, tasks[2:])["results"]
    assert not any("result" in r for r in again)
    assert len([j for j in svc.queue.jobs("7") if j.kind.startswith("prelabel-")]) == 1

    for task in tasks:
        ls.add_task(task["id"], task["data"]["image"])
    assert svc.workers["training"].run_once() is None  # pre-label jobs have their own lane
    ran = svc.workers["prelabel"].run_once()
    finished = svc.queue.job(ran.job_id)
    assert finished.status == "done", finished.error
    assert (finished.result["predicted"], finished.result["failed"]) == (3, 0)
    for task_id in (42, 43, 44):
        [written] = ls.of_version(task_id, VERSION)
        assert written["result"]
    assert ls.of_version(40, VERSION) == []  # answered inline: Label Studio stores that one itself
    assert svc.metrics()["prelabel"]["jobs"]["7"]["done"] == 3


def test_a_batch_within_budget_is_answered_in_full(runtime, tasks):
    svc = runtime(budget_s=500.0)
    answer = predict(svc, tasks)["results"]
    assert all(r["result"] for r in answer)
    assert not [j for j in svc.queue.jobs("7") if j.kind.startswith("prelabel-")]


def test_without_the_api_the_batch_is_finished_now_and_says_why(runtime, tasks, caplog, monkeypatch):
    svc = runtime(budget_s=15.0)
    monkeypatch.setattr(svc.deferrals, "client", None)  # as without LABEL_STUDIO_URL/API_KEY
    with caplog.at_level(logging.WARNING, logger="backend.predict.batch"):
        answer = predict(svc, tasks[:3])["results"]
    assert all(r["result"] for r in answer)
    assert any("cannot be deferred" in m and "LABEL_STUDIO_API_KEY" in m for m in caplog.messages)


def test_uneven_tasks_never_push_the_answer_past_the_budget(runtime, tasks, clock, monkeypatch):
    """A first task that is quick, then slow ones: the answer still goes out within the budget."""
    svc = runtime(budget_s=30.0)
    more = [dict(t, id=t["id"] + 100) for t in tasks] * 4  # 20 tasks
    for i, task in enumerate(more):
        task["id"] = 500 + i
    durations = iter([2.0] + [8.0] * 100)
    batch = svc.predictor.batch

    def uneven(project):
        predictor = svc.tasks_for(project)  # the runtime's own, without the fixture's 10 s a task
        predict = predictor.predict

        def timed(batch_tasks, schema, head=None):
            clock[0] += sum(next(durations) for _ in batch_tasks)
            return predict(batch_tasks, schema, head=head)

        predictor.predict = timed
        return predictor

    monkeypatch.setattr(batch, "tasks_for", uneven)
    started = clock[0]
    answer = predict(svc, more)["results"]
    assert clock[0] - started <= 30.0
    answered = sum("result" in r for r in answer)
    assert 2 <= answered < len(more)  # what fits is answered, the rest deferred
    [job] = [j for j in svc.queue.jobs("7") if j.kind.startswith("prelabel-")]
    assert len(job.payload["task_ids"]) == len(more) - answered
