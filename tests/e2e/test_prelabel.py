"""Pre-labelling a whole project against a real Label Studio whose ML_TIMEOUT_PREDICT is too short for
one Retrieve Predictions of it: nothing is lost to the deadline, nothing is written twice or empty, and
``osprey-label prelabel`` resumes, picks up new tasks, survives a kill, reports a missing image and
shards over two torch.distributed (gloo) ranks."""

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
    argv = [sys.executable, "-m", "backend.cli", "prelabel", "--quiet", *args]
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
    argv = [sys.executable, "-m", "backend.cli", "prelabel", "--quiet", "--project", str(project["id"]),
            "--batch-tasks", "2", "--chunk-tasks", "2"]  # fmt: skip
    running = Process(argv, env, tmp / "killed.log", cwd=ROOT)
    deadline = time.time() + 600
    while time.time() < deadline:
        written = sum(1 for t in more if by_task(api, project["id"], version).get(t))
        if written >= 2:
            break
        time.sleep(1)
    running.stop()  # SIGTERM to the whole group, then SIGKILL
    partial = sum(1 for t in more if by_task(api, project["id"], version).get(t))
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

    # two torch.distributed ranks (gloo on CPU) share new tasks, each written once
    shared = [t["id"] for t in api.import_images(project["id"], {f"r{i}.png": scene_png(400 + i) for i in range(6)})
              if t["id"] not in ids + [gone]]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "--module", "backend.cli", "prelabel", "--quiet", "--project", str(project["id"]),
                "--tasks", ",".join(map(str, shared)), "--device", "cpu"]  # fmt: skip
    with open(tmp / "ranks.log", "w") as err:
        done = subprocess.run(
            torchrun, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, timeout=1200
        )
    log = (tmp / "ranks.log").read_text()
    assert done.returncode == 0, log[-3000:]
    assert "[rank 0/2]" in log and "[rank 1/2]" in log
    assert "predicted                      6" in done.stdout and "over 2 ranks" in done.stdout, done.stdout
    exactly_one_each(by_task(api, project["id"], version), ids + shared, version)
