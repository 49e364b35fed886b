"""``osprey-label prelabel`` on the tiny models against an in-memory Label Studio API: writes, resumes,
selects tasks, dry-runs and reports failures (real Label Studio: tests/e2e; on Ray: tests/backend/prelabel)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lsapi_fake import FakeLabelStudio
from lsfakes import API_KEY, scene_png

from backend.cli import build_parser
from backend.cli import prelabel as prelabel_cli
from backend.errors import InputError

CONFIG = (Path(__file__).resolve().parents[3] / "label_configs" / "captions_only.xml").read_text()
VERSION = "tiny+sam-tiny-untrained"


@pytest.fixture
def env(monkeypatch, tmp_path, file_store):
    for key, value in {
        "LABEL_STUDIO_URL": file_store.url, "LABEL_STUDIO_API_KEY": API_KEY, "MODEL_DIR": str(tmp_path),
        "OSPREY_MODEL": "tiny", "SAM_MODEL": "tiny", "OSPREY_MAX_CAPTION_TOKENS": "3",
        "OSPREY_MAX_DESCRIPTION_TOKENS": "3", "OSPREY_POINTS_PER_SIDE": "4", "OSPREY_MAX_MASKS": "2",
        "OSPREY_PRED_IOU_THRESH": "0", "OSPREY_STABILITY_SCORE_THRESH": "0", "OSPREY_MIN_MASK_AREA": "0",
    }.items():  # fmt: skip
        monkeypatch.setenv(key, value)


@pytest.fixture
def project(file_store):
    ls = FakeLabelStudio(label_config=CONFIG)
    for i in range(6):
        ls.add_task(300 + i, file_store.add(f"/data/upload/7/cli-{i}.png", scene_png(seed=40 + i)))
    return ls


def run(argv, ls, tiny_models):
    args = build_parser().parse_args(["prelabel", "--quiet", *argv])
    return prelabel_cli.run_prelabel(args, client=ls, models=tiny_models)


def test_prelabel_writes_every_task_once_and_a_rerun_resumes(env, project, tiny_models, capsys):
    assert run(["--project", "7"], project, tiny_models) == 0
    out = capsys.readouterr().out
    assert "predicted" in out and "       6" in out and "tasks/min" in out
    assert all(len(project.of_version(t, VERSION)) == 1 for t in project.tasks_by_id)
    project.add_task(400, project.tasks_by_id[300]["data"]["image"])
    assert run(["--project", "7"], project, tiny_models) == 0
    out = capsys.readouterr().out
    assert "skipped (already done)         6" in out and "predicted                      1" in out
    assert all(len(project.of_version(t, VERSION)) == 1 for t in project.tasks_by_id)


def test_selected_tasks_and_limit(env, project, tiny_models):
    assert run(["--project", "7", "--tasks", "301,303-304,999", "--limit", "2"], project, tiny_models) == 0
    assert [t for t in project.tasks_by_id if project.of_version(t, VERSION)] == [301, 303]


def test_a_task_named_twice_is_predicted_once(env, project, tiny_models, capsys):
    assert run(["--project", "7", "--tasks", "300,300-301,300"], project, tiny_models) == 0
    assert "predicted                      2" in capsys.readouterr().out
    assert [t for t in project.tasks_by_id if project.of_version(t, VERSION)] == [300, 301]


def test_ids_not_in_the_project_fail_and_the_others_are_pre_labelled(env, project, tiny_models, capsys):
    del project.tasks_by_id[302]  # a range over a deleted task, and a typo
    assert run(["--project", "7", "--tasks", "300-303,3050"], project, tiny_models) == 1
    assert [t for t in project.tasks_by_id if project.of_version(t, VERSION)] == [300, 301, 303]
    out = capsys.readouterr().out
    assert "predicted                      3" in out and "failed                         2" in out
    assert "failed: not in Label Studio project 7 (deleted, or never there): tasks 302, 3050" in out


def test_dry_run_writes_nothing_and_estimates(env, project, tiny_models, capsys):
    assert run(["--project", "7", "--dry-run", "2"], project, tiny_models) == 0
    out = capsys.readouterr().out
    assert "dry run: 2 tasks predicted" in out and "6 tasks to do: about" in out
    assert not any(call[0] == "create" for call in project.calls)


def test_failures_are_reported_with_reasons_and_the_exit_status_says_so(env, project, tiny_models, capsys):
    project.tasks_by_id[302]["data"]["image"] = "/data/upload/7/deleted.png"
    assert run(["--project", "7", "--retries", "0"], project, tiny_models) == 1
    out = capsys.readouterr().out
    assert "failed                         1" in out and "404" in out and "tasks 302" in out
    assert project.of_version(302, VERSION) == []


@pytest.mark.parametrize(
    "argv",
    [["--tasks", "9-3"], ["--limit", "0"], ["--limit", "-3"], ["--dry-run", "0"], ["--view", "-1"],
     ["--project", "0"]],
)  # fmt: skip
def test_bad_arguments_are_refused_before_label_studio_is_asked(argv, capsys):
    """argparse's one line and exit status 2 (a negative --limit used to reach islice: an internal error)."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["prelabel", "--project", "7", *argv])
    assert exited.value.code == 2 and f"argument {argv[0]}" in capsys.readouterr().err


def test_out_writes_importable_tasks_instead_of_calling_the_api_and_resumes(
    env, project, tiny_models, tmp_path
):
    out = tmp_path / "export" / "predictions.jsonl"
    assert run(["--project", "7", "--out", str(out), "--limit", "4"], project, tiny_models) == 0
    assert not any(call[0] in ("create", "delete") for call in project.calls)  # Label Studio untouched
    lines = out.read_text().splitlines()
    assert len(lines) == 4
    for line, task_id in zip(lines, (300, 301, 302, 303), strict=True):
        task = json.loads(line)
        assert set(task) == {"data", "predictions", "meta"}  # what Label Studio's import reads
        assert task["data"] == project.tasks_by_id[task_id]["data"]
        assert task["meta"] == {"osprey_source": {"project": 7, "task": task_id}}
        [prediction] = task["predictions"]
        assert prediction["model_version"] == VERSION and isinstance(prediction["score"], float)
        assert prediction["result"] and all(
            {"from_name", "to_name", "type", "value"} <= set(item) for item in prediction["result"]
        )
    with out.open("a") as handle:
        handle.write('{"data": {"image": "/data/upl')  # a run cut off mid-line
    assert run(["--project", "7", "--out", str(out)], project, tiny_models) == 0
    tasks = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(t["meta"]["osprey_source"]["task"] for t in tasks) == sorted(project.tasks_by_id)


def test_out_refuses_a_file_it_did_not_write(env, project, tiny_models, tmp_path):
    out = tmp_path / "predictions.jsonl"
    out.write_text('{"something": "else"}\n')
    with pytest.raises(InputError, match="line 1 is not a task written by osprey-label prelabel --out"):
        run(["--project", "7", "--out", str(out)], project, tiny_models)


def test_serial_and_pipelined_write_the_same_predictions(env, file_store, tiny_models):
    written = {}
    for engine in ("--serial", None):
        ls = FakeLabelStudio(label_config=CONFIG)
        for i in range(5):
            ls.add_task(300 + i, file_store.add(f"/data/upload/7/same-{i}.png", scene_png(seed=60 + i)))
        assert run(["--project", "7", *([engine] if engine else [])], ls, tiny_models) == 0
        written[engine] = {t: [strip(p["result"]) for p in ls.of_version(t, VERSION)] for t in ls.tasks_by_id}
    assert written["--serial"] == written[None] and all(len(r) == 1 for r in written[None].values())


def strip(result: list[dict]) -> list[dict]:
    """A result without its random region ids, scores to 4 places."""
    return [
        {**{k: v for k, v in item.items() if k != "id"}, "score": round(item.get("score") or 0, 4)}
        for item in result
    ]


def test_unannotated_pre_labels_only_the_tasks_still_to_label(env, project, tiny_models):
    project.tasks_by_id[301]["annotations"] = [{"id": 1, "result": [], "was_cancelled": False}]
    project.tasks_by_id[304]["annotations"] = [{"id": 2, "result": [], "was_cancelled": True}]  # skipped
    assert run(["--project", "7", "--unannotated", "--tasks", "300-301"], project, tiny_models) == 0
    assert [t for t in project.tasks_by_id if project.of_version(t, VERSION)] == [300]
    assert run(["--project", "7", "--unannotated"], project, tiny_models) == 0
    assert [t for t in project.tasks_by_id if project.of_version(t, VERSION)] == [300, 302, 303, 305]


def test_a_view_s_tasks_deleted_before_they_are_read_are_counted_as_deleted(
    env, project, tiny_models, capsys
):
    project.views[5] = [305, 301, 299, 303]  # 299 was in the tab when it was listed, deleted since
    assert run(["--project", "7", "--view", "5"], project, tiny_models) == 0
    assert [t for t in project.tasks_by_id if project.of_version(t, VERSION)] == [301, 303, 305]
    out = capsys.readouterr().out
    assert "predicted                      3" in out and "deleted meanwhile              1" in out
