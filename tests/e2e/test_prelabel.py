"""Pre-labelling a whole project against a real Label Studio whose ML_TIMEOUT_PREDICT is too short for
one Retrieve Predictions of it: nothing is lost to the deadline, nothing is written twice or empty, and
``osprey-label prelabel`` resumes, picks up new tasks, survives a kill and reports a missing image (on
Ray: test_prelabel_ray.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from labelstudio import (
    LabelStudioAPI,
    ensure_label_studio,
    personal_access_token,
    scene_png,
    skip_or_fail,
    start_label_studio,
)
from serving import ROOT, Process, free_port, start_backend, tiny_backend_env

pytestmark = pytest.mark.slow

CONFIG = ROOT / "label_configs" / "brush_full.xml"
TIMEOUT_PREDICT_S = 20  # Label Studio's deadline for one /predict call
BUDGET_S = 4  # the backend answers a batch within this, then defers the rest


@pytest.fixture(scope="module")
def short_deadline(tmp_path_factory):
    """Label Studio with a short ML_TIMEOUT_PREDICT and a backend pointed at it (tiny models)."""
    venv = Path(os.environ.get("OSPREY_LS_VENV", ROOT / ".ls-venv"))
    try:
        executable = ensure_label_studio(venv)
    except Exception as error:
        skip_or_fail(f"cannot install Label Studio into {venv}: {error}")
    port = free_port()
    ls = start_label_studio(
        executable, tmp_path_factory.mktemp("ls-short"), port, ML_TIMEOUT_PREDICT=str(TIMEOUT_PREDICT_S)
    )
    backend = None
    try:
        url = f"http://127.0.0.1:{port}"
        token = personal_access_token(url)
        env = tiny_backend_env(
            tmp_path_factory.mktemp("models-prelabel"), LABEL_STUDIO_URL=url, LABEL_STUDIO_API_KEY=token,
            OSPREY_MAX_CAPTION_TOKENS="4", OSPREY_MAX_DESCRIPTION_TOKENS="4", OSPREY_PREDICT_BUDGET_S=str(BUDGET_S),
            OSPREY_TRAIN_EVERY="0", OSPREY_LORA="false", OSPREY_PRELABEL_CHUNK_TASKS="4",
        )  # fmt: skip
        log = tmp_path_factory.mktemp("osprey-prelabel") / "serve.log"
        backend, backend_url = start_backend(env, log)
        yield {"url": url, "token": token, "api": LabelStudioAPI(url, token), "backend": backend_url, "env": env,
               "log": log, "tmp": tmp_path_factory.mktemp("cli")}  # fmt: skip
    finally:
        if backend is not None:
            backend.stop()
        ls.stop()


def by_task(api, project_id: int, version: str) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for prediction in api.predictions(project_id):
        out.setdefault(prediction["task"], []).append(prediction)
    return out


def wait_until_predicted(
    api, project_id: int, task_ids: list[int], version: str, timeout_s: float, log: Path
):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        stored = by_task(api, project_id, version)
        if all(
            any(p["model_version"] == version and p["result"] for p in stored.get(t, [])) for t in task_ids
        ):
            return stored
        time.sleep(2)
    raise AssertionError(f"not every task was predicted in {timeout_s} s:\n{log.read_text()[-3000:]}")


def exactly_one_each(stored: dict[int, list[dict]], task_ids: list[int], version: str) -> None:
    for task_id in task_ids:
        ours = [p for p in stored.get(task_id, []) if p["model_version"] == version]
        assert len(ours) == 1 and ours[0]["result"], (task_id, ours)
    assert not [p for ps in stored.values() for p in ps if not p["result"]], "an empty prediction was left"


def cli(env: dict, *args: str, log: Path) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "backend.service", "prelabel", "--quiet", *args]
    with open(log, "w") as out:
        done = subprocess.run(
            argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=out, text=True, timeout=1200
        )
    return done


def test_a_project_larger_than_one_deadline_is_pre_labelled_exactly_once(short_deadline):
    api, env, tmp = short_deadline["api"], short_deadline["env"], short_deadline["tmp"]
    project = api.create_project("prelabel 60", CONFIG.read_text())
    tasks = api.import_images(project["id"], {f"p{i}.png": scene_png(100 + i) for i in range(60)})
    ids = [t["id"] for t in tasks]
    ml = api.connect_backend(project["id"], short_deadline["backend"])
    version = ml["model_version"]

    # one Retrieve Predictions of all 60 tasks: answered within Label Studio's deadline
    started = time.time()
    answer = api.retrieve_predictions(project["id"])
    assert time.time() - started < TIMEOUT_PREDICT_S, "the batch outlived ML_TIMEOUT_PREDICT"
    assert answer["processed_items"] == 60, answer
    stored = wait_until_predicted(api, project["id"], ids, version, 900, short_deadline["log"])
    exactly_one_each(stored, ids, version)
    assert api.ml_backend(ml["id"])["state"] != "ER"
    metrics = requests.get(f"{short_deadline['backend']}/metrics", timeout=5).json()
    assert metrics["predictions"].get("tasks deferred", 0) > 0, metrics[
        "predictions"
    ]  # the deadline mattered

    # a second retrieve adds nothing
    api.retrieve_predictions(project["id"])
    time.sleep(3)
    exactly_one_each(by_task(api, project["id"], version), ids, version)

    # the command writes nothing new, then predicts only the tasks added later
    done = cli(env, "--project", str(project["id"]), log=tmp / "again.log")
    assert done.returncode == 0, (tmp / "again.log").read_text()[-2000:]
    assert (
        "skipped (already done)        60" in done.stdout
        and "predicted                      0" in done.stdout
    )
    added = [t["id"] for t in api.import_images(project["id"], {f"n{i}.png": scene_png(200 + i) for i in range(10)})
             if t["id"] not in ids]  # fmt: skip
    assert len(added) == 10
    done = cli(env, "--project", str(project["id"]), log=tmp / "new.log")
    assert "predicted                     10" in done.stdout, done.stdout
    ids += added
    exactly_one_each(by_task(api, project["id"], version), ids, version)

    # killed half-way and started again: every task once
    more = [t["id"] for t in api.import_images(project["id"], {f"k{i}.png": scene_png(300 + i) for i in range(16)})
            if t["id"] not in ids]  # fmt: skip
    argv = [sys.executable, "-m", "backend.service", "prelabel", "--quiet", "--project", str(project["id"]),
            "--batch-tasks", "2", "--chunk-tasks", "2"]  # fmt: skip
    running = Process(argv, env, tmp / "killed.log", cwd=ROOT)
    deadline = time.time() + 600
    while time.time() < deadline:
        stored = by_task(api, project["id"], version)  # once per look: it lists the whole project
        if sum(1 for t in more if stored.get(t)) >= 2:
            break
        time.sleep(0.5)
    running.stop()  # SIGTERM to the whole group, then SIGKILL
    stored = by_task(api, project["id"], version)
    partial = sum(1 for t in more if stored.get(t))
    assert 2 <= partial < len(more), partial
    done = cli(env, "--project", str(project["id"]), log=tmp / "resumed.log")
    assert done.returncode == 0, (tmp / "resumed.log").read_text()[-2000:]
    ids += more
    exactly_one_each(by_task(api, project["id"], version), ids, version)

    # a task whose image is gone is retried, reported and left without any prediction
    api.import_tasks(project["id"], [{"image": f"/data/upload/{project['id']}/gone.png"}])
    [gone] = [t["id"] for t in api.tasks(project["id"]) if t["id"] not in ids]
    done = cli(env, "--project", str(project["id"]), "--retries", "1", log=tmp / "gone.log")
    assert done.returncode == 1
    # (Label Studio 1.23 answers a missing upload with HTTP 500, not 404)
    assert "failed                         1" in done.stdout, done.stdout
    assert "gone.png" in done.stdout and f"tasks {gone}" in done.stdout, done.stdout
    assert gone not in by_task(api, project["id"], version)


def test_a_tab_of_tasks_without_predictions_is_pre_labelled_whole_while_tasks_are_deleted(short_deadline):
    """``prelabel --view`` of a Data Manager tab "no predictions yet", newest first: each chunk written
    takes its tasks out of the tab while the command reads it (read page after page, half the tasks were
    skipped), and tasks deleted during the run cost no other task."""
    api, env, tmp = short_deadline["api"], short_deadline["env"], short_deadline["tmp"]
    project = api.create_project("tab 24", CONFIG.read_text())
    ids = [
        t["id"]
        for t in api.import_images(project["id"], {f"v{i}.png": scene_png(700 + i) for i in range(24)})
    ]
    version = api.connect_backend(project["id"], short_deadline["backend"])["model_version"]
    tab = api.call("POST", "/api/dm/views/", expect=201, json={"project": project["id"], "data": {
        "filters": {"conjunction": "and", "items": [
            {"filter": "filter:tasks:total_predictions", "operator": "equal", "type": "Number", "value": 0}]},
        "ordering": ["-tasks:id"]}})  # fmt: skip
    argv = [sys.executable, "-m", "backend.service", "prelabel", "--quiet", "--project", str(project["id"]),
            "--view", str(tab["id"]), "--batch-tasks", "2", "--chunk-tasks", "2"]  # fmt: skip
    running = Process(argv, env, tmp / "tab.log", cwd=ROOT)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and len(by_task(api, project["id"], version)) < 4:
            time.sleep(0.5)
        for task_id in ids[:2]:  # newest first: these two come last
            api.call("DELETE", f"/api/tasks/{task_id}/", expect=204)
        assert running.popen.wait(timeout=900) == 0, running.tail()
    finally:
        running.stop()
    exactly_one_each(by_task(api, project["id"], version), ids[2:], version)
    assert "failed                         0" in running.tail(), running.tail()


def backend_for(short_deadline, model_dir: Path, log: Path, **settings: str):
    """Another backend against the same Label Studio, with its own ``MODEL_DIR`` and settings."""
    env = tiny_backend_env(
        model_dir, LABEL_STUDIO_URL=short_deadline["url"], LABEL_STUDIO_API_KEY=short_deadline["token"],
        OSPREY_MAX_CAPTION_TOKENS="4", OSPREY_MAX_DESCRIPTION_TOKENS="4", OSPREY_TRAIN_EVERY="0",
        OSPREY_LORA="false", OSPREY_PRELABEL_CHUNK_TASKS="4", **settings,
    )  # fmt: skip
    backend, url = start_backend(env, log)
    return backend, url, env


def test_a_retrieve_label_studio_gave_up_on_and_the_command_beside_its_job_write_each_task_once(
    short_deadline, tmp_path
):
    """The measured failure: a backend whose budget outlives Label Studio's deadline, Label Studio gives
    up, and the command runs while the deferred job does; then 10 more tasks and the command again."""
    api = short_deadline["api"]
    backend, backend_url, env = backend_for(
        short_deadline, tmp_path / "models", tmp_path / "serve.log",
        OSPREY_PREDICT_BUDGET_S=str(4 * TIMEOUT_PREDICT_S),
    )  # fmt: skip
    try:
        # enough tasks that the batch outlives Label Studio's deadline on a fast idle machine too
        # (~0.7 s a task with the tiny models: 30 could finish inside the 20 s, and nothing is abandoned)
        project = api.create_project("abandoned 60", CONFIG.read_text())
        pid = str(project["id"])
        ids = [
            t["id"]
            for t in api.import_images(project["id"], {f"a{i}.png": scene_png(500 + i) for i in range(60)})
        ]
        version = api.connect_backend(project["id"], backend_url)["model_version"]
        try:
            api.retrieve_predictions(project["id"])  # Label Studio gives up after TIMEOUT_PREDICT_S
        except Exception:
            pass
        deadline, abandoned = time.time() + 300, 0
        while time.time() < deadline and not abandoned:
            counts = requests.get(f"{backend_url}/metrics", timeout=5).json()["predictions"]
            abandoned = counts.get("batches abandoned by Label Studio", 0)
            time.sleep(1)
        assert abandoned == 1, (tmp_path / "serve.log").read_text()[-3000:]
        done = cli(env, "--project", pid, log=tmp_path / "beside.log")  # while the deferred job runs
        assert done.returncode == 0, (tmp_path / "beside.log").read_text()[-2000:]
        exactly_one_each(wait_until_predicted(api, project["id"], ids, version, 900, tmp_path / "serve.log"),
                         ids, version)  # fmt: skip
        added = [t["id"] for t in api.import_images(project["id"], {f"b{i}.png": scene_png(600 + i) for i in range(10)})
                 if t["id"] not in ids]  # fmt: skip
        done = cli(env, "--project", pid, log=tmp_path / "more.log")
        assert "predicted                     10" in done.stdout, done.stdout
        exactly_one_each(by_task(api, project["id"], version), ids + added, version)
    finally:
        backend.stop()


def test_a_projects_extra_params_turn_automatic_pre_labelling_on_for_that_project_alone(
    short_deadline, tmp_path
):
    """OSPREY_AUTO_PRELABEL off; one project's ML backend connection has {"auto_prelabel": true} in its
    extra params (Label Studio sends them at /setup): its imports are pre-labelled, the other's are not."""
    api = short_deadline["api"]
    backend, backend_url, _ = backend_for(
        short_deadline, tmp_path / "models", tmp_path / "serve.log", OSPREY_AUTO_PRELABEL_SWEEP_S="0"
    )
    try:
        on, off = (
            api.create_project("auto on", CONFIG.read_text()),
            api.create_project("auto off", CONFIG.read_text()),
        )
        version = api.connect_backend(on["id"], backend_url, extra_params={"auto_prelabel": True})[
            "model_version"
        ]
        api.connect_backend(off["id"], backend_url)
        skipped = [
            t["id"] for t in api.import_images(off["id"], {f"o{i}.png": scene_png(900 + i) for i in range(4)})
        ]
        ids = [
            t["id"] for t in api.import_images(on["id"], {f"n{i}.png": scene_png(910 + i) for i in range(8)})
        ]
        exactly_one_each(
            wait_until_predicted(api, on["id"], ids, version, 900, tmp_path / "serve.log"), ids, version
        )
        assert skipped and not by_task(api, off["id"], version)  # imported first, and still nothing
    finally:
        backend.stop()


def auto_project(short_deadline, tmp_path: Path, title: str, *, sweep_s: str):
    """A backend with OSPREY_AUTO_PRELABEL=1 (its sweep every ``sweep_s``) and a new project connected
    to it: the backend, its URL, the project and the model version it reports."""
    backend, backend_url, _ = backend_for(
        short_deadline, tmp_path / "models", tmp_path / "serve.log", OSPREY_AUTO_PRELABEL="1",
        OSPREY_AUTO_PRELABEL_SWEEP_S=sweep_s,
    )  # fmt: skip
    try:
        project = short_deadline["api"].create_project(title, CONFIG.read_text())
        version = short_deadline["api"].connect_backend(project["id"], backend_url)["model_version"]
    except BaseException:
        backend.stop()
        raise
    return backend, backend_url, project, version


def test_imported_tasks_are_pre_labelled_automatically_exactly_once(short_deadline, tmp_path):
    """OSPREY_AUTO_PRELABEL=1: Label Studio's TASKS_CREATED webhook (the one it makes when the backend is
    connected) queues the tasks; no click; a second import adds exactly its own."""
    api = short_deadline["api"]
    backend, _, project, version = auto_project(short_deadline, tmp_path, "auto 40", sweep_s="0")
    try:
        ids = [
            t["id"]
            for t in api.import_images(project["id"], {f"i{i}.png": scene_png(700 + i) for i in range(40)})
        ]
        stored = wait_until_predicted(api, project["id"], ids, version, 1800, tmp_path / "serve.log")
        exactly_one_each(stored, ids, version)
        added = [t["id"] for t in api.import_images(project["id"], {f"j{i}.png": scene_png(800 + i) for i in range(10)})
                 if t["id"] not in ids]  # fmt: skip
        assert len(added) == 10
        exactly_one_each(wait_until_predicted(api, project["id"], ids + added, version, 900, tmp_path / "serve.log"),
                         ids + added, version)  # fmt: skip
    finally:
        backend.stop()


def test_the_sweep_pre_labels_imports_whose_webhook_never_came_and_leaves_annotated_tasks(
    short_deadline, tmp_path
):
    """OSPREY_AUTO_PRELABEL=1 with the project's webhook deleted in Label Studio: the sweep finds the
    imported tasks (a whole read, then only the ids above those it has seen), pre-labels each once, and
    leaves the task that was imported with its annotation."""
    api = short_deadline["api"]
    backend, backend_url, project, version = auto_project(
        short_deadline, tmp_path, "lost webhooks", sweep_s="10"
    )
    try:
        for hook in api.call("GET", f"/api/webhooks/?project={project['id']}"):
            api.call("DELETE", f"/api/webhooks/{hook['id']}/", expect=204)
        ids = [
            t["id"]
            for t in api.import_images(project["id"], {f"s{i}.png": scene_png(900 + i) for i in range(4)})
        ]
        image = api.tasks(project["id"])[0]["data"]["image"]
        api.import_tasks(project["id"], [{"data": {"image": image}, "annotations": [{"result": []}]}])
        [annotated] = [t["id"] for t in api.tasks(project["id"]) if t["id"] not in ids]
        stored = wait_until_predicted(api, project["id"], ids, version, 900, tmp_path / "serve.log")
        exactly_one_each(stored, ids, version)
        added = [t["id"] for t in api.import_images(project["id"], {f"t{i}.png": scene_png(950 + i) for i in range(2)})
                 if t["id"] not in ids and t["id"] != annotated]  # fmt: skip
        stored = wait_until_predicted(api, project["id"], ids + added, version, 900, tmp_path / "serve.log")
        exactly_one_each(stored, ids + added, version)
        assert annotated not in stored  # imported with its annotation: left alone
        deadline, read = time.time() + 60, None  # until the sweep after the one that found them
        while read != f"ids above {max(added)}" and time.time() < deadline:
            time.sleep(1)
            last = requests.get(f"{backend_url}/metrics", timeout=5).json()["prelabel"]["auto"]["last_sweep"]
            read = last["projects"][str(project["id"])]["read"]
        assert read == f"ids above {max(added)}"
    finally:
        backend.stop()
