"""The pre-label engine on the tiny models: batched across tasks with one-task-at-a-time answers,
idempotent and resumable writes, retries with backoff, and nothing empty ever left behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from lsapi_fake import FakeLabelStudio
from lsfakes import API_KEY, scene_png

from backend.labelstudio.images import ImageLoader
from backend.labelstudio.schema import parse_label_config
from backend.predict.options import PredictOptions
from backend.predict.tasks import TaskPredictor
from backend.prelabel.engine import prelabel

CONFIGS = Path(__file__).resolve().parents[3] / "label_configs"
VERSION = "tiny+sam-tiny-untrained"
OPTIONS = PredictOptions(max_caption_tokens=4, max_description_tokens=4)


@pytest.fixture(scope="module")
def schema():
    return parse_label_config((CONFIGS / "brush_full.xml").read_text())


@pytest.fixture(scope="module")
def images(file_store):
    return [file_store.add(f"/data/upload/7/prelabel-{i}.png", scene_png(seed=i)) for i in range(5)]


@pytest.fixture
def engine(tiny_models, file_store):
    def build(batch_tasks: int = 3) -> TaskPredictor:
        loader = ImageLoader(label_studio_url=file_store.url, api_key=API_KEY, cache_size=0)
        return TaskPredictor(models=tiny_models, loader=loader, options=OPTIONS, batch_tasks=batch_tasks)

    return build


def project_with(images, *, missing: int | None = None) -> FakeLabelStudio:
    ls = FakeLabelStudio()
    for i, image in enumerate(images):
        ls.add_task(100 + i, "/data/upload/7/gone.png" if i == missing else image)
    return ls


def run(ls, engine, schema, **kwargs):
    sleeps: list[float] = []
    summary = prelabel(
        ls.tasks(7), predictor=engine, schema=schema, project=7, model_version=VERSION, sink=ls,
        sleep=sleeps.append, **kwargs,
    )  # fmt: skip
    return summary, sleeps


def test_batched_predictions_equal_one_task_at_a_time(engine, schema, images):
    batched, alone = project_with(images), project_with(images)
    summary, _ = run(batched, engine(batch_tasks=3), schema)
    run(alone, engine(batch_tasks=1), schema)
    assert summary.predicted == 5 and not summary.failed and summary.written == 5
    for task_id in batched.tasks_by_id:
        [ours], [single] = batched.of_version(task_id, VERSION), alone.of_version(task_id, VERSION)
        assert ours["result"] and len(ours["result"]) == len(single["result"])
        for a, b in zip(ours["result"], single["result"], strict=True):
            assert {k: v for k, v in a.items() if k not in ("id", "score")} == {
                k: v for k, v in b.items() if k not in ("id", "score")
            }
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)
    # chunked: 5 tasks in chunks of 8 -> one bulk write
    assert [c[0] for c in batched.calls].count("create") == 1


def test_a_rerun_writes_nothing_and_a_new_task_is_predicted(engine, schema, images):
    ls = project_with(images[:3])
    run(ls, engine(), schema)
    again, _ = run(ls, engine(), schema)
    assert (again.predicted, again.skipped, again.written) == (0, 3, 0)
    ls.add_task(200, images[3])
    more, _ = run(ls, engine(), schema)
    assert (more.predicted, more.skipped) == (1, 3)
    assert all(len(ls.of_version(t, VERSION)) == 1 for t in ls.tasks_by_id)


def test_a_task_whose_image_is_gone_is_retried_then_reported_and_nothing_is_written(engine, schema, images):
    ls = project_with(images[:3], missing=1)
    summary, sleeps = run(ls, engine(), schema, retries=2, backoff_s=1.5)
    assert summary.predicted == 2 and list(summary.failed) == [101]
    assert "image" in summary.failed[101] and "404" in summary.failed[101]
    assert sleeps == [1.5, 3.0]  # two retries, the backoff doubling
    assert ls.of_version(101, VERSION) == []


def test_empty_predictions_of_this_version_are_replaced_not_kept(engine, schema, images):
    ls = FakeLabelStudio()
    ls.add_task(1, images[0], predictions=[{"model_version": VERSION, "result": []}])
    ls.add_task(2, images[1], predictions=[{"model_version": VERSION, "result": []},
                                           {"model_version": VERSION, "result": [{"type": "brushlabels"}]}])  # fmt: skip
    ls.add_task(3, images[2], predictions=[{"model_version": "older-version", "result": []}])
    summary, _ = run(ls, engine(), schema)
    assert (summary.predicted, summary.skipped, summary.deleted_empty) == (2, 1, 2)
    for task_id in (1, 2, 3):
        [only] = ls.of_version(task_id, VERSION)
        assert only["result"]
    assert ls.of_version(3, "older-version") != []  # other versions are not ours to touch


def test_a_crash_loses_at_most_one_chunk_and_the_rerun_has_no_duplicate(engine, schema, images):
    ls = project_with(images)
    sink = _CrashAfter(ls, creates=1)
    with pytest.raises(RuntimeError, match="crashed"):
        prelabel(ls.tasks(7), predictor=engine(batch_tasks=2), schema=schema, project=7, model_version=VERSION,
                 sink=sink, chunk_tasks=2, sleep=lambda s: None)  # fmt: skip
    written = [t for t in ls.tasks_by_id if ls.of_version(t, VERSION)]
    assert len(written) == 2  # the first chunk landed, the crash lost the second
    summary, _ = run(ls, engine(), schema)
    assert (summary.predicted, summary.skipped) == (3, 2)
    assert all(len(ls.of_version(t, VERSION)) == 1 for t in ls.tasks_by_id)


def test_no_regions_is_reported_once_without_retries(engine, schema, images, tiny_models, monkeypatch):
    ls = project_with(images[:2])
    monkeypatch.setattr(tiny_models.everything, "generate", lambda rgb: [])
    summary, sleeps = run(ls, engine(), schema)
    assert summary.predicted == 0 and set(summary.failed) == {100, 101} and sleeps == []
    assert all("no regions found" in reason for reason in summary.failed.values())
    assert not any(c[0] == "create" for c in ls.calls)


class _CrashAfter:
    """A sink whose process dies after ``creates`` bulk writes."""

    def __init__(self, ls: FakeLabelStudio, *, creates: int) -> None:
        self.ls, self.left = ls, creates

    def create_predictions(self, project, items):
        if self.left == 0:
            raise RuntimeError("crashed")
        self.left -= 1
        return self.ls.create_predictions(project, items)

    def delete_prediction(self, prediction_id):
        self.ls.delete_prediction(prediction_id)

    def tasks(self, project, **kwargs):
        return self.ls.tasks(project, **kwargs)
