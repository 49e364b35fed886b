"""``osprey-label prelabel --ray`` against a real Label Studio: a local Ray (2 CPUs on 127.0.0.1, started
and stopped by the command), tiny models, 40 tasks: every task predicted exactly once although a model
actor is killed mid-run (Ray restarts it and its batch is done again); bad input gives the in-process
engine's one-line message and exit status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from labelstudio import scene_png
from serving import ROOT, tiny_backend_env

from backend.prelabel.ray_engine import CRASH_TEST_ENV

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

CONFIG = ROOT / "label_configs" / "brush_full.xml"
VERSION = "tiny+sam-tiny-untrained"


def cli(env: dict, *args: str, log: Path) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "backend.service", "prelabel", "--quiet", *args]
    with open(log, "w") as err:
        return subprocess.run(
            argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, timeout=1200
        )


@pytest.fixture
def env(label_studio, tmp_path) -> dict:
    return tiny_backend_env(
        tmp_path / "models", LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.token,
        OSPREY_MAX_CAPTION_TOKENS="4", OSPREY_MAX_DESCRIPTION_TOKENS="4",
    )  # fmt: skip


def test_prelabel_on_ray_writes_each_task_once_through_a_killed_actor(label_studio, env, tmp_path):
    api = label_studio.api
    project = api.create_project("ray 40", CONFIG.read_text())
    ids = [
        t["id"]
        for t in api.import_images(project["id"], {f"r{i}.png": scene_png(900 + i) for i in range(40)})
    ]
    marker = tmp_path / "actor-killed"
    env = {**env, CRASH_TEST_ENV: f"3:{marker}"}  # a model actor's process exits on its third batch, once
    done = cli(env, "--project", str(project["id"]), "--ray", "--ray-cpus", "2", "--batch-tasks", "4",
               log=tmp_path / "ray.log")  # fmt: skip
    log = (tmp_path / "ray.log").read_text()
    assert done.returncode == 0, log[-3000:]
    assert marker.exists(), "no model actor was killed: the test proved nothing"
    assert (
        "predicted                     40" in done.stdout
        and "failed                         0" in done.stdout
    )
    stored: dict[int, list[dict]] = {}
    for prediction in api.predictions(project["id"]):
        stored.setdefault(prediction["task"], []).append(prediction)
    for task in ids:
        ours = [p for p in stored.get(task, []) if p["model_version"] == VERSION]
        assert len(ours) == 1 and ours[0]["result"], (task, ours)


@pytest.mark.parametrize("case", ["no such project", "wrong token", "Label Studio unreachable"])
def test_bad_input_gives_the_in_process_message_and_exit_status(label_studio, env, tmp_path, case):
    project = "7"
    if case == "no such project":
        project = "987654"
    elif case == "wrong token":
        env = {**env, "LABEL_STUDIO_API_KEY": "0" * 40}
    else:
        env = {**env, "LABEL_STUDIO_URL": "http://127.0.0.1:9"}
    said = {}
    for engine in ([], ["--ray", "--ray-cpus", "2"]):
        log = tmp_path / f"{len(engine)}.log"
        done = cli(env, "--project", project, *engine, log=log)
        text = log.read_text()  # (urllib3's retry warnings come first when nothing listens)
        errors = [line for line in text.splitlines() if line.startswith("osprey-label prelabel: error:")]
        assert done.returncode == 2 and len(errors) == 1 and "Traceback" not in text, text
        said[bool(engine)] = errors[0]
    assert said[True] == said[False]
