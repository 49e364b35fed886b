"""Pre-labelling a real Label Studio project with PixelRefer-Lite (its tiny random-weight preset) chosen
by ``REGION_MODEL``: ``osprey-label prelabel`` writes one prediction per task, named after the model."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from labelstudio import scene_png
from serving import ROOT, tiny_backend_env

pytestmark = pytest.mark.slow

CONFIG = ROOT / "label_configs" / "brush_full.xml"


def test_pixelrefer_lite_pre_labels_a_project(label_studio, tmp_path):
    env = tiny_backend_env(
        tmp_path / "models", LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.token,
        REGION_MODEL="pixelrefer-lite-tiny", OSPREY_MAX_CAPTION_TOKENS="4", OSPREY_MAX_DESCRIPTION_TOKENS="4",
        OSPREY_TRAIN_EVERY="0", OSPREY_LORA="false",
    )  # fmt: skip
    api = label_studio.api
    project = api.create_project("pixelrefer-lite prelabel", CONFIG.read_text())
    ids = [
        t["id"] for t in api.import_images(project["id"], {f"q{i}.png": scene_png(500 + i) for i in range(3)})
    ]
    log = tmp_path / "prelabel.log"
    with open(log, "w") as err:
        done = subprocess.run(
            [sys.executable, "-m", "backend.service", "prelabel", "--quiet", "--project", str(project["id"])],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, timeout=1200,
        )  # fmt: skip
    assert done.returncode == 0, log.read_text()[-3000:]
    assert re.search(r"predicted\s+3\b", done.stdout), done.stdout
    stored = {}
    for prediction in api.predictions(project["id"]):
        stored.setdefault(prediction["task"], []).append(prediction)
    for task_id in ids:
        [prediction] = stored[task_id]
        assert prediction["model_version"].startswith("pixelrefer-lite-tiny"), prediction["model_version"]
        assert prediction["model_version"].endswith("-untrained")
        kinds = {item["type"] for item in prediction["result"]}
        assert "brushlabels" in kinds or "labels" in kinds, kinds
