"""Bulk pre-labelling against a Label Studio that fails on purpose: resets, a run of 503s, writes whose
answer is lost after Label Studio stored them, tokens that expire by Label Studio's clock. Every task
ends with exactly one prediction of the version, and the command says what went wrong in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from lsapi_server import LEGACY_KEY, FaultyLabelStudio

from backend.cli import main
from backend.labelstudio.api import LabelStudioAPIError, LabelStudioClient
from backend.labelstudio.auth import LabelStudioAuth
from backend.labelstudio.schema import parse_label_config
from backend.predict.tasks import TaskResult, task_id
from backend.prelabel.engine import format_summary, prelabel

CONFIG = (Path(__file__).resolve().parents[3] / "label_configs" / "captions_only.xml").read_text()
VERSION = "v-test"


class FixedPredictor:
    """Predicts every task instantly with one fixed region (the model is not what these tests are about)."""

    batch_tasks = 4

    def predict(self, tasks, schema, head=None):
        item = {"id": "r1", "type": "textarea", "from_name": "caption", "to_name": "image",
                "value": {"text": ["a region"]}}  # fmt: skip
        return [TaskResult(task_id(t), "predicted", result=[item], score=0.5, regions=1) for t in tasks]


def run(ls: FaultyLabelStudio, client: LabelStudioClient | None = None, predictor=None, **kwargs):
    client = client or LabelStudioClient(url=ls.url, api_key=LEGACY_KEY)
    return prelabel(
        client.tasks(7), predictor=predictor or FixedPredictor(), schema=parse_label_config(CONFIG), project=7,
        model_version=VERSION, sink=client, chunk_tasks=8, sleep=lambda s: None, **kwargs,
    )  # fmt: skip


def one_each(ls: FaultyLabelStudio) -> bool:
    return all(len(ls.predictions_of(t, VERSION)) == 1 for t in ls.state.tasks)


def test_a_reset_on_the_third_write_loses_no_task(ls):
    ls.fail(
        "POST", r"/import/predictions$", "reset"
    )  # the first write is cut before Label Studio reads it...
    ls.fail("POST", r"/import/predictions$", "reset")  # ...and so is the second attempt
    summary = run(ls)
    assert (summary.predicted, len(summary.failed)) == (40, 0) and one_each(ls)


def test_label_studio_answering_503_for_8_s_loses_no_task(ls):
    ls.fail_everything_for(8.0)
    summary = run(ls)
    assert summary.predicted == 40 and one_each(ls)


def test_writes_stored_but_unanswered_are_read_back_not_sent_twice(ls):
    ls.fail("POST", r"/import/predictions$", "commit_then_status", status=502)
    ls.fail("POST", r"/import/predictions$", "commit_then_reset", times=2)
    summary = run(ls)
    assert summary.predicted == 40 and one_each(ls)
    assert summary.written == 40
    again = run(ls)  # a rerun writes nothing
    assert (again.predicted, again.skipped) == (0, 40) and one_each(ls)


def test_tokens_expiring_by_label_studios_clock_lose_no_task(ls):
    ls.access_lifetime_s, ls.clock_offset_s = 4.0, 2.0  # 4 s tokens, Label Studio's clock 2 s ahead
    auth = LabelStudioAuth(base_url=ls.url, api_key=ls.personal_access_token())
    client = LabelStudioClient(url=ls.url, auth=auth)
    for i in range(40, 80):
        ls.add_task(7, 100 + i, {"image": f"/data/upload/7/{i}.png"})
    slow = FixedPredictor()
    predict = slow.predict

    def predict_slowly(tasks, schema, head=None):
        import time

        time.sleep(0.1 * len(tasks))  # the run outlives several tokens
        return predict(tasks, schema, head)

    slow.predict = predict_slowly
    summary = prelabel(
        client.tasks(7), predictor=slow, schema=parse_label_config(CONFIG), project=7, model_version=VERSION,
        sink=client, chunk_tasks=8, sleep=lambda s: None,
    )  # fmt: skip
    assert summary.predicted == 80 and one_each(ls) and ls.refreshes >= 2


@pytest.mark.parametrize("pipeline", [True, False])
def test_tasks_deleted_while_they_are_predicted_cost_no_other_task_its_prediction(ls, pipeline):
    """Label Studio 1.23 refuses a whole prediction import when one of its tasks is gone: a data team
    deleting bad images during a bulk run must not stop it, nor fail the tasks written beside them."""
    deleting = FixedPredictor()
    predict = deleting.predict

    def predict_then_delete(tasks, schema, head=None):
        with ls._lock:
            for task in tasks:
                if task["id"] in (105, 131):
                    del ls.state.tasks[task["id"]]
        return predict(tasks, schema, head)

    deleting.predict = predict_then_delete
    client = LabelStudioClient(url=ls.url, api_key=LEGACY_KEY)
    summary = prelabel(
        client.tasks(7), predictor=deleting, schema=parse_label_config(CONFIG), project=7, model_version=VERSION,
        sink=client, chunk_tasks=8, sleep=lambda s: None, pipeline=pipeline,
    )  # fmt: skip
    assert (summary.predicted, summary.gone, summary.failed) == (38, 2, {})
    assert one_each(ls) and len(ls.state.tasks) == 38
    assert "deleted meanwhile              2" in format_summary(summary.to_dict(), version=VERSION)


def test_a_proxy_refusing_large_writes_fails_only_the_task_too_large_to_write(ls):
    """A proxy in front of Label Studio (nginx's client_max_body_size) answers 413 to a chunk over its
    limit: the chunk goes in halves, and only a prediction too large on its own fails, saying what to raise."""
    ls.max_body_bytes = 800  # about three of these predictions
    large = FixedPredictor()
    predict = large.predict

    def predict_one_large(tasks, schema, head=None):
        results = predict(tasks, schema, head)
        for result in results:
            if result.task_id == 110:
                result.result = [{**result.result[0], "value": {"text": ["a region " * 200]}}]
        return results

    large.predict = predict_one_large
    summary = run(ls, predictor=large)
    assert summary.predicted == 39 and list(summary.failed) == [110]
    assert "HTTP 413" in summary.failed[110] and "client_max_body_size" in summary.failed[110]
    assert all(len(ls.predictions_of(t, VERSION)) == (t != 110) for t in ls.state.tasks)


def test_a_label_studio_refusing_every_prediction_stops_the_run_at_the_first_chunk(ls):
    """When no task of a chunk can be written on its own, the writes are refused, not the tasks: the
    run stops with Label Studio's reason instead of trying every task of the project one by one."""
    ls.fail("POST", r"/import/predictions$", "status", status=400, times=1000)
    with pytest.raises(LabelStudioAPIError, match="HTTP 400"):
        run(ls)
    writes = [call for call in ls.calls if call == ("POST", "/api/projects/7/import/predictions")]
    assert len(writes) == 15  # the first chunk of 8, then its halves down to single tasks
    assert not any(ls.predictions_of(t) for t in ls.state.tasks)


def command(ls: FaultyLabelStudio, monkeypatch, tmp_path, *argv: str, key: str = LEGACY_KEY) -> int:
    for name, value in {
        "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": key, "MODEL_DIR": str(tmp_path), "OSPREY_MODEL": "tiny",
        "SAM_MODEL": "tiny", "OSPREY_DEVICE": "cpu", "OSPREY_MAX_CAPTION_TOKENS": "2",
        "OSPREY_MAX_DESCRIPTION_TOKENS": "2", "OSPREY_POINTS_PER_SIDE": "4", "OSPREY_MAX_MASKS": "1",
        "OSPREY_PRED_IOU_THRESH": "0", "OSPREY_STABILITY_SCORE_THRESH": "0", "OSPREY_MIN_MASK_AREA": "0",
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    return main(["prelabel", "--quiet", *argv])


def test_the_command_rides_out_faults_on_the_real_models(ls, monkeypatch, tmp_path, capsys):
    for task in list(ls.state.tasks)[8:]:
        del ls.state.tasks[task]  # 8 tasks: the tiny models take a second or two each on a CPU
    ls.fail("GET", r"^/api/tasks/$", "reset")
    ls.fail("GET", r"^/data/upload/", "status", status=503, times=3)
    ls.fail("POST", r"/import/predictions$", "commit_then_reset")
    assert command(ls, monkeypatch, tmp_path, "--project", "7", "--chunk-tasks", "3") == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    version = "tiny+sam-tiny-untrained"
    assert all(len(ls.predictions_of(t, version)) == 1 for t in ls.state.tasks)


def test_task_ids_not_in_the_project_are_reported_and_the_others_pre_labelled(
    ls, monkeypatch, tmp_path, capsys
):
    """A range of --tasks over a deleted task, or a mistyped id: the others are pre-labelled and the
    missing ones fail with the reason (exit status 1); with --limit, ids past the limit are not read."""
    del ls.state.tasks[102]
    assert (
        command(ls, monkeypatch, tmp_path, "--project", "7", "--tasks", "100-101,102,150", "--limit", "2")
        == 0
    )
    assert "failed                         0" in capsys.readouterr().out
    assert command(ls, monkeypatch, tmp_path, "--project", "7", "--tasks", "100-103,150") == 1
    out = capsys.readouterr().out
    assert "predicted                      1" in out and "skipped (already done)         2" in out
    assert "failed: not in Label Studio project 7 (deleted, or never there): tasks 102, 150" in out
    version = "tiny+sam-tiny-untrained"
    assert [t for t in ls.state.tasks if ls.predictions_of(t, version)] == [100, 101, 103]


def test_a_view_the_project_does_not_have_is_one_line_and_exit_status_2(ls, monkeypatch, tmp_path, capsys):
    """--view with a tab of another project (Label Studio answers its listing with a 500) or no tab."""
    ls.add_project(8, CONFIG)
    ls.add_view(5, keep=lambda task: True, project=8)
    for view, expected in (
        ("5", "has no Data Manager tab 5 (it is a tab of project 8)"),
        ("6", "has no Data Manager tab 6;"),
    ):
        assert command(ls, monkeypatch, tmp_path, "--project", "7", "--view", view) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and f"Label Studio project 7 {expected}" in lines[0], lines
    assert not any(task["predictions"] for task in ls.state.tasks.values())


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no such project", "has no project 99"),
        ("wrong legacy token", "LABEL_STUDIO_API_KEY is not accepted"),
        ("revoked personal access token", "refused LABEL_STUDIO_API_KEY"),
        ("expired personal access token", "expired on"),
        ("nothing listening", "check that Label Studio runs there"),
    ],
)
def test_what_the_user_must_fix_is_one_line_and_exit_status_2(
    ls, monkeypatch, tmp_path, capsys, case, expected
):
    project, key = "7", LEGACY_KEY
    if case == "no such project":
        project = "99"
    elif case == "wrong legacy token":
        key = "not-the-key"
    elif case == "revoked personal access token":
        key, ls.revoked = ls.personal_access_token(), True
    elif case == "expired personal access token":
        from lsapi_server import jwt

        key = jwt({"token_type": "refresh", "exp": int(ls.now()) - 3600, "iat": int(ls.now()) - 7200})
    elif case == "nothing listening":
        ls.close()
        monkeypatch.setattr(ls, "url", "http://127.0.0.1:9")
    assert command(ls, monkeypatch, tmp_path, "--project", project, key=key) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in err, err
    assert key not in err
    assert command(ls, monkeypatch, tmp_path, "--project", project, key=key) == 2
    monkeypatch.setattr("sys.argv", ["osprey-label"])
    assert main(["--debug", "prelabel", "--quiet", "--project", project]) == 2
    assert "Traceback" in capsys.readouterr().err  # --debug shows where it came from
