"""A deferred Retrieve-Predictions job interrupted by a crash is picked up again at the next start,
skips what was written and finishes; a job that fails for good says why, and /metrics never shows a
job as running that is not."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from lsapi_fake import FakeLabelStudio
from lsfakes import API_KEY, scene_png

from backend.jobs import PRELABEL_LANE
from backend.labelstudio.api import LabelStudioAPIError
from backend.runtime.runtime import build_runtime
from backend.runtime.settings import Settings

CONFIG = (Path(__file__).resolve().parents[3] / "label_configs" / "captions_only.xml").read_text()
VERSION = "tiny+sam-tiny-untrained"


@pytest.fixture
def setup(tiny_models, file_store, tmp_path):
    ls = FakeLabelStudio(label_config=CONFIG)
    tasks = []
    for i in range(6):
        image = file_store.add(f"/data/upload/7/resume-{i}.png", scene_png(seed=80 + i))
        ls.add_task(90 + i, image)
        tasks.append({"id": 90 + i, "data": {"image": image}, "annotations": [], "predictions": []})
    settings = Settings.from_env(
        {}, model_dir=tmp_path / "models", label_studio_url=file_store.url, label_studio_api_key=API_KEY,
        osprey_model="tiny", sam_model="tiny", device="cpu", predict_budget_s=0.001, max_caption_tokens=2,
        max_description_tokens=2, reconcile_s=0,
    )  # fmt: skip
    return ls, tasks, settings, tiny_models


def wait_for(condition, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_job_cut_off_by_a_crash_resumes_at_the_next_start_and_duplicates_nothing(setup):
    ls, tasks, settings, models = setup
    crashed = build_runtime(settings, models=models, client=ls)  # never started: its worker "dies"
    answer = crashed.predictor.predict(tasks=tasks, project="7", label_config=CONFIG, context=None)
    assert not any("result" in r for r in answer["results"])  # no time at all: every task deferred
    job = crashed.queue.claim("deadhost:4242:prelabel-crashed", 0.05, lane=PRELABEL_LANE)  # the dying worker
    assert job is not None and job.attempts == 1
    ls.create_predictions(7, [{"task": t, "result": [{"id": "x"}], "score": 0.5, "model_version": VERSION}
                              for t in job.payload["task_ids"][:2]])  # fmt: skip # written before the kill
    crashed.close()
    time.sleep(0.1)  # the dead worker's lease runs out

    restarted = build_runtime(settings, models=models, client=ls).start()
    try:
        wait_for(lambda: restarted.queue.job(job.job_id).status == "done")
        finished = restarted.queue.job(job.job_id)
        assert finished.attempts == 2
        assert (finished.result["predicted"], finished.result["skipped"]) == (4, 2)
        assert all(len(ls.of_version(t, VERSION)) == 1 for t in job.payload["task_ids"])
        progress = restarted.metrics()["prelabel"]["jobs"]["7"]
        assert progress["running"] is False and progress["eta_s"] is None
    finally:
        restarted.close()


class Unreachable(FakeLabelStudio):
    def tasks(self, *args, **kwargs):
        raise LabelStudioAPIError(
            "Label Studio list tasks of project 7 failed: no answer", kind="unreachable"
        )


def test_a_job_that_fails_says_why_and_is_not_shown_running(setup, caplog):
    _, tasks, settings, models = setup
    ls = Unreachable(label_config=CONFIG)
    runtime = build_runtime(settings, models=models, client=ls).start()
    try:
        runtime.predictor.predict(tasks=tasks, project="7", label_config=CONFIG, context=None)
        [job] = [j for j in runtime.queue.jobs("7") if j.kind.startswith("prelabel-")]
        wait_for(lambda: runtime.queue.job(job.job_id).status == "failed")
        metrics = runtime.metrics()
        last_error = metrics["training"]["queue"]["last_error"]
        assert last_error["job_id"] == job.job_id and "no answer" in last_error["error"]
        assert runtime.workers[PRELABEL_LANE].current is None
        assert all(not p.get("running") for p in metrics["prelabel"]["jobs"].values())
        assert any("no answer" in r.getMessage() for r in caplog.records)
    finally:
        runtime.close()
