"""OSPREY_AUTO_PRELABEL: Label Studio's TASKS_CREATED webhook (as 1.23 sends it to the ML backend's
webhook) is stored and answered at once, then queues a pre-label job for exactly those tasks; the sweep
finds tasks whose webhook was lost; re-imports and sweeps never write a second prediction."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from http_app import served
from lsapi_fake import FakeLabelStudio
from lsfakes import API_KEY, scene_png

from backend.jobs.periodic import FULL_READ_S
from backend.labelstudio.api import LabelStudioAPIError
from backend.runtime.runtime import build_runtime
from backend.runtime.settings import Settings
from backend.service.app import create_app

CONFIG = (Path(__file__).resolve().parents[3] / "label_configs" / "captions_only.xml").read_text()
VERSION = "tiny+sam-tiny-untrained"


@pytest.fixture
def ls(file_store):
    fake = FakeLabelStudio(label_config=CONFIG)
    fake.images = [file_store.add(f"/data/upload/7/auto-{i}.png", scene_png(seed=70 + i)) for i in range(3)]
    return fake


@pytest.fixture
def runtime(tiny_models, file_store, tmp_path, ls):
    settings = Settings.from_env(
        {}, model_dir=tmp_path / "models", label_studio_url=file_store.url, label_studio_api_key=API_KEY,
        osprey_model="tiny", sam_model="tiny", max_caption_tokens=2, max_description_tokens=2,
        auto_prelabel=True, auto_prelabel_sweep_s=0, training=False,
    )  # fmt: skip
    built = build_runtime(settings, models=tiny_models, client=ls)
    built.projects.remember("7", CONFIG)
    yield built
    built.close()


def imported(ls, ids) -> dict:
    """Tasks added to the fake Label Studio, and the TASKS_CREATED body Label Studio sends for them."""
    tasks = [ls.add_task(i, ls.images[i % len(ls.images)]) for i in ids]
    return {"action": "TASKS_CREATED", "tasks": [{"id": t["id"], "data": t["data"]} for t in tasks],
            "project": {"id": 7, "label_config": CONFIG}}  # fmt: skip


def run_jobs(runtime) -> list[dict]:
    done = []
    while (job := runtime.workers["prelabel"].run_once()) is not None:
        finished = runtime.queue.job(job.job_id)
        assert finished.status == "done", finished.error
        done.append(finished.result)
    return done


def one_each(ls) -> bool:
    return all(len([p for p in ls.of_version(t, VERSION) if p["result"]]) == 1 for t in ls.tasks_by_id)


def test_an_import_queues_exactly_its_tasks_and_a_second_import_adds_its_own(runtime, ls):
    with served(create_app(runtime)) as url:
        answer = requests.post(f"{url}/webhook", json=imported(ls, range(1, 5)), timeout=1)
        assert answer.status_code == 201 and answer.json()["status"] == "received"  # stored, parsed after
        assert runtime.intake.drain(timeout_s=30)
        outcome = runtime.intake.outcome(answer.json()["inbox_id"])
        assert outcome["status"] == "queued" and outcome["tasks"] == 4
        assert runtime.metrics()["prelabel"]["auto"]["waiting_tasks"] == {"7": 4}
        [result] = run_jobs(runtime)
        assert (result["predicted"], result["failed"]) == (4, 0) and one_each(ls)

        again = requests.post(f"{url}/webhook", json=imported(ls, range(5, 7)), timeout=1)
        assert runtime.intake.drain(timeout_s=30)
        assert runtime.intake.outcome(again.json()["inbox_id"])["tasks"] == 2
        [result] = run_jobs(runtime)
        assert result["predicted"] == 2 and one_each(ls) and len(ls.tasks_by_id) == 6


def test_a_repeated_webhook_and_the_sweep_never_write_a_second_prediction(runtime, ls):
    body = imported(ls, range(1, 4))
    runtime.intake.receive("TASKS_CREATED", body)
    runtime.intake.receive("TASKS_CREATED", body)  # the same import twice: its tasks are queued once
    assert runtime.intake.drain(timeout_s=30)
    assert sum(r["predicted"] for r in run_jobs(runtime)) == 3
    ls.add_task(9, ls.images[0])  # imported while its webhook was lost
    found = runtime.auto_prelabel.sweep()
    assert found["7"]["tasks"] == 1
    assert [r["predicted"] for r in run_jobs(runtime)] == [1]
    assert runtime.auto_prelabel.sweep()["7"]["tasks"] == 0  # nothing left to do
    runtime.intake.receive("TASKS_CREATED", body)  # a late duplicate webhook: its job writes nothing
    assert runtime.intake.drain(timeout_s=30)
    assert [(r["predicted"], r["skipped"]) for r in run_jobs(runtime)] == [(0, 3)]
    assert one_each(ls)


def test_the_sweep_reads_a_project_whole_once_then_only_its_new_tasks(runtime, ls):
    """A million-task project must not be read whole every few minutes: after one whole read the sweep
    asks Label Studio only for the tasks above the highest id it has seen; a whole read comes back every
    FULL_READ_S for what the id order cannot show (an import committed after a later one)."""
    clock = [0.0]
    runtime.auto_prelabel.clock = lambda: clock[0]
    sweep = runtime.auto_prelabel.sweep
    imported(ls, range(1, 5))  # four tasks whose webhooks were lost
    first = sweep()["7"]
    assert (first["tasks"], first["read"], first["listed"]) == (4, "all", 4)
    assert sum(r["predicted"] for r in run_jobs(runtime)) == 4

    ls.add_task(9, ls.images[0])  # another lost webhook
    read = ls.tasks_read
    second = sweep()["7"]
    assert (second["tasks"], second["read"], second["listed"]) == (1, "ids above 4", 1)
    assert ls.tasks_read - read == 1  # not the four done ones again
    assert [r["predicted"] for r in run_jobs(runtime)] == [1]
    assert (sweep()["7"]["tasks"], sweep()["7"]["read"]) == (0, "ids above 9")

    ls.add_task(6, ls.images[1])  # its id came before 9's, its commit after the sweep read 9
    assert sweep()["7"]["listed"] == 0
    clock[0] += FULL_READ_S
    whole = sweep()["7"]
    assert (whole["tasks"], whole["read"], whole["listed"]) == (1, "all", 6)
    assert [r["predicted"] for r in run_jobs(runtime)] == [1]
    assert sweep()["7"]["read"] == "ids above 9" and one_each(ls)


def test_a_new_version_or_a_sweep_that_queued_nothing_reads_the_project_whole_again(runtime, ls, monkeypatch):
    imported(ls, range(1, 4))
    sweep = runtime.auto_prelabel.sweep
    monkeypatch.setattr(runtime.projects, "label_config", lambda project: None)  # not known yet
    assert sweep()["7"]["status"] == "ignored"
    monkeypatch.undo()
    again = sweep()["7"]  # the tasks it could not queue are looked at again
    assert (again["tasks"], again["read"]) == (3, "all")
    run_jobs(runtime)
    assert sweep()["7"]["read"] == "ids above 3"
    monkeypatch.setattr(runtime.projects, "version", lambda project: VERSION + "@head-2")  # a promotion
    promoted = sweep()["7"]
    assert (promoted["tasks"], promoted["read"], promoted["listed"]) == (3, "all", 3)


def test_a_project_deleted_in_label_studio_costs_the_others_no_sweep(runtime, ls, monkeypatch, caplog):
    """Projects stay known after Label Studio deletes them: one that answers 404 must not stop the sweep
    before the projects after it (it did: the first error ended the whole sweep, every time), and is
    looked at again only after FULL_READ_S; any other failure is tried again at the next sweep."""
    clock = [0.0]
    runtime.auto_prelabel.clock = lambda: clock[0]
    runtime.projects.remember("3", CONFIG)  # sorted before 7
    listed, failure = (
        [],
        LabelStudioAPIError("Label Studio list tasks of project 3 failed: HTTP 404", kind="not_found"),
    )
    tasks = ls.tasks

    def tasks_of(project, **kwargs):
        listed.append(project)
        if project == 3:
            raise failure
        return tasks(project, **kwargs)

    monkeypatch.setattr(ls, "tasks", tasks_of)
    imported(ls, range(1, 4))
    found = runtime.auto_prelabel.sweep()
    assert found["3"]["status"] == "gone" and found["7"]["tasks"] == 3 and listed == [3, 7]
    assert runtime.auto_prelabel.sweep()["3"] == {"status": "gone"} and listed[2:] == [7]
    clock[0] += FULL_READ_S
    failure.kind = "upstream"  # Label Studio failing for a moment: tried again next time
    assert runtime.auto_prelabel.sweep()["3"]["status"] == "failed" and listed[3:] == [3, 7]
    assert runtime.auto_prelabel.sweep()["3"]["status"] == "failed" and listed[5:] == [3, 7]
    assert runtime.metrics()["prelabel"]["auto"]["last_sweep"]["projects"]["3"]["error"].endswith("HTTP 404")
    failure = TypeError("a bug of ours")  # not Label Studio's answer: logged with its traceback and an id
    with caplog.at_level("ERROR"):
        assert runtime.auto_prelabel.sweep()["3"]["status"] == "failed"
    assert any("internal error" in r.getMessage() and r.exc_info for r in caplog.records)


def test_tasks_in_any_queued_job_are_not_queued_again_however_many_jobs_there_are(runtime):
    """A new model version of a 200,000-task project queues 201 jobs; a webhook or sweep after that
    finds every one of those tasks waiting, not only those of the newest jobs."""
    ids = list(range(1, 201_001))
    first = runtime.auto_prelabel.queue("7", ids, reason="found by the sweep")
    assert first["tasks"] == 201_000 and len(first["jobs"]) == 201
    again = runtime.auto_prelabel.queue("7", [*ids, 201_001], reason="imported")
    assert (again["tasks"], again["already_queued"], len(again["jobs"])) == (1, 201_000, 1)
    assert runtime.metrics()["prelabel"]["auto"]["waiting_tasks"] == {"7": 201_001}


def test_a_job_counts_its_tasks_deleted_before_it_ran_as_gone(runtime, ls):
    runtime.auto_prelabel.tasks_created(imported(ls, range(1, 4)))
    del ls.tasks_by_id[2]  # deleted in Label Studio while the job waited
    [result] = run_jobs(runtime)
    assert (result["predicted"], result["gone"], result["failed"]) == (2, 1, 0)


def test_a_job_whose_project_was_deleted_meanwhile_ends_without_a_traceback(runtime, ls, monkeypatch, caplog):
    runtime.auto_prelabel.tasks_created(imported(ls, range(1, 4)))
    gone = LabelStudioAPIError("Label Studio list tasks of project 7 failed: HTTP 404", kind="not_found")
    monkeypatch.setattr(ls, "tasks", lambda project, **kwargs: (_ for _ in ()).throw(gone))
    with caplog.at_level("WARNING"):
        [result] = run_jobs(runtime)
    assert (result["status"], result["gone"], result["predicted"]) == ("project gone", 3, 0)
    assert "Traceback" not in caplog.text and "the project is gone from Label Studio" in caplog.text


def test_annotated_tasks_are_left_alone_by_the_sweep_and_by_a_queued_job(runtime, ls, monkeypatch):
    """Automatic pre-labelling is for tasks still to label: a task submitted or skipped by then is not
    queued by the sweep, and a job queued before its annotation leaves it (nobody asked for it)."""
    body = imported(ls, range(1, 5))
    ls.tasks_by_id[2]["annotations"] = [
        {"id": 900, "result": [], "was_cancelled": False}
    ]  # imported annotated
    outcome = runtime.auto_prelabel.tasks_created(body)
    assert outcome["tasks"] == 4  # the webhook carries ids only: the job reads the tasks when it runs
    ls.tasks_by_id[3]["annotations"] = [{"id": 901, "result": [], "was_cancelled": True}]  # skipped meanwhile
    [result] = run_jobs(runtime)
    assert (result["predicted"], result["annotated_left"]) == (2, 2)
    assert [t for t in ls.tasks_by_id if ls.of_version(t, VERSION)] == [1, 4]

    monkeypatch.setattr(runtime.projects, "version", lambda project: VERSION + "@head-2")  # a promotion
    promoted = runtime.auto_prelabel.sweep()["7"]
    assert (promoted["tasks"], promoted["listed"]) == (2, 2)  # 1 and 4 again; 2 and 3 not even read


def runtime_for(tiny_models, file_store, model_dir, ls, **settings):
    settings = Settings.from_env(
        {}, model_dir=model_dir, label_studio_url=file_store.url, label_studio_api_key=API_KEY,
        osprey_model="tiny", sam_model="tiny", max_caption_tokens=2, max_description_tokens=2,
        auto_prelabel_sweep_s=0, training=False, **settings,
    )  # fmt: skip
    return build_runtime(settings, models=tiny_models, client=ls)


def handled(runtime, body: dict) -> dict:
    """What the intake thread made of one TASKS_CREATED webhook."""
    received = runtime.intake.receive("TASKS_CREATED", body)
    assert runtime.intake.drain(timeout_s=30)
    return runtime.intake.outcome(received["inbox_id"])


def test_without_the_setting_tasks_created_is_ignored(tiny_models, file_store, tmp_path, ls):
    with runtime_for(tiny_models, file_store, tmp_path / "m", ls) as built:
        built.projects.remember("7", CONFIG)
        outcome = handled(built, imported(ls, [1]))
        assert (outcome["status"], outcome["reason"]) == (
            "ignored",
            "automatic pre-labelling is off for project 7",
        )
        assert built.metrics()["prelabel"]["auto"]["projects"] == {"7": False}
        assert built.auto_prelabel.sweep() == {}  # nor does the sweep look at the project


def setup(url: str, project: int, extra_params) -> requests.Response:
    """Label Studio's /setup as 1.23 sends it, with the ML backend connection's extra params."""
    body = {"project": f"{project}.1700000000", "schema": CONFIG, "hostname": "http://127.0.0.1:8080",
            "access_token": "x", "extra_params": extra_params}  # fmt: skip
    return requests.post(f"{url}/setup", json=body, timeout=3)


def test_a_projects_extra_params_turn_auto_prelabel_on_for_it_alone_and_survive_a_restart(
    tiny_models, file_store, tmp_path, ls
):
    with runtime_for(tiny_models, file_store, tmp_path / "m", ls) as built:  # OSPREY_AUTO_PRELABEL off
        with served(create_app(built)) as url:
            assert setup(url, 7, {"auto_prelabel": True}).status_code == 200
            assert setup(url, 8, None).status_code == 200  # connected without extra params
        assert handled(built, imported(ls, [1, 2]))["tasks"] == 2
        other = {**imported(ls, [3]), "project": {"id": 8, "label_config": CONFIG}}
        assert handled(built, other)["status"] == "ignored"
        assert built.metrics()["prelabel"]["auto"]["projects"] == {"7": True, "8": False}
    with runtime_for(tiny_models, file_store, tmp_path / "m", ls) as again:  # the same store, restarted
        assert again.auto_prelabel.enabled("7") and not again.auto_prelabel.enabled("8")
        assert [r["predicted"] for r in run_jobs(again)] == [2]  # the job queued before the restart


def test_a_project_can_turn_it_off_and_bad_extra_params_are_refused_by_name(
    tiny_models, file_store, tmp_path, ls
):
    with runtime_for(tiny_models, file_store, tmp_path / "m", ls, auto_prelabel=True) as built:
        with served(create_app(built)) as url:
            assert setup(url, 7, '{"auto_prelabel": "off"}').status_code == 200  # JSON text, as typed in
            assert handled(built, imported(ls, [1]))["status"] == "ignored"
            refused = setup(url, 7, {"auto_prelabel": "sometimes"})
            assert refused.status_code == 422 and "'auto_prelabel' must be true or false" in refused.text
            assert setup(url, 7, "[1, 2]").status_code == 422
            assert not built.auto_prelabel.enabled("7")  # a refused /setup changed nothing
            assert (
                setup(url, 7, {"other_tool": 1}).status_code == 200
            )  # the choice removed: the default again
            assert built.auto_prelabel.enabled("7")
